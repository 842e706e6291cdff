"""Reusable continual mechanics as Lightning callbacks."""

from callbacks.base import ContinualCallback
from callbacks.checkpoint import ContinualCheckpoint
from callbacks.continual_metrics import ContinualMetrics, summarize
from callbacks.data_engine import DataEngine
from callbacks.ema_teacher import EMATeacher
from callbacks.expert_freezing import ExpertFreezing
from callbacks.lora_merge import LoRAMerge
from callbacks.task_switch import TaskSwitch
from callbacks.throughput import Throughput

__all__ = [
    "ContinualCallback",
    "ContinualCheckpoint",
    "ContinualMetrics",
    "DataEngine",
    "EMATeacher",
    "ExpertFreezing",
    "LoRAMerge",
    "TaskSwitch",
    "Throughput",
    "summarize",
]
