"""Object-removal methods (RORem, its discriminator, and the 4-step, preference and RL stages that follow it),
one data-engine round or one stage per task."""

from lightning_modules.removal.base import RemovalModule
from lightning_modules.removal.discriminator import RemovalDiscriminator
from lightning_modules.removal.rorem import RORem
from lightning_modules.removal.stages import DiffusionDPO, LCMDistill, RemovalPPO, RemovalStages

__all__ = [
    "DiffusionDPO",
    "LCMDistill",
    "RORem",
    "RemovalDiscriminator",
    "RemovalModule",
    "RemovalPPO",
    "RemovalStages",
]
