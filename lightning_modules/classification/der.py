"""Dark Experience Replay (Buzzega et al., 2020; Mammoth's `der`): the memory keeps the logits the
network produced when an example was seen, and replay matches them: loss = CE + alpha * MSE(f(x_m), z_m)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.classification.base import ReplayModule


class DER(ReplayModule):
    """Args: alpha: weight of the logit-matching term (Mammoth: 0.3 on CIFAR-10 and CIFAR-100)."""

    def __init__(self, alpha: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        logits = self(x)
        ce = F.cross_entropy(logits, y)
        self.log("train/ce", ce, prog_bar=True)
        loss = ce
        if len(self.buffer):
            memory = self.replay(batch)
            logit_mse = F.mse_loss(self(memory["x"]), memory["logits"])
            self.log("train/logit_mse", logit_mse)
            loss = loss + self.alpha * logit_mse + self.label_replay_loss(batch)
        self.remember(batch, logits=logits.detach())
        return loss

    def label_replay_loss(self, batch: dict[str, Tensor]) -> Tensor | float:
        """Extra replay term; DER has none, DER++ adds its label cross-entropy."""
        return 0.0
