"""Continual datamodules: a stream of tasks read from real on-disk formats, with embedded defaults."""

from datamodules.base import ClassIncrementalDataModule, ContinualDataModule, TaskStream
from datamodules.cifar import SplitCIFAR10, SplitCIFAR100
from datamodules.concepts import ConceptDataModule, ConceptStream
from datamodules.image_folder import SplitImageFolder
from datamodules.lmsrr_benchmarks import SplitCars196, SplitCUB200, SplitImageNetR
from datamodules.removal import RemovalDataModule, RemovalStream
from datamodules.rewards import RewardDataModule, RewardStream
from datamodules.robot import RobotDataModule
from datamodules.rotated_digits import RotatedDigits
from datamodules.split_digits import SplitDigits
from datamodules.tiny_imagenet import SplitTinyImageNet
from datamodules.webdataset_shards import SplitWebDataset

__all__ = [
    "ClassIncrementalDataModule",
    "ConceptDataModule",
    "ConceptStream",
    "ContinualDataModule",
    "RemovalDataModule",
    "RemovalStream",
    "RewardDataModule",
    "RewardStream",
    "RobotDataModule",
    "RotatedDigits",
    "SplitCIFAR10",
    "SplitCIFAR100",
    "SplitCUB200",
    "SplitCars196",
    "SplitDigits",
    "SplitImageFolder",
    "SplitImageNetR",
    "SplitTinyImageNet",
    "SplitWebDataset",
    "TaskStream",
]
