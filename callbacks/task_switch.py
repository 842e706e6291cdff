"""`TaskSwitch` owns the task clock: one `trainer.fit` runs the whole stream.

A task spans `epochs_per_task` epochs, or exactly `steps_per_task` optimizer steps (then one epoch
is one task). At a boundary, at the end of the task's last epoch: the continual callbacks'
`on_task_boundary_start(t)` (the checkpoint callback writes `last.ckpt` here), their
`on_task_training_end(t)` (e.g. the best weights of the task put back), the module's `on_task_end(t)`,
the callbacks' `on_task_end(t)` (evaluation), `datamodule.set_task(t+1)`, the module's
`on_task_start(t+1)` and the callbacks' `on_task_start(t+1)`. The optimizer and LR scheduler are rebuilt
from `configure_optimizers` at the start of the next epoch, for the parameters that train then (Mammoth
re-creates the optimizer at each task too); rebuilding there, after Lightning's end-of-epoch scheduler
step, gives the new scheduler exactly one step per epoch of its own task. The data moves at the end of
an epoch because Lightning builds the next epoch's loader before `on_train_epoch_start`; loaders are
reloaded every epoch.

A boundary is made exact to resume: the global RNG is seeded from (run seed, step, rank) before it,
and a run resumed from the checkpoint written at its start runs the whole boundary again before training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.base import ContinualCallback
from cli.errors import ConfigError
from cli.runtime import run_seed, seed_torch, step_seed

#: the strategies every method runs under, on CPUs and GPUs alike
PORTABLE_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")


def deepspeed_refusal(module: Any, strategy: str) -> str | None:
    """The one line that refuses `strategy` (a DeepSpeed one) for `module` (a ContinualModule), or None when
    its `deepspeed_unsupported()` names no reason: DeepSpeed keeps the first task's optimizer for the stream."""
    reason = module.deepspeed_unsupported()
    if not reason:
        return None
    return (
        f"trainer.strategy {strategy}: {reason}, and DeepSpeed keeps one optimizer for the whole stream; "
        f"use {', '.join(PORTABLE_STRATEGIES)}"
    )


#: mixed into the boundary's seed so it differs from the seed of the training step at the same global step
_BOUNDARY_SEED = 0x5EED


