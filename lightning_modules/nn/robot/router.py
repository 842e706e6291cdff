"""DMPEL's coefficient router: a query vector -> per-group sparse coefficients over the expert pool.

query -> Linear(256) -> GELU(tanh) -> Linear(256) -> GELU(tanh) -> Linear(G*K) -> 2*sigmoid, viewed as
(G groups, K experts), group-major. In each group only the top k = min(top_k, K) coefficients are kept
(not renormalised); the others count as 0. The last layer's bias starts at logit(0.5 / k), so every
coefficient starts near 1/k and the k kept ones sum to about 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.robot.experts import ExpertLibrary


class CoefficientRouter(nn.Module):
    """Args: query_dim; groups G; experts K (the pool size it routes over); top_k; hidden width."""

    def __init__(self, query_dim: int, groups: int, experts: int, top_k: int = 3, hidden: int = 256):
        super().__init__()
        if top_k < 1:
            raise ConfigError(f"model.top_k must be at least 1, got {top_k}")
        self.groups, self.experts, self.k = groups, experts, min(top_k, experts)
        self.fc1 = nn.Linear(query_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, groups * experts)
        with torch.no_grad():
            self.out.bias.fill_(math.log(0.5 / self.k) - math.log1p(-0.5 / self.k))  # logit(0.5 / k)

    def forward(self, query: Tensor) -> Tensor:
        """(B, G, K) coefficients in (0, 2), before top-k selection; always in float32 (also under autocast)."""
        with torch.autocast(query.device.type, enabled=False):
            h = F.gelu(self.fc1(query.float()), approximate="tanh")
            h = F.gelu(self.fc2(h), approximate="tanh")
            return 2 * torch.sigmoid(self.out(h)).view(-1, self.groups, self.experts)

    def select(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Per group, the top-k coefficients (B, G, k) and their expert indices (B, G, k)."""
        values, indices = self(query).topk(self.k, dim=-1)
        return values, indices

    def dense(self, query: Tensor) -> Tensor:
        """(B, G, K): the top-k coefficients in place, zeros elsewhere; gradients reach the kept ones only."""
        values, indices = self.select(query)
        return torch.zeros(values.shape[:-1] + (self.experts,), dtype=values.dtype, device=values.device).scatter(
            -1, indices, values
        )


def query_dim(policy: nn.Module, obs_shapes: dict[str, tuple[int, ...]], lang_dim: int) -> int:
    """Size of `routing_query`'s output for this policy."""
    lowdim = sum(obs_shapes[k][0] for k in policy.lowdim_keys)
    return lang_dim + policy.config.embed_size * len(policy.image_keys) + lowdim


@torch.no_grad()
def routing_query(
    policy: nn.Module, obs: dict[str, Tensor], lang: Tensor, library: ExpertLibrary | None = None
) -> Tensor:
    """(B, Q) router input of a window (spec 1.5): [instruction embedding | per camera, the window mean of
    the image encoder's feature | per low-dimensional key, its window mean]. For a state-only policy it is
    the instruction plus the mean proprioceptive / object / goal state. It must not depend on the experts:
    pass the policy's expert `library` to switch them off for the pass (or call it with them off)."""
    if library is not None:
        with library.disabled():
            return routing_query(policy, obs, lang)
    parts = [lang.float()]
    for k in policy.image_keys:
        x = obs[k]
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        parts.append(policy.image(x.flatten(0, 1)).view(*x.shape[:2], -1).float().mean(1))
    parts += [obs[k].float().mean(1) for k in policy.lowdim_keys]
    return torch.cat(parts, dim=-1)
