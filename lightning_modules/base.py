"""`ContinualModule`: what every method shares, whatever its family.

It knows the task stream and the current task, answers the task hooks the task-switch callback
calls (`on_task_start`, `on_task_end`), says which parameters train now (`trainable_parameters`,
from which the optimizer is rebuilt at each task), scores a batch of task j (`eval_step`), and
keeps per-rank state (replay buffers) in checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from cli.errors import ConfigError
from datamodules.base import TaskStream
from lightning_modules.nn.distributed import gather_rank_states


class ContinualModule(L.LightningModule):
    """Base of every method. `stream` comes from the datamodule (the CLI links it)."""

    #: one more evaluation of a task costs a few forward passes (not rollouts or image sampling), so the
    #: metrics callback takes the extra points of Mammoth's FWT by default (`ContinualMetrics.task_start_fwt`)
    cheap_evaluation: bool = False

    def __init__(
        self,
        stream: TaskStream | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if stream is None:
            raise ConfigError(
                "model.stream is missing: the CLI fills it from the datamodule; in Python pass stream=datamodule.stream"
            )
        self.save_hyperparameters(ignore=["stream", "optimizer", "lr_scheduler"])
        self.stream = stream
        self.num_tasks = stream.num_tasks
        self.current_task = 0
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        # Their arguments are checked now, on a stand-in parameter, so a bad one fails before anything runs.
        self.with_scheduler(self.build_optimizer([nn.Parameter(torch.zeros(1))]))

    # -- task hooks (called by callbacks.TaskSwitch) ----------------------------------------------
    def on_task_start(self, task_id: int) -> None:
        """Task `task_id` begins: grow, snapshot or freeze here. The optimizer is rebuilt afterwards."""
        self.current_task = task_id

    def on_task_end(self, task_id: int) -> None:
        """Task `task_id` is over (before it is evaluated): consolidate here (Fisher, exemplars, ...)."""

    def compute_modules(self) -> dict[str, nn.Module]:
        """The networks that do this method's heavy lifting, each called as a module (its forward runs in
        the step): what `callbacks.Throughput` compiles or stores channels-last. None by default."""
        return {}

    def deepspeed_unsupported(self) -> str | None:
        """Why DeepSpeed cannot run this method, or None. DeepSpeed keeps the optimizer built for the first
        task over the whole stream and partitions gradients inside backward, so a method that trains other
        parameters at a later task, or edits gradients or weights around the optimizer step, says so here
        (the CLI stops with this line; `TaskSwitch` also stops a run whose trainable parameters change)."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer of the current task updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def trained_names(self, groups: list | None = None) -> set[str]:
        """Names of the parameters in `groups` (parameters or optimizer groups of them); by default of what
        `trainable_parameters()` would give the optimizer now."""
        names = {id(p): n for n, p in self.named_parameters()}
        out: set[str] = set()
        for item in self.trainable_parameters() if groups is None else groups:
            for p in item["params"] if isinstance(item, dict) else [item]:
                out.add(names.get(id(p), f"<unnamed {tuple(p.shape)}>"))
        return out

    def require_find_unused_parameters(self, reason: str) -> None:
        """Under multi-process DDP, refuses a strategy that expects a gradient for every parameter; `reason`
        says which parameters train (e.g. "DMPEL trains one task's expert and router at a time")."""
        strategy = self.trainer.strategy
        if (
            isinstance(strategy, DDPStrategy)
            and self.trainer.world_size > 1
            and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            raise ConfigError(
                f"trainer.strategy: {reason}, so DDP must skip the others: use ddp_find_unused_parameters_true"
            )

    def build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The configured optimizer over `params`; its argument errors (torch checks lr, betas, ...) as one line."""
        try:
            return self._optimizer_factory(params)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.optimizer: {err}; fix its init_args") from None

    def with_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """What `configure_optimizers` returns for `optimizer`: it alone, or with the configured LR scheduler."""
        if self._scheduler_factory is None:
            return optimizer
        try:
            scheduler = self._scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.lr_scheduler: {err}; fix its init_args") from None
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_optimizers(self) -> Any:
        return self.with_scheduler(self.build_optimizer(self.trainable_parameters()))

    # -- logging ------------------------------------------------------------------------------
    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `log`, except that a training step's per-step value is dropped on the steps the logger does
        not write (it writes every `trainer.log_every_n_steps`-th): Lightning's bookkeeping of one logged value
        costs about 1 ms on a CPU, as much as a whole Split-Digits step. Epoch-level values (`on_epoch=True`) and
        every other hook log as before; the progress bar's values refresh on the logged steps;
        `trainer.log_every_n_steps: 1` logs every step."""
        if self._unwritten_step_value(kwargs):
            return
        super().log(name, value, *args, **kwargs)

    def _unwritten_step_value(self, kwargs: dict) -> bool:
        trainer = self._trainer
        if trainer is None or self._current_fx_name != "training_step" or trainer.fast_dev_run:
            return False
        if kwargs.get("on_epoch") or kwargs.get("on_step") is False:
            return False  # accumulated over the epoch: every step counts
        # the logger connector's own test, made before the step is counted, as it is when the values are written
        return not trainer._logger_connector.should_update_logs

    # -- evaluation ---------------------------------------------------------------------------
    @contextmanager
    def evaluating_ahead(self, task_id: int) -> Iterator[None]:
        """Inside it, `eval_step` scores as if task `task_id` had started, without running its start hooks:
        for a classifier the class-IL arg-max then covers that task's classes (Mammoth scores the next task so
        before its `begin_task`, for its FWT). The base changes nothing."""
        yield

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        """Per-example scores on a batch of task `task_id`, one tensor per metric name (first is primary)."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.eval_step(batch, dataloader_idx)

    # -- checkpoints --------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As torch's, with weights that do not fit this model (another method or size) as one ConfigError line."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            detail = " ".join(str(err).splitlines()[1:2]).strip()[:200]
            raise ConfigError(
                f"--ckpt_path: the checkpoint's weights do not fit {type(self).__name__} with these settings "
                f"({detail}); use the method and settings it was trained with"
            ) from None

    def rank_local_state(self) -> dict:
        """State that differs between DDP ranks (e.g. each rank's replay buffer); saved for every rank."""
        return {}

    def load_rank_local_state(self, state: dict) -> None:
        """Restores what `rank_local_state` returned on this rank."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["continual"] = {
            "num_tasks": self.num_tasks,
            "task": self.current_task,
            "rank_local": gather_rank_states(self.rank_local_state()),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("continual")
        if state is None:
            raise ConfigError(
                "the checkpoint was not written by a lifelong module (no 'continual' entry): pass one of ours"
            )
        if state["num_tasks"] != self.num_tasks:
            raise ConfigError(
                f"the checkpoint was trained on a stream of {state['num_tasks']} tasks but the data has "
                f"{self.num_tasks}: use the data settings it was trained with (data.num_tasks)"
            )
        self.current_task = int(state["task"])
        per_rank = state["rank_local"]
        self.load_rank_local_state(per_rank[self.global_rank % len(per_rank)])
