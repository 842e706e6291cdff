"""Feature extractors by name. A backbone maps inputs to features and exposes `out_features`;
the classification module puts its own linear head on top. Later families register more here."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.init import check_init, initialise

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable:
    """Class decorator: make a backbone buildable as `model.backbone: <name>`."""

    def wrap(cls):
        BACKBONES[name] = cls
        return cls

    return wrap


def build_backbone(
    name: str,
    input_shape: Sequence[int],
    input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    **kwargs,
) -> nn.Module:
    """Builds the backbone registered as `name` for inputs of `input_shape` (without the batch dimension).
    Backbones that take `input_stats` also get the (mean, std) the data is normalised with."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    cls = BACKBONES[name]
    if "input_stats" in inspect.signature(cls).parameters:
        kwargs.setdefault("input_stats", input_stats)
    try:
        return cls(input_shape=tuple(input_shape), **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone_args for {name!r}: {err}") from None


@register_backbone("mlp")
class MLP(nn.Module):
    """Flatten, then `hidden` fully connected ReLU layers (Mammoth's MNIST MLP is hidden=(100, 100)).

    `init` (see `lightning_modules.nn.init`): `xavier_uniform` with zero bias by default, as Mammoth's MLP, so
    that Mammoth's settings reproduce Mammoth's numbers; `kaiming_uniform` is PyTorch's default.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (100, 100), init: str = "xavier_uniform"):
        super().__init__()
        self.init = check_init(init, "model.backbone_args.init")
        if not hidden:
            raise ConfigError("model.backbone_args.hidden: give at least one hidden width, e.g. [100, 100]")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = initialise(nn.Sequential(*layers), init)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


@register_backbone("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 for small images, as Mammoth uses on CIFAR and Tiny-ImageNet: a 3x3 stride-1 stem
    without max-pooling, four stages of two basic blocks (widths nf, 2nf, 4nf, 8nf; strides 1, 2, 2, 2),
    global average pooling. 11.17 M parameters at nf = 64, 8 * nf features.

    `init`: `kaiming_uniform` (PyTorch's default, which Mammoth's ResNet keeps), `kaiming_normal` (torchvision's
    ResNet) or `xavier_uniform`."""

    def __init__(self, input_shape: Sequence[int], nf: int = 64, init: str = "kaiming_uniform"):
        super().__init__()
        self.init = check_init(init, "model.backbone_args.init")
        channels = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(channels, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
        stages, cin = [], nf
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = nf * 2**i
            stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_features = cin
        if init != "kaiming_uniform":  # the layers were just built with PyTorch's default
            initialise(self, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))
