"""Experience Replay (Chaudhry et al., 2019; Mammoth's `er`): the current batch and a batch drawn from
a reservoir memory are trained under one cross-entropy; the raw current batch is then offered to the memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.runtime import run_seed
from lightning_modules.classification.base import ClassIncrementalModule
from lightning_modules.nn.buffer import ReservoirBuffer


class ER(ClassIncrementalModule):
    """Args:
    buffer_size: the memory budget of the whole run; under DDP each of W ranks keeps ceil(buffer_size / W)
        examples of its own data shard, so the budget does not grow with the number of processes.
    minibatch_size: examples replayed per step and per device (default: the batch size).
    """

    def __init__(self, buffer_size: int = 200, minibatch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.buffer_size = buffer_size
        self.minibatch_size = minibatch_size
        self.buffer = ReservoirBuffer(buffer_size)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        self.buffer = ReservoirBuffer(-(-self.buffer_size // world), seed=run_seed() + self.global_rank)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        inputs, labels = x, y
        if len(self.buffer):
            memory = self.buffer.sample(self.minibatch_size or len(x), device=x.device)
            inputs, labels = torch.cat([x, memory["x"]]), torch.cat([y, memory["y"]])
        ce = F.cross_entropy(self(inputs), labels)
        self.log("train/ce", ce, prog_bar=True)
        self.buffer.add(x=x, y=y, task=batch["task"])
        return ce

    def rank_local_state(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_rank_local_state(self, state: dict) -> None:
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"], device=self.device)
