"""Class-incremental image classification: one file per method."""

from lightning_modules.classification.base import ClassIncrementalModule, ReplayModule
from lightning_modules.classification.der import DER
from lightning_modules.classification.derpp import DERpp
from lightning_modules.classification.er import ER
from lightning_modules.classification.ewc import EWC
from lightning_modules.classification.finetune import Finetune
from lightning_modules.classification.icarl import ICaRL
from lightning_modules.classification.joint import Joint
from lightning_modules.classification.lmsrr import LMSRR
from lightning_modules.classification.lwf import LwF

__all__ = [
    "DER",
    "ER",
    "EWC",
    "ClassIncrementalModule",
    "DERpp",
    "Finetune",
    "ICaRL",
    "Joint",
    "LMSRR",
    "LwF",
    "ReplayModule",
]
