"""Custom Diffusion (Kumari et al., CVPR 2023) run sequentially: the cross-attention key and value
projections are fine-tuned, and each concept gets a new modifier token.

    L = || eps - eps_theta(z_t, t, c) ||^2   (masked; half of each batch is regularisation images)

Concept after concept, the same K/V weights move, so earlier concepts drift: the baseline that
forgets, and the reference for R2MoE's storage (a full K/V delta per concept).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.diffusion.base import ConceptDiffusionModule
from lightning_modules.nn.diffusion.experts import CROSS_ATTENTION_KV
from lightning_modules.nn.diffusion.experts import detach_start_token as detach_start_token_kv


class CustomDiffusion(ConceptDiffusionModule):
    """Args: kv_lr: learning rate of the K/V weights (Custom Diffusion: 1e-5 x batch size 2 x GPUs 1 = 2e-5);
    detach_start_token: keep the start-of-text token's K/V out of the gradient, as Custom Diffusion does."""

    def __init__(self, *args: Any, kv_lr: float = 2e-5, detach_start_token: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kv_lr = kv_lr
        self.kv_names = [n for n, _ in self.parts.unet.named_modules() if CROSS_ATTENTION_KV.match(n)]
        for p in self.kv_parameters():
            p.requires_grad_(True)
        if detach_start_token:
            detach_start_token_kv(self.parts.unet)

    def kv_parameters(self) -> list[nn.Parameter]:
        return [self.parts.unet.get_submodule(n).weight for n in self.kv_names]

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return [{"params": self.kv_parameters(), "lr": self.kv_lr}] + super().trainable_parameters()

    def is_delta(self, name: str) -> bool:
        return super().is_delta(name) or bool(
            CROSS_ATTENTION_KV.match(name.removeprefix("parts.unet.").removesuffix(".weight"))
        )

    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """`unet_kv.safetensors`: the fine-tuned cross-attention K/V weights under the UNet's own names
        (`pipe.unet.load_state_dict(load_file(...), strict=False)`; diffusers 0.42.1's `load_attn_procs` does
        not install Custom Diffusion weights unless given its private `_pipeline`), and the concepts' tokens."""
        from safetensors.torch import save_file

        from lightning_modules.nn.diffusion.diffusers_export import cast

        state = cast({f"{n}.weight": w for n, w in zip(self.kv_names, self.kv_parameters(), strict=True)}, dtype)
        save_file(state, f"{folder}/unet_kv.safetensors", metadata={"format": "pt"})
        return {
            "unet_kv": "unet_kv.safetensors",
            "concepts": self.save_diffusers_tokens(folder, range(self.current_task + 1), dtype),
        }
