"""`ExpertFreezing`: only the current task's own parameters train; finished (and future) tasks' are frozen.

Works for any module that says which parameters belong to a task (`task_parameters(task_id)`): R2MoE's
experts, routers and concept tokens, DMPEL's LoRA experts. Frozen parameters get no gradient (stop-
gradient in the forward pass) and the module keeps them out of its optimizer groups. The flags are
derived from the module's current task, so they are re-applied when a checkpoint is loaded. The CLI
always adds it (key `expert_freezing`); for methods without `task_parameters` it does nothing.
"""

from __future__ import annotations

import lightning as L

from callbacks.base import ContinualCallback


class ExpertFreezing(ContinualCallback):
    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        self.apply(pl_module, task_id)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.apply(pl_module, pl_module.current_task)

    @staticmethod
    def apply(pl_module: L.LightningModule, task_id: int) -> None:
        """requires_grad on task `task_id`'s parameters, off on every other task's."""
        if not callable(getattr(pl_module, "task_parameters", None)):
            return  # a method without per-task parameters
        for s in range(pl_module.num_tasks):
            if s != task_id:
                for p in pl_module.task_parameters(s):
                    p.requires_grad_(False)
        for p in pl_module.task_parameters(task_id):
            p.requires_grad_(True)
