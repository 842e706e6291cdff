"""Finetune: cross-entropy on the current task only, nothing against forgetting. The lower bound."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.classification.base import ClassIncrementalModule


class Finetune(ClassIncrementalModule):
    """Plain sequential training (Mammoth's `sgd`)."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ce = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train/ce", ce, prog_bar=True)
        return ce
