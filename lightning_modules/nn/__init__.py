"""Parts shared by several methods: backbones, replay buffers, distributed helpers."""

from lightning_modules.nn.backbones import BACKBONES, MLP, build_backbone, register_backbone
from lightning_modules.nn.buffer import ReservoirBuffer
from lightning_modules.nn.fusion import MSIDF, MultiSourceFusion
from lightning_modules.nn.vit import HFViT, TimmViT, ViTSource

__all__ = [
    "BACKBONES",
    "MLP",
    "MSIDF",
    "HFViT",
    "MultiSourceFusion",
    "ReservoirBuffer",
    "TimmViT",
    "ViTSource",
    "build_backbone",
    "register_backbone",
]