class TaskSwitch(L.Callback):
    """Moves model and data through the tasks; its state (the current task) is saved in checkpoints.

    Args:
        epochs_per_task: epochs spent on each task (ignored when `steps_per_task` is set).
        steps_per_task: optimizer steps per task; one epoch then holds exactly that many batches.
        stop_after_task: end `fit` after this many tasks (resume later with `--ckpt_path last`).
        rebuild_optimizer: build a fresh optimizer and scheduler at each task start.
    """

    def __init__(
        self,
        epochs_per_task: int = 1,
        steps_per_task: int | None = None,
        stop_after_task: int | None = None,
        rebuild_optimizer: bool = True,
    ):
        if steps_per_task is not None and steps_per_task < 1:
            raise ConfigError(f"task_switch.steps_per_task must be at least 1, got {steps_per_task}")
        if stop_after_task is not None and stop_after_task < 1:
            raise ConfigError(f"task_switch.stop_after_task must be at least 1 (or null), got {stop_after_task}")
        if epochs_per_task < 1:
            raise ConfigError(f"task_switch.epochs_per_task must be at least 1, got {epochs_per_task}")
        self.steps_per_task = steps_per_task
        self.epochs_per_task = 1 if steps_per_task is not None else epochs_per_task
        self.stop_after_task = stop_after_task
        self.rebuild_optimizer = rebuild_optimizer
        self.task = 0
        self.started = False
        #: the task whose boundary has begun and not finished (a checkpoint written at its start has it)
        self.boundary: int | None = None
        #: the optimizer is rebuilt at the next epoch start
        self.rebuild_pending = False
        #: whether the epoch that just ended was a task's last (the checkpoint callback reads it)
        self.ended_task_this_epoch = False
        #: names of the parameters the optimizer got in the last task started in this process (rebuilt, or
        #: DeepSpeed's kept one; not recorded when `rebuild_optimizer` is false under other strategies)
        self.trainable: set[str] | None = None
        #: tasks at whose start the trainable parameters differed from the previous task's (this process)
        self.trainable_changes: list[int] = []

    @staticmethod
    def _stream(trainer: L.Trainer) -> Any:
        from datamodules.base import ContinualDataModule

        dm = trainer.datamodule
        if not isinstance(dm, ContinualDataModule):
            raise ConfigError("data: the task-switch callback needs a ContinualDataModule (datamodules.*)")
        return dm

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_modules.base import ContinualModule

        if not isinstance(pl_module, ContinualModule):
            raise ConfigError("model: the task-switch callback needs a ContinualModule (lightning_modules.*)")
        # The CLI refuses DeepSpeed given by name before building anything; this covers every other way in
        # (a `class_path` DeepSpeedStrategy, a Trainer built in Python), and methods that change no parameter
        # but would still go wrong under it (PackNet's gradient masks), which the runtime check cannot see.
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            line = deepspeed_refusal(pl_module, "deepspeed")
            if line:
                raise ConfigError(line)
        dm = self._stream(trainer)
        if self.stop_after_task is not None and self.stop_after_task > dm.num_tasks:
            raise ConfigError(
                f"task_switch.stop_after_task={self.stop_after_task}: the stream has {dm.num_tasks} tasks; choose "
                f"1..{dm.num_tasks} (or null for all)"
            )
        trainer.fit_loop.max_epochs = dm.num_tasks * self.epochs_per_task
        trainer.reload_dataloaders_every_n_epochs = 1
        # Evaluation of every task happens at task ends (ContinualMetrics), not in Lightning's val loop.
        trainer.limit_val_batches = 0
        dm.train_batches_per_epoch = self.steps_per_task

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self._stream(trainer)
        if self.task >= dm.num_tasks:
            raise ConfigError(f"the checkpoint is in task {self.task} but the data has {dm.num_tasks} tasks")
        dm.set_task(self.task)
        if not self.started:
            self.started = True
            self._start(trainer, pl_module, 0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from the checkpoint written at a boundary's start does that boundary first."""
        if self.boundary is not None:
            self._boundary(trainer, pl_module, self.boundary)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended_task_this_epoch = False
        if not self.rebuild_pending:
            return
        self.rebuild_pending = False
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            self._note_trainable(trainer, pl_module, pl_module.trained_names())
            if self.rebuild_optimizer:
                rank_zero_warn("DeepSpeed owns its optimizer: it is kept across tasks (its state is not reset).")
            return
        if not self.rebuild_optimizer:
            return
        trainer.strategy.setup_optimizers(trainer)
        groups = [g for optimizer in trainer.optimizers for g in optimizer.param_groups]
        self._note_trainable(trainer, pl_module, pl_module.trained_names(groups))

    def _note_trainable(self, trainer: L.Trainer, pl_module: L.LightningModule, now: set[str]) -> None:
        """Records `now`, the parameters that train in the task that starts now; under DeepSpeed, whose one
        optimizer was built over the first task's, a change stops the run before it trains the wrong ones."""
        if self.trainable is not None and now != self.trainable:
            self.trainable_changes.append(self.task)
            if isinstance(trainer.strategy, DeepSpeedStrategy):
                changed = sorted(now ^ self.trainable)
                raise ConfigError(
                    f"trainer.strategy deepspeed: {type(pl_module).__name__} trains other parameters in task "
                    f"{self.task} ({len(changed)} changed, e.g. {changed[0]}), and DeepSpeed keeps the first "
                    "task's optimizer for the whole stream: use ddp"
                )
        self.trainable = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.epochs_per_task:
            return
        t = self.task
        self.boundary = t
        for cb in self._continual_callbacks(trainer):
            cb.on_task_boundary_start(trainer, pl_module, t)
        self._boundary(trainer, pl_module, t)

    def _boundary(self, trainer: L.Trainer, pl_module: L.LightningModule, t: int) -> None:
        """Ends task t (callbacks' `on_task_training_end`, the module's `on_task_end`, callbacks' `on_task_end`)
        and starts task t+1 if there is one."""
        dm = self._stream(trainer)
        seed_torch(step_seed(run_seed() ^ _BOUNDARY_SEED, trainer.global_step, trainer.global_rank))
        callbacks = self._continual_callbacks(trainer)
        for cb in callbacks:
            cb.on_task_training_end(trainer, pl_module, t)
        pl_module.on_task_end(t)
        for cb in callbacks:
            cb.on_task_end(trainer, pl_module, t)
        if t + 1 < dm.num_tasks:
            self.task = t + 1
            dm.set_task(t + 1)
            self._start(trainer, pl_module, t + 1)
        self.boundary = None
        self.ended_task_this_epoch = True
        if self.stop_after_task is not None and t + 1 >= self.stop_after_task:
            trainer.should_stop = True

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        pl_module.on_task_start(task_id)
        for cb in self._continual_callbacks(trainer):
            cb.on_task_start(trainer, pl_module, task_id)
        self.rebuild_pending = True

    @staticmethod
    def _continual_callbacks(trainer: L.Trainer) -> list[ContinualCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, ContinualCallback)]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written between a boundary and the next epoch holds the ended task's optimizer, which
        is rebuilt before it could step again: its state is left out (it would not fit the new parameters)."""
        if self.rebuild_pending and self.rebuild_optimizer and not isinstance(trainer.strategy, DeepSpeedStrategy):
            checkpoint["optimizer_states"] = []
            checkpoint["lr_schedulers"] = []

    def state_dict(self) -> dict:
        return {
            "task": self.task,
            "started": self.started,
            "boundary": self.boundary,
            "rebuild_pending": self.rebuild_pending,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.task = int(state_dict["task"])
        self.started = bool(state_dict["started"])
        self.boundary = state_dict.get("boundary")
        self.rebuild_pending = bool(state_dict.get("rebuild_pending", False))
