"""DER++ (Buzzega et al., 2020; Mammoth's `derpp`): DER plus beta * CE on a second, independent memory
batch with its stored labels: loss = CE + alpha * MSE(f(x_m), z_m) + beta * CE(f(x_m'), y_m')."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.classification.der import DER


class DERpp(DER):
    """Args: beta: weight of the label replay term (Mammoth: 0.5); alpha as in DER (Mammoth: 0.2 on CIFAR-10)."""

    def __init__(self, beta: float = 0.5, alpha: float = 0.2, **kwargs):
        super().__init__(alpha=alpha, **kwargs)
        self.beta = beta

    def label_replay_loss(self, batch: dict[str, Tensor]) -> Tensor:
        memory = self.replay(batch)
        label_ce = F.cross_entropy(self(memory["x"]), memory["y"])
        self.log("train/label_ce", label_ce)
        return self.beta * label_ce
