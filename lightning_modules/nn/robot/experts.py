"""Mixture-of-LoRA wrappers for the robot policy's linear layers, and the library of all of them.

A `MoELoRALinear` keeps its frozen `base_layer` and, for each adapted output slice, a pool of rank-r
experts (A_k: in x r, B_k: r x slice), every expert its own parameter (a finished expert is then never
touched by the optimizer or its weight decay). Per-sample coefficients over the pool are set from
outside before a forward (a router, a task key, a skill prototype); with coefficients c (B, n) the first
n experts are mixed. `merge="weight"` (DMPEL's released code) mixes A and B separately,

    y = W0 x + b + (alpha / r) x (sum_k c_k A_k)(sum_k c_k B_k)     (cross terms c_i c_j A_i B_j included),

`merge="output"` mixes the experts' outputs, y = W0 x + b + (alpha / r) sum_k c_k x A_k B_k. Without
coefficients, or with the experts switched off, the layer is its base layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError

MERGE_MODES = ("weight", "output")
INIT_MODES = ("ortho", "kaiming")
#: the foundation policy's layer groups that can get experts (see `FoundationPolicy.lora_targets`)
GROUPS = ("img", "extra", "fusion", "tem", "head")


def check_groups(groups: Iterable[str], option: str = "model.groups", allowed: tuple[str, ...] = GROUPS) -> None:
    """Raises a ConfigError naming `option` for layer groups (or per-group keys) not in `allowed`."""
    unknown = sorted(set(groups) - set(allowed))
    if unknown:
        raise ConfigError(f"{option}: unknown group(s) {unknown}; choose from {list(allowed)}")


def replace_linear(model: nn.Module, name: str, wrap: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Puts `wrap(layer)` in place of the `nn.Linear` called `name` inside `model`; returns the new module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"{name} is a {type(base).__name__}, not an nn.Linear")
    layer = wrap(base)
    setattr(parent, child, layer)
    return layer


class ExpertPool(nn.Module):
    """`num_experts` rank-`rank` experts of one output slice; expert k is (A[k]: in x r, B[k]: r x out)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int):
        super().__init__()
        self.A = nn.ParameterList([nn.Parameter(torch.zeros(in_features, rank)) for _ in range(num_experts)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(rank, out_features)) for _ in range(num_experts)])

    @torch.no_grad()
    def init_expert(self, k: int, mode: str, generator: torch.Generator) -> None:
        """B_k = 0; A_k kaiming-uniform (a = sqrt 5) over the (in, r) tensor (fan-in in*r) for the first
        expert or `mode="kaiming"`, else ("ortho") a Gaussian vector orthogonalised against the flattened
        A of experts 0..k-1 and scaled to unit Frobenius norm. Once experts 0..k-1 already span the whole
        in*r space (k >= in*r) no direction is left, and such an expert falls back to kaiming-uniform."""
        a, b = self.A[k], self.B[k]
        b.zero_()
        if k == 0 or mode == "kaiming":
            self._kaiming(a, generator)
            return
        v = torch.randn(a.numel(), generator=generator, dtype=torch.float64)
        old = torch.stack([self.A[j].detach().double().cpu().flatten() for j in range(k)], dim=1)
        q, r = torch.linalg.qr(old)
        q = q[:, r.diagonal().abs() > 1e-12]  # skip experts that are still zero
        for _ in range(2):  # twice: Gram-Schmidt reorthogonalisation for float accuracy
            v = v - q @ (q.T @ v)
        norm = v.norm()
        if q.shape[1] >= v.numel() or norm <= 1e-9 * math.sqrt(v.numel()):  # the pool spans the space
            self._kaiming(a, generator)
            return
        a.copy_((v / norm).view(a.shape))

    @staticmethod
    def _kaiming(a: Tensor, generator: torch.Generator) -> None:
        """Kaiming-uniform with a = sqrt 5 over the whole tensor: bound = gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in)."""
        bound = 1.0 / math.sqrt(a.numel())
        a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=generator))


class MoELoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a pool of LoRA experts per output slice, mixed by externally set
    per-sample coefficients (see the module docstring).

    Args:
        base_layer: the wrapped layer (frozen here).
        num_experts: pool size, allocated up front.
        rank, alpha: LoRA rank and scale numerator (the update is scaled by alpha / rank).
        slices: output ranges [(start, end)] adapted by their own pools (None: all outputs), e.g. the
            q and v slices of a fused qkv projection.
        merge: "weight" or "output".
        dropout: coefficient dropout in training; each wrapper draws its own mask per sample.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        slices: list[tuple[int, int]] | None = None,
        merge: Literal["weight", "output"] = "weight",
        dropout: float = 0.0,
    ):
        super().__init__()
        if merge not in MERGE_MODES:
            raise ConfigError(f"model.merge: {merge!r} is not one of {', '.join(MERGE_MODES)}")
        if rank < 1:
            raise ConfigError(f"model.ranks: a LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.coefficient_dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        self.slices = [tuple(s) for s in slices] if slices else [(0, base_layer.out_features)]
        bounds = [b for s in self.slices for b in s]
        if bounds != sorted(bounds) or bounds[-1] > base_layer.out_features or any(s == e for s, e in self.slices):
            raise ValueError(f"output slices {self.slices} must be ascending, non-empty and within the layer")
        self.pools = nn.ModuleList(
            [ExpertPool(base_layer.in_features, end - start, num_experts, rank) for start, end in self.slices]
        )
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merge, self.dropout = merge, dropout
        self.enabled = True
        self.coefficients: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.pools[0].A)

    def expert_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for pool in self.pools for p in (pool.A[k], pool.B[k])]

    def init_expert(self, k: int, mode: str, generator: torch.Generator) -> None:
        for pool in self.pools:
            pool.init_expert(k, mode, generator)

    def set_coefficients(self, coefficients: Tensor | None) -> None:
        """(B, n) per-sample weights of experts 0..n-1 (zeros for unselected ones); None: base layer only."""
        if coefficients is not None and not 1 <= coefficients.shape[-1] <= self.num_experts:
            raise ValueError(f"coefficients for {coefficients.shape[-1]} experts, the pool has {self.num_experts}")
        self.coefficients = coefficients

    def delta(self, x: Tensor, c: Tensor, pool: ExpertPool) -> Tensor:
        """The slice's update for x (B, L, in) and coefficients c (B, n): (B, L, slice)."""
        n = c.shape[1]
        A = torch.stack(list(pool.A[:n])).to(x.dtype)  # (n, in, r)
        B = torch.stack(list(pool.B[:n])).to(x.dtype)  # (n, r, out)
        c = c.to(x.dtype)
        if self.merge == "weight":
            a_mix = torch.einsum("bk,kir->bir", c, A)
            b_mix = torch.einsum("bk,kro->bro", c, B)
            return torch.bmm(torch.bmm(x, a_mix), b_mix)
        return torch.einsum("bklr,kro,bk->blo", torch.einsum("bli,kir->bklr", x, A), B, c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        c = self.coefficients
        if not self.enabled or c is None:
            return y
        batch = c.shape[0]
        if x.shape[0] % batch:
            raise RuntimeError(f"a batch of {x.shape[0]} rows does not fit coefficients for {batch} samples")
        c = F.dropout(c, self.dropout, training=self.training)
        # Rows of one sample are contiguous (time folded into the batch, sample-major): (B, L, in).
        flat = x.reshape(batch, -1, x.shape[-1])
        pieces, pos = [], 0
        for (start, end), pool in zip(self.slices, self.pools, strict=True):
            if start > pos:  # outputs between adapted slices are left alone
                pieces.append(flat.new_zeros(*flat.shape[:2], start - pos))
            pieces.append(self.delta(flat, c, pool))
            pos = end
        if pos < y.shape[-1]:
            pieces.append(flat.new_zeros(*flat.shape[:2], y.shape[-1] - pos))
        return y + self.scale * torch.cat(pieces, dim=-1).view(y.shape)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, slices={self.slices}, "
            f"merge={self.merge}"
        )


class ExpertLibrary:
    """Every wrapped layer of a model, by group; a group's layers share one coefficient vector per sample.

    Wraps the layers named in `targets` ({group: [(module name, output slices or None)]}, e.g. the
    foundation policy's `lora_targets()`) in place; empty groups are skipped, `groups` lists the others
    in order. Not a module: the wrappers live (and are saved) inside the model.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, list[tuple[str, list[tuple[int, int]] | None]]],
        num_experts: int,
        ranks: dict[str, int],
        alphas: dict[str, float],
        merge: Literal["weight", "output"] = "weight",
        dropout: float = 0.0,
    ):
        self.layers: dict[str, list[MoELoRALinear]] = {}
        self.names: dict[str, list[str]] = {}
        for group, entries in targets.items():
            if not entries:
                continue
            self.layers[group], self.names[group] = [], []
            for name, slices in entries:
                wrap = partial(
                    MoELoRALinear,
                    num_experts=num_experts,
                    rank=ranks[group],
                    alpha=alphas[group],
                    slices=slices,
                    merge=merge,
                    dropout=dropout,
                )
                layer = replace_linear(model, name, wrap)
                self.layers[group].append(layer)
                self.names[group].append(name)
        if not self.layers:
            raise ConfigError("model: none of the policy's layers were selected for experts; check model.groups")

    @property
    def groups(self) -> list[str]:
        return list(self.layers)

    def all_layers(self) -> Iterator[tuple[str, MoELoRALinear]]:
        for group, layers in self.layers.items():
            for layer in layers:
                yield group, layer

    def expert_parameters(self, k: int) -> list[nn.Parameter]:
        """Expert k's A and B in every layer and slice."""
        return [p for _, layer in self.all_layers() for p in layer.expert_parameters(k)]

    def expert_size(self, k: int = 0) -> dict[str, int]:
        """Parameters of expert k per group."""
        return {g: sum(p.numel() for layer in ls for p in layer.expert_parameters(k)) for g, ls in self.layers.items()}

    def init_expert(self, k: int, mode: str, seed: int) -> None:
        """Initialises expert k everywhere (see `ExpertPool.init_expert`), deterministically from `seed`."""
        if mode not in INIT_MODES:
            raise ConfigError(f"model.expert_init: {mode!r} is not one of {', '.join(INIT_MODES)}")
        generator = torch.Generator().manual_seed(seed)
        for _, layer in self.all_layers():
            layer.init_expert(k, mode, generator)

    def set_coefficients(self, coefficients: Tensor | None) -> None:
        """(B, G, n) per-sample, per-group coefficients of experts 0..n-1 (group order: `groups`); None clears."""
        for g, group in enumerate(self.layers):
            for layer in self.layers[group]:
                layer.set_coefficients(None if coefficients is None else coefficients[:, g])

    def clear(self) -> None:
        self.set_coefficients(None)

    @contextmanager
    def routing(self, coefficients: Tensor) -> Iterator[None]:
        """Forwards inside use these coefficients; afterwards the layers are their base layers again."""
        self.set_coefficients(coefficients)
        try:
            yield
        finally:
            self.clear()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Forwards inside use the base layers only, whatever coefficients are set."""
        saved = [(layer, layer.enabled) for _, layer in self.all_layers()]
        for layer, _ in saved:
            layer.enabled = False
        try:
            yield
        finally:
            for layer, enabled in saved:
                layer.enabled = enabled
