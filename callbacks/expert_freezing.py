"""`ExpertFreezing`: only the current task's own parameters train; finished (and future) tasks' are frozen.

Works for any module that says which parameters belong to a task (`task_parameters(task_id)`): R2MoE's
experts, routers and concept tokens, DMPEL's LoRA experts. Frozen parameters get no gradient (stop-
gradient in the forward pass) and the module keeps them out of its optimizer groups. The CLI always adds
it (key `expert_freezing`); for methods without `task_parameters` it does nothing.

Under DDP the wrapper's reducer hooks only the parameters that require grad when it is built (after the
`setup` hooks and the checkpoint restore, before `on_fit_start`); one unfrozen later would train on each
rank's own gradient. So in `setup` every task's parameters require grad, the wrapper is built over all
of them, and the current task's flags are applied from `on_fit_start` on (also after a resume; the module's
`current_task` comes from the checkpoint). DDP then needs `find_unused_parameters` (frozen parameters get
no gradient): such modules ask for it (`ContinualModule.require_find_unused_parameters`).
"""

from __future__ import annotations

import lightning as L

from callbacks.base import ContinualCallback


class ExpertFreezing(ContinualCallback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and callable(getattr(pl_module, "task_parameters", None)):
            for s in range(pl_module.num_tasks):
                for p in pl_module.task_parameters(s):
                    p.requires_grad_(True)  # every task's parameters reach the DDP wrapper built next

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, pl_module.current_task)

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        self.apply(pl_module, task_id)

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
