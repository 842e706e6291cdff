"""Object-removal methods (RORem and its discriminator), one data-engine round per task."""

from lightning_modules.removal.base import RemovalModule
from lightning_modules.removal.discriminator import RemovalDiscriminator
from lightning_modules.removal.rorem import RORem

__all__ = ["RORem", "RemovalDiscriminator", "RemovalModule"]
