"""What a robot-imitation method must know about its stream before it is built (the CLI links it from
the data): each task's language instruction, the observation keys and shapes, the action size, the
window length, and `env`, the recipe the rollout evaluation builds simulator environments from."""

from __future__ import annotations

from dataclasses import dataclass, field

from datamodules.base import TaskStream


def is_image_key(key: str) -> bool:
    """Camera keys end in `_rgb` (LIBERO's naming); every other observation key is low-dimensional."""
    return key.endswith("_rgb")


@dataclass(frozen=True)
class EnvSpec:
    """How to build the simulator of each task (picklable: rollout worker processes receive it).

    suite: "metaworld" or "libero". env_names: one simulator id per task (Meta-World: "hammer-v3";
    LIBERO: the bddl task name). horizon: policy steps per episode; settle_steps: zero actions
    executed after reset before the policy acts (LIBERO: 5). obs_keys: the dataset keys the policy
    reads, in order; image_size: camera height = width for `*_rgb` keys (0: no cameras).
    eval_seed: base seed of the evaluation episodes' initial states (never the demonstrations' seed).
    """

    suite: str
    env_names: tuple[str, ...]
    horizon: int = 200
    settle_steps: int = 0
    obs_keys: tuple[str, ...] = ()
    image_size: int = 0
    eval_seed: int = 1000
    #: extra keyword arguments for the suite's environment builder (e.g. LIBERO's benchmark folder)
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RobotTaskStream(TaskStream):
    """A TaskStream plus what robot policies need. `obs_shapes` maps each observation key to its
    per-step shape: (d,) for low-dim keys, (3, H, W) for `*_rgb` camera keys (float in [0, 1])."""

    instructions: tuple[str, ...] = ()
    obs_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    action_dim: int = 0
    window: int = 10
    env: EnvSpec | None = field(default=None)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.obs_shapes)

    @property
    def image_keys(self) -> list[str]:
        return [k for k, _ in self.obs_shapes if is_image_key(k)]

    @property
    def lowdim_keys(self) -> list[str]:
        return [k for k, _ in self.obs_shapes if not is_image_key(k)]
