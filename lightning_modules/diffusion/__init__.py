"""Text-to-image methods: lifelong concept learning (R2MoE and its baselines)."""

from lightning_modules.diffusion.base import ConceptDiffusionModule
from lightning_modules.diffusion.custom_diffusion import CustomDiffusion
from lightning_modules.diffusion.r2moe import R2MoE
from lightning_modules.diffusion.sequential_lora import SequentialLoRA

__all__ = ["ConceptDiffusionModule", "CustomDiffusion", "R2MoE", "SequentialLoRA"]
