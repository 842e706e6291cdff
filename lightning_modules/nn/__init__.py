"""Parts shared by several methods: backbones, replay buffers, distributed helpers."""

from lightning_modules.nn.backbones import BACKBONES, MLP, build_backbone, register_backbone
from lightning_modules.nn.buffer import ReservoirBuffer

__all__ = ["BACKBONES", "MLP", "ReservoirBuffer", "build_backbone", "register_backbone"]
