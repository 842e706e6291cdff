"""`FrozenCopy`: a snapshot of a network (LwF's and iCaRL's old model, LMSRR's drift reference).

Allocated when the method is built and refreshed in place with `load_from`, so it is always part
of the state dict (a resumed run gets its old model back) and never trains: no gradients, always
in eval mode, whatever `train()` the trainer calls.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class FrozenCopy(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> FrozenCopy:
        return super().train(False)

    @torch.no_grad()
    def load_from(self, module: nn.Module) -> None:
        """Copies the current weights of `module` (of the same architecture) into the snapshot."""
        self.module.load_state_dict(module.state_dict())

    @torch.no_grad()
    def forward(self, *args, **kwargs) -> Tensor:
        return self.module(*args, **kwargs)
