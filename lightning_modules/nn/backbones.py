"""Feature extractors by name. A backbone maps inputs to features and exposes `out_features`;
the classification module puts its own linear head on top. Later families register more here."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cli.errors import ConfigError

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Class decorator: make a backbone buildable as `model.backbone: <name>`."""

    def wrap(cls):
        BACKBONES[name] = cls
        return cls

    return wrap


def build_backbone(name: str, input_shape: Sequence[int], **kwargs) -> nn.Module:
    """Builds the backbone registered as `name` for inputs of `input_shape` (without the batch dimension)."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    try:
        return BACKBONES[name](input_shape=tuple(input_shape), **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone_args for {name!r}: {err}") from None


@register_backbone("mlp")
class MLP(nn.Module):
    """Flatten, then `hidden` fully connected ReLU layers (Mammoth's MNIST MLP is hidden=(100, 100))."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (100, 100)):
        super().__init__()
        if not hidden:
            raise ConfigError("model.backbone_args.hidden: give at least one hidden width, e.g. [100, 100]")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
