"""The reward interface and the registry that builds rewards by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cli.errors import ConfigError


class Reward(nn.Module):
    """A frozen scoring function. Subclasses implement `forward(images, prompts) -> (B,)`; `differentiable`
    says whether gradients reach the images; `default_loss_scale` is the factor the reward loss
    -scale * r is given when a config does not set one (chosen so that the rewards' gradients are of
    comparable size on the small pretrained base)."""

    differentiable: bool = True
    default_loss_scale: float = 1.0
    #: what the measured value is, for tables ("mean luma in [0, 1]", "kB", ...)
    unit: str = ""

    def train(self, mode: bool = True) -> Reward:
        return super().train(False)  # a measuring instrument: dropout off, always

    def measure(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The value evaluation reports (no gradient)."""
        with torch.no_grad():
            return self(images, prompts).float()


def _registry() -> dict[str, type[Reward]]:
    from lightning_modules.nn.rewards.clip_rewards import Aesthetic, ClipScore, HPSv2, PickScore
    from lightning_modules.nn.rewards.compressibility import Compressibility
    from lightning_modules.nn.rewards.statistics import Brightness, Colourfulness, Contrast, Darkness

    return {
        "compressibility": Compressibility,
        "colourfulness": Colourfulness,
        "brightness": Brightness,
        "darkness": Darkness,
        "contrast": Contrast,
        "aesthetic": Aesthetic,
        "hpsv2": HPSv2,
        "pickscore": PickScore,
        "clip_score": ClipScore,
    }


#: the reward names a config may use
REWARDS = (
    "compressibility",
    "colourfulness",
    "brightness",
    "darkness",
    "contrast",
    "aesthetic",
    "hpsv2",
    "pickscore",
    "clip_score",
)


def build_reward(name: str, options: dict[str, Any] | None = None, where: str = "reward") -> Reward:
    """The reward `name` built with `options` (its constructor's keyword arguments); an unknown name or
    option is one ConfigError line naming `where` and the valid choices."""
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"{where}: unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    cls = registry[name]
    try:
        return cls(**(options or {}))
    except TypeError as err:
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigError(
            f"{where}.options: {err} ({name} takes {', '.join(valid) or 'no options'})".replace("__init__() ", "")
        ) from None
