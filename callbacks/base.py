"""`ContinualCallback`: a callback that also hears the task boundaries the task-switch callback announces."""

from __future__ import annotations

import lightning as L


class ContinualCallback(L.Callback):
    """Subclasses override `on_task_boundary_start` / `on_task_start` / `on_task_training_end` / `on_task_end`;
    `TaskSwitch` calls them."""

    def on_task_boundary_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        """Task `task_id`'s last epoch has trained and nothing of its boundary has run yet (the checkpoint
        callback writes here, so a run killed during the boundary redoes the boundary, not the task)."""

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        """Task `task_id` has begun (the module's `on_task_start` has run, the data serves the new task)."""

    def on_task_training_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        """The last epoch of task `task_id` has trained; the module's `on_task_end` has not run yet
        (the place to put back the weights a task should end with, e.g. its best ones)."""

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        """Task `task_id` has ended (the module's `on_task_end` has run)."""
