"""Continual datamodules: a stream of tasks read from real on-disk formats, with embedded defaults."""

from datamodules.base import ClassIncrementalDataModule, ContinualDataModule, TaskStream
from datamodules.split_digits import SplitDigits

__all__ = ["ClassIncrementalDataModule", "ContinualDataModule", "SplitDigits", "TaskStream"]
