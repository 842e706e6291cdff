"""Joint reward tuning, the upper bound: one LoRA maximises the sum of every reward seen so far (after the
last task: all of them), on the prompts of all those rewards (`data.train_on: seen`).

    L = -sum_{j<=t} s_j r_j(x_0(theta + BA))
"""

from __future__ import annotations

from lightning_modules.diffusion.reward_tuning import RewardTuningModule


class JointReward(RewardTuningModule):
    """One adapter, the rewards of all seen tasks summed (see `RewardTuningModule` for the arguments)."""

    ADAPTER_PER_TASK = False

    def rewarded_tasks(self) -> list[int]:
        return list(range(self.current_task + 1))
