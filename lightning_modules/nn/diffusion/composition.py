"""Multi-concept composition by masked regional cross-attention (R2MoE's released sampling path).

In every cross-attention layer with at least `min_tokens` query positions, each concept i attends to
its own region prompt through its own routing (K_i, V_i), and its output counts only inside its mask
M_i (max-pooled to the layer's resolution); the background prompt, through the base model, fills
1 - sum_i M_i. Coarser layers attend to the full prompt with the concepts' gates averaged. The
unconditional half of the CFG batch reads the empty prompt in every region.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.errors import ConfigError


def read_masks(paths: list[str], size: int) -> Tensor:
    """Binary masks (K x 1 x size x size) from image files (white = the concept's region)."""
    from PIL import Image

    masks = []
    for path in paths:
        try:
            image = Image.open(path).convert("L").resize((size, size), Image.NEAREST)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--mask {path}: cannot read it as an image ({err})") from None
        mask = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, size, size) > 127
        if not mask.any():
            raise ConfigError(f"--mask {path}: selects no pixels (white marks the concept's region); draw the region")
        masks.append(mask)
    return torch.stack(masks).float()


@dataclass
class Region:
    """One text source of a regional layer: its CFG context (2B x L x d), how to route the K/V layers
    while reading it, and its mask (1 x 1 x h x w, latent resolution; None for the full prompt)."""

    context: Tensor
    routing: Callable[[], contextlib.AbstractContextManager]
    mask: Tensor | None = None


class RegionalCrossAttention:
    """A diffusers attention processor for `attn2` layers (no residual, no norms, 3-D inputs)."""

    def __init__(self, regions: list[Region], background: Region, full: Region, min_tokens: int):
        self.regions, self.background, self.full, self.min_tokens = regions, background, full, min_tokens

    def _attend(self, attn, query: Tensor, region: Region) -> Tensor:
        with region.routing():
            key = attn.head_to_batch_dim(attn.to_k(region.context))
            value = attn.head_to_batch_dim(attn.to_v(region.context))
        probs = attn.get_attention_scores(query, key, None)
        return attn.batch_to_head_dim(torch.bmm(probs, value))

    def __call__(
        self, attn, hidden_states: Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs
    ) -> Tensor:
        if hidden_states.dim() != 3 or attn.residual_connection or attn.group_norm is not None:
            raise ValueError("regional cross-attention supports the UNet's transformer attn2 layers only")
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        n = hidden_states.shape[1]
        if n < self.min_tokens:
            out = self._attend(attn, query, self.full)
        else:
            side = math.isqrt(n)
            covered = torch.zeros(1, 1, side, side, device=hidden_states.device)
            out = 0
            for region in self.regions:
                mask = F.adaptive_max_pool2d(region.mask.to(hidden_states.device), side)
                covered = covered + mask
                out = out + self._attend(attn, query, region) * mask.flatten(2).transpose(1, 2).to(query.dtype)
            rest = (1 - covered.clamp(max=1)).flatten(2).transpose(1, 2).to(query.dtype)
            out = out + self._attend(attn, query, self.background) * rest
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def regional_attention(unet, processor: RegionalCrossAttention):
    """Installs `processor` on every cross-attention layer of `unet` for the duration of the block."""
    layers = [m for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "set_processor")]
    saved = [m.processor for m in layers]
    for m in layers:
        m.set_processor(processor)
    try:
        yield
    finally:
        for m, p in zip(layers, saved, strict=True):
            m.set_processor(p)
