"""Rewards for reward-gradient tuning: images in [0, 1] (B x 3 x H x W) and their prompts -> one score per
image, higher is better. `reward(images, prompts)` is what training differentiates; `reward.measure(...)`
is the value evaluation reports (for compressibility the real JPEG size, for the others the same).
`build_reward(spec)` makes one from its config entry (a name, or {name, options})."""

from lightning_modules.nn.rewards.base import REWARDS, Reward, build_reward

__all__ = ["REWARDS", "Reward", "build_reward"]
