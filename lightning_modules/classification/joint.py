"""Joint: trains on every task seen so far, so its last task is one task holding all the data. The upper bound."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.classification.finetune import Finetune


class Joint(Finetune):
    """Finetune's loss on the union of tasks 0..t; needs `data.train_on: seen`.

    Args:
        schedule: `cumulative` (default): every task trains on the union of the tasks so far, so each row of
            the matrix is a joint model of the tasks seen. `last`: Mammoth's `joint`: nothing trains until the
            last task, which trains once on the union of all tasks (its `epochs_per_task` epochs); the earlier
            rows score the untrained model. One process only (a skipped step under DDP would leave the
            ranks waiting on each other).
    """

    def __init__(self, schedule: Literal["cumulative", "last"] = "cumulative", **kwargs):
        super().__init__(**kwargs)
        if schedule not in ("cumulative", "last"):
            raise ConfigError(f"model.schedule: {schedule!r} is not one of 'cumulative', 'last'")
        self.schedule = schedule

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if stage == "fit" and getattr(dm, "train_on", "seen") != "seen":
            raise ConfigError("Joint trains on all data seen so far: set data.init_args.train_on: seen")
        if stage == "fit" and self.schedule == "last" and self.trainer.world_size > 1:
            raise ConfigError("model.schedule: last trains on one process only; use cumulative under DDP, or devices 1")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.schedule == "last" and self.current_task < self.num_tasks - 1:
            return None  # Lightning skips the backward pass and the optimizer step
        return super().training_step(batch, batch_idx)
