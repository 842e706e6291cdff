"""Weight initialisation as configuration: one named scheme applied to every Linear and Conv layer of a module.

Schemes (`init` of the backbones and `head_init` of the classifiers):

- `xavier_uniform`: weights U(-a, a), a = sqrt(6 / (fan_in + fan_out)), bias 0: Mammoth's `xavier()`, which
  its MNIST MLP applies to every layer, classifier included.
- `kaiming_uniform`: PyTorch's own default for Linear/Conv (kaiming_uniform with a = sqrt(5): weights
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))); what Mammoth's ResNet-18 keeps.
- `kaiming_normal`: torchvision's ResNet: weights N(0, 2 / fan_out) (fan_out mode, ReLU gain), bias 0;
  batch-norm weight 1 and bias 0.
"""

from __future__ import annotations

import math

from torch import nn

from cli.errors import ConfigError

INIT_SCHEMES = ("xavier_uniform", "kaiming_uniform", "kaiming_normal")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_init(scheme: str, option: str) -> str:
    """`scheme` if it is a known one, else one ConfigError line naming `option` and the choices."""
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"{option}: unknown initialisation {scheme!r}; choose one of: {', '.join(INIT_SCHEMES)}")
    return scheme


def initialise(module: nn.Module, scheme: str) -> nn.Module:
    """Re-initialises every Linear/Conv layer of `module` (and batch norms for `kaiming_normal`) in place."""
    check_init(scheme, "init")
    for m in module.modules():
        if isinstance(m, _LAYERS):
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif scheme == "kaiming_uniform":
                m.reset_parameters()  # PyTorch's default, whatever the layer type
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif scheme == "kaiming_normal" and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def expected_std(scheme: str, fan_in: int, fan_out: int) -> float:
    """The weights' standard deviation a scheme aims at, for a layer of these fans (for checks and tests)."""
    check_init(scheme, "init")
    if scheme == "xavier_uniform":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "kaiming_uniform":
        return 1.0 / math.sqrt(3.0 * fan_in)
    return math.sqrt(2.0 / fan_out)
