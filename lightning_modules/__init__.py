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
from lightning_modules.diffusion import ConceptDiffusionModule, CustomDiffusion, R2MoE, SequentialLoRA

__all__ = [
    "DER",
    "ER",
    "EWC",
    "ClassIncrementalModule",
    "ConceptDiffusionModule",
    "ContinualModule",
    "CustomDiffusion",
    "DERpp",
    "Finetune",
    "ICaRL",
    "Joint",
    "LMSRR",
    "LwF",
    "R2MoE",
    "ReplayModule",
    "SequentialLoRA",
]
