"""DMPEL's coefficient router: a query vector -> per-group sparse coefficients over the expert pool.

query -> Linear(256) -> GELU(tanh) -> Linear(256) -> GELU(tanh) -> Linear(G*K) -> 2*sigmoid, viewed as
(G groups, K experts), group-major. In each group only the top k = min(top_k, K) coefficients are kept
(not renormalised); the others count as 0. Initial coefficients, set through the last layer's bias:
`released` starts every expert near 1/k (bias logit(0.5 / k)), so the k kept ones sum to about 1;
`favour_new` starts the new (last) expert near 1.0 and the old ones near 0.05 (or the given values), so a
new task's router does not begin by mixing in experts of other tasks (which, frozen and never turned off,
can dominate it);
`inherit` starts router t as router t-1 after its replay (`inherit_from`), the new expert near
`new_start`, so a new task begins near the policy that ended the last one and keeps what transfers (its B
starts at 0; with `merge: weight` the cross term of its A with the old B moves the start by a share that
grows with `new_start`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.robot.experts import ExpertLibrary

#: how a router's initial coefficients are set
ROUTER_INITS = ("released", "favour_new", "inherit")
#: `favour_new`: each old expert's initial coefficient when none is given
FAVOUR_OLD = 0.05
#: `favour_new` and `inherit`: the new expert's initial coefficient when none is given (for `inherit` measured
#: on CW3 seeds 10 and 11, kept apart from the results tables' seeds: 1.0 ended at 0.90 / 0.92 final
#: success, 0.05 at 0.77 / 0.80)
NEW_START = 1.0


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class CoefficientRouter(nn.Module):
    """Args: query_dim; groups G; experts K (the pool size it routes over; the last is the new task's);
    top_k; hidden width; init: the initial coefficients, `released`, `favour_new` or `inherit` (module
    docstring; `inherit` starts as `released` until `inherit_from` is called); favour: with `favour_new`, the
    initial coefficient of each old expert and of the new one, each in (0, 2)."""

    def __init__(
        self,
        query_dim: int,
        groups: int,
        experts: int,
        top_k: int = 3,
        hidden: int = 256,
        init: str = "released",
        favour: tuple[float, float] = (FAVOUR_OLD, NEW_START),
    ):
        super().__init__()
        if top_k < 1:
            raise ConfigError(f"model.top_k must be at least 1, got {top_k}")
        if init not in ROUTER_INITS:
            raise ConfigError(f"model.router_init: {init!r} is not one of {', '.join(ROUTER_INITS)}")
        self.groups, self.experts, self.k = groups, experts, min(top_k, experts)
        self.fc1 = nn.Linear(query_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, groups * experts)
        with torch.no_grad():  # a coefficient is 2 sigmoid(logit): bias logit(c / 2) starts it near c
            if init in ("released", "inherit"):
                self.out.bias.fill_(_logit(0.5 / self.k))
            else:
                old, new = favour
                bias = self.out.bias.view(groups, experts)
                bias[:, :-1] = _logit(old / 2)
                bias[:, -1] = _logit(new / 2)

    @torch.no_grad()
    def inherit_from(self, previous: CoefficientRouter, new_start: float) -> None:
        """Copies `previous` (same groups, one expert fewer) into this router: its hidden layers and, per
        group, its output rows for the old experts; the new expert's row keeps its weights and starts near
        `new_start` (in (0, 2)) through its bias."""
        if previous.groups != self.groups or previous.experts != self.experts - 1:
            raise ValueError(f"a router over {self.experts} experts inherits from one over {self.experts - 1}")
        self.fc1.load_state_dict(previous.fc1.state_dict())
        self.fc2.load_state_dict(previous.fc2.state_dict())
        weight = self.out.weight.view(self.groups, self.experts, -1)
        bias = self.out.bias.view(self.groups, self.experts)
        weight[:, :-1] = previous.out.weight.view(self.groups, previous.experts, -1)
        bias[:, :-1] = previous.out.bias.view(self.groups, previous.experts)
        bias[:, -1] = _logit(new_start / 2)

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
