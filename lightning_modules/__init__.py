"""Methods as LightningModules, one file per method, grouped by family; shared parts in `nn/`."""

from lightning_modules.base import ContinualModule
from lightning_modules.classification import (
    DER,
    ER,
    EWC,
    LMSRR,
    ClassIncrementalModule,
    DERpp,
    Finetune,
    ICaRL,
    Joint,
    LwF,
    ReplayModule,
)

__all__ = [
    "DER",
    "ER",
    "EWC",
    "ClassIncrementalModule",
    "ContinualModule",
    "DERpp",
    "Finetune",
    "ICaRL",
    "Joint",
    "LMSRR",
    "LwF",
    "ReplayModule",
]
