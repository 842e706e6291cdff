"""Text-to-image methods: lifelong concept learning (R2MoE and its baselines) and reward-incremental tuning
(RID and its baselines)."""

from lightning_modules.diffusion.base import ConceptDiffusionModule, TextToImageModule
from lightning_modules.diffusion.custom_diffusion import CustomDiffusion
from lightning_modules.diffusion.joint_reward import JointReward
from lightning_modules.diffusion.lora_group import LoRAGroup
from lightning_modules.diffusion.r2moe import R2MoE
from lightning_modules.diffusion.reward_tuning import RewardTuningModule
from lightning_modules.diffusion.rid import RID, RewardDistillation
from lightning_modules.diffusion.sequential_lora import SequentialLoRA
from lightning_modules.diffusion.sequential_reward import SequentialReward

__all__ = [
    "RID",
    "ConceptDiffusionModule",
    "CustomDiffusion",
    "JointReward",
    "LoRAGroup",
    "R2MoE",
    "RewardDistillation",
    "RewardTuningModule",
    "SequentialLoRA",
    "SequentialReward",
    "TextToImageModule",
]
