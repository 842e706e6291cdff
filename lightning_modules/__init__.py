"""Methods as LightningModules, one file per method, grouped by family; shared parts in `nn/`."""

from lightning_modules.base import ContinualModule
from lightning_modules.classification import ER, ClassIncrementalModule, Finetune, Joint

__all__ = ["ER", "ClassIncrementalModule", "ContinualModule", "Finetune", "Joint"]
