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
from lightning_modules.robot import (
    DMPEL,
    L2M,
    TAIL,
    IsCiL,
    PackNet,
    RobotER,
    RobotEWC,
    RobotImitationModule,
    Sequential,
)

__all__ = [
    "DER",
    "DMPEL",
    "ER",
    "EWC",
    "ClassIncrementalModule",
    "ConceptDiffusionModule",
    "ContinualModule",
    "CustomDiffusion",
    "DERpp",
    "Finetune",
    "ICaRL",
    "IsCiL",
    "Joint",
    "L2M",
    "LMSRR",
    "LwF",
    "PackNet",
    "R2MoE",
    "ReplayModule",
    "RobotER",
    "RobotEWC",
    "RobotImitationModule",
    "Sequential",
    "SequentialLoRA",
    "TAIL",
]
