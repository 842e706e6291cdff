"""LoRA group: a fresh LoRA per reward (B = 0, so the model starts where the last reward left it), the
earlier rewards' adapters frozen, all of them active and summed. RID without its distillation.

    L = -s_t r_t(x_0(theta + sum_{i<t} B_i A_i + B_t A_t))     only B_t, A_t train
"""

from __future__ import annotations

from lightning_modules.diffusion.reward_tuning import RewardTuningModule


class LoRAGroup(RewardTuningModule):
    """A new adapter per reward, earlier ones frozen (see `RewardTuningModule` for the arguments)."""

    ADAPTER_PER_TASK = True
