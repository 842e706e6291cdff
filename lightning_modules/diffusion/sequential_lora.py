"""Sequential LoRA: one peft LoRA on the UNet's attention projections, trained concept after concept
(each concept also gets its own token). Nothing protects earlier concepts: the baseline that forgets.

    L = || eps - eps_theta+BA(z_t, t, c) ||^2   (masked; half of each batch is regularisation images)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.diffusion.base import ConceptDiffusionModule


class SequentialLoRA(ConceptDiffusionModule):
    """Args: rank / lora_alpha: the LoRA's rank and scale (alpha / rank); target_modules: the attention
    projections it wraps (self- and cross-attention); lora_lr: its learning rate."""

    def __init__(
        self,
        *args: Any,
        rank: int = 4,
        lora_alpha: float = 4.0,
        target_modules: list[str] | None = None,
        lora_lr: float = 1e-4,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        from peft import LoraConfig

        targets = target_modules or ["to_q", "to_k", "to_v", "to_out.0"]
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=targets)
        self.parts.unet.add_adapter(config, adapter_name="concepts")
        self.lora_lr = lora_lr

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.parts.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return [{"params": self.lora_parameters(), "lr": self.lora_lr}] + super().trainable_parameters()

    def is_delta(self, name: str) -> bool:
        return super().is_delta(name) or ".lora_A." in name or ".lora_B." in name

    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """`lora.safetensors` (the UNet LoRA with its peft config, for `load_lora_weights`) and the tokens of
        the concepts trained so far."""
        from peft.utils import get_peft_model_state_dict

        from lightning_modules.nn.diffusion.diffusers_export import cast, save_unet_lora

        unet = self.parts.unet
        state = cast(get_peft_model_state_dict(unet, adapter_name="concepts"), dtype)
        lora = save_unet_lora(folder, "lora.safetensors", state, unet.peft_config["concepts"].to_dict())
        return {"lora": lora, "concepts": self.save_diffusers_tokens(folder, range(self.current_task + 1), dtype)}
