"""Experience Replay (Chaudhry et al., 2019; Mammoth's `er`): the current batch and a batch drawn from
a reservoir memory are trained under one cross-entropy; the raw current batch is then offered to the memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.classification.base import ReplayModule


class ER(ReplayModule):
    """loss = CE([x; x_m], [y; y_m]) with (x_m, y_m) drawn from the memory."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        inputs, labels = x, y
        if len(self.buffer):
            memory = self.replay(batch)
            inputs, labels = torch.cat([x, memory["x"]]), torch.cat([y, memory["y"]])
        ce = F.cross_entropy(self(inputs), labels)
        self.log("train/ce", ce, prog_bar=True)
        self.remember(batch)
        return ce
