"""Class-incremental image classification: one file per method."""

from lightning_modules.classification.base import ClassIncrementalModule
from lightning_modules.classification.er import ER
from lightning_modules.classification.finetune import Finetune
from lightning_modules.classification.joint import Joint

__all__ = ["ER", "ClassIncrementalModule", "Finetune", "Joint"]
