"""`TaskSwitch` owns the task clock: one `trainer.fit` runs the whole stream.

A task spans `epochs_per_task` epochs, or exactly `steps_per_task` optimizer steps (then one epoch
is one task). At a boundary, at the end of the task's last epoch: the continual callbacks'
`on_task_training_end(t)` (e.g. the best weights of the task put back), the module's `on_task_end(t)`, the
continual callbacks' `on_task_end(t)` (evaluation), `datamodule.set_task(t+1)`, the module's
`on_task_start(t+1)`, the callbacks' `on_task_start(t+1)`, then the optimizer and LR scheduler are
rebuilt from `configure_optimizers` for the parameters that train now (Mammoth re-creates the
optimizer at each task too). The data moves at the end of an epoch because Lightning builds the
next epoch's loader before `on_train_epoch_start`; loaders are reloaded every epoch.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.base import ContinualCallback
from cli.errors import ConfigError


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
        if epochs_per_task < 1:
            raise ConfigError(f"task_switch.epochs_per_task must be at least 1, got {epochs_per_task}")
        self.steps_per_task = steps_per_task
        self.epochs_per_task = 1 if steps_per_task is not None else epochs_per_task
        self.stop_after_task = stop_after_task
        self.rebuild_optimizer = rebuild_optimizer
        self.task = 0
        self.started = False

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
        dm = self._stream(trainer)
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

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.epochs_per_task:
            return
        dm = self._stream(trainer)
        t = self.task
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
        if self.stop_after_task is not None and t + 1 >= self.stop_after_task:
            trainer.should_stop = True

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        pl_module.on_task_start(task_id)
        for cb in self._continual_callbacks(trainer):
            cb.on_task_start(trainer, pl_module, task_id)
        if not self.rebuild_optimizer:
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            rank_zero_warn("DeepSpeed owns its optimizer: it is kept across tasks (its state is not reset).")
            return
        trainer.strategy.setup_optimizers(trainer)

    @staticmethod
    def _continual_callbacks(trainer: L.Trainer) -> list[ContinualCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, ContinualCallback)]

    def state_dict(self) -> dict:
        return {"task": self.task, "started": self.started}

    def load_state_dict(self, state_dict: dict) -> None:
        self.task = int(state_dict["task"])
        self.started = bool(state_dict["started"])
