"""Several pre-trained transformers read the same image; their class tokens are fused into one feature.

`MSIDF` is LMSRR's Multi-Scale Interaction and Dynamic Fusion: the T class tokens are stacked as T
input channels over the D feature positions, each branch is a Conv1d(T -> 1) with its own kernel size,
and the branch outputs are summed with softmax-normalised learnable weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.backbones import build_backbone, register_backbone
from lightning_modules.nn.vit import ViTSource


class MSIDF(nn.Module):
    """[B, T, D] stacked class tokens -> [B, D].

    `fusion_weights: faithful` keeps the released code's quirk: one softmax weight more than there are
    branches, the last one unused (the used weights sum to m/(m+1) at initialisation). `normalized`
    gives every branch a weight and nothing else, so they sum to 1.
    """

    def __init__(
        self,
        num_sources: int,
        kernel_sizes: Sequence[int] = (3, 5),
        fusion_weights: Literal["faithful", "normalized"] = "faithful",
    ):
        super().__init__()
        if fusion_weights not in ("faithful", "normalized"):
            raise ConfigError(f"fusion_weights: {fusion_weights!r} is not one of 'faithful', 'normalized'")
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ConfigError(f"kernel_sizes: {list(kernel_sizes)}; give odd sizes, e.g. [3, 5], so D is kept")
        self.branches = nn.ModuleList(nn.Conv1d(num_sources, 1, k, padding=k // 2) for k in kernel_sizes)
        for conv in self.branches:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.constant_(conv.bias, 0.1)
        extra = 1 if fusion_weights == "faithful" else 0
        self.weights = nn.Parameter(torch.ones(len(self.branches) + extra))

    def branch_weights(self) -> Tensor:
        """The weight of each branch (softmax over all learnable weights, unused ones dropped)."""
        return self.weights.softmax(dim=0)[: len(self.branches)]

    def forward(self, tokens: Tensor) -> Tensor:
        pi = self.branch_weights()
        return sum(pi[i] * branch(tokens) for i, branch in enumerate(self.branches)).squeeze(1)


@dataclass
class MultiLevelOutput:
    """What one multi-source forward yields: the fused feature, the output of every trainable block of
    every source (levels, source-major), and the same levels from a reference copy of the blocks."""

    fused: Tensor
    levels: list[Tensor]
    reference_levels: list[Tensor]


@register_backbone("multi_source")
class MultiSourceFusion(nn.Module):
    """T backbones of the `ViTSource` kind (`sources`: a list of `{name, args}`), fused by MSIDF.

    Sources must share a feature width D; set `feature_dim` to project each to D with a linear layer
    when they differ (an extension: the released code uses two ViT-B/16, both 768 wide).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        sources: Sequence[dict[str, Any]] = ({"name": "hf_vit"}, {"name": "hf_vit"}),
        kernel_sizes: Sequence[int] = (3, 5),
        fusion_weights: Literal["faithful", "normalized"] = "faithful",
        feature_dim: int | None = None,
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        super().__init__()
        if not sources:
            raise ConfigError("backbone_args.sources: give at least one source, e.g. [{name: hf_vit}]")
        built = []
        for i, spec in enumerate(sources):
            if "name" not in spec or set(spec) - {"name", "args"}:
                raise ConfigError(f"backbone_args.sources[{i}]: write {{name: <backbone>, args: {{...}}}}, got {spec}")
            source = build_backbone(spec["name"], input_shape, input_stats=input_stats, **(spec.get("args") or {}))
            if not isinstance(source, ViTSource):
                raise ConfigError(f"backbone_args.sources[{i}]: {spec['name']!r} is not a ViT; use hf_vit or timm")
            built.append(source)
        self.sources = nn.ModuleList(built)
        widths = [s.out_features for s in built]
        if feature_dim is None and len(set(widths)) > 1:
            raise ConfigError(f"backbone_args.sources have widths {widths}: set backbone_args.feature_dim to fuse them")
        self.out_features = feature_dim or widths[0]
        self.projections = nn.ModuleList(
            nn.Identity() if w == self.out_features else nn.Linear(w, self.out_features) for w in widths
        )
        self.fusion = MSIDF(len(built), kernel_sizes, fusion_weights)

    def trainable_blocks(self) -> nn.ModuleList:
        """The trainable blocks of every source, one ModuleList per source (LMSRR snapshots these)."""
        return nn.ModuleList(s.blocks for s in self.sources)

    def forward_levels(self, x: Tensor, reference: nn.ModuleList | None = None) -> MultiLevelOutput:
        """One pass over every source; with `reference` (a `trainable_blocks()` copy), the copy also runs
        on the same frozen prefix, without gradients: its levels equal a full pass of the copied network."""
        tokens, levels, reference_levels = [], [], []
        for j, (source, project) in enumerate(zip(self.sources, self.projections, strict=True)):
            h = source.prefix(x)
            own = source.run_blocks(h)
            levels += own
            tokens.append(project(source.pool(own[-1] if own else h)))
            if reference is not None:
                with torch.no_grad():
                    reference_levels += source.run_blocks(h, reference[j])
        return MultiLevelOutput(self.fusion(torch.stack(tokens, dim=1)), levels, reference_levels)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_levels(x).fused
