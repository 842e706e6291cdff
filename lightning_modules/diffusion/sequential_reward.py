"""Sequential reward tuning: one LoRA, tuned reward after reward by reward gradients. Nothing protects the
earlier rewards: the baseline that forgets (metric-wise and in the images' structure).

    L = -s_t r_t(x_0(theta + BA))     x_0 sampled by DDIM, gradient through the last K steps
"""

from __future__ import annotations

from lightning_modules.diffusion.reward_tuning import RewardTuningModule


class SequentialReward(RewardTuningModule):
    """One adapter every reward trains in turn (see `RewardTuningModule` for the arguments)."""

    ADAPTER_PER_TASK = False
