"""`LoRAMerge`: adapters folded into the base weights while the model is only sampled, taken out to train.

A merged UNet samples at the base model's cost (no adapter matmuls, however many adapters a group holds).
The callback merges when a task's training ends (so the evaluation at the boundary and whatever follows the
last task run merged), unmerges when the next task starts training, and does the same around `validate` and
`test`. It talks to the module through `merge_adapters()`, `unmerge_adapters()` and `adapters_merged()`
(the reward methods have them; peft computes the merged delta with the same scale the forward pass uses).
Checkpoints hold the adapters' own tensors, which merging does not touch, and a resumed run starts from an
unmerged base, so merging never changes what a checkpoint holds.
"""

from __future__ import annotations

import lightning as L

from callbacks.base import ContinualCallback
from cli.errors import ConfigError


class LoRAMerge(ContinualCallback):
    @staticmethod
    def _check(pl_module: L.LightningModule) -> None:
        for hook in ("merge_adapters", "unmerge_adapters", "adapters_merged"):
            if not callable(getattr(pl_module, hook, None)):
                raise ConfigError(
                    f"lora_merge: {type(pl_module).__name__} has no {hook}(); remove the LoRAMerge callback for this "
                    "method (it merges peft LoRA adapters, e.g. of the reward methods)"
                )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._check(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.unmerge_adapters()

    def on_task_training_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        pl_module.merge_adapters()

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        if task_id > 0:
            pl_module.unmerge_adapters()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training:
            pl_module.merge_adapters()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training:
            pl_module.unmerge_adapters()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.merge_adapters()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.unmerge_adapters()
