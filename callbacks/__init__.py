"""Reusable continual mechanics as Lightning callbacks."""

from callbacks.base import ContinualCallback
from callbacks.continual_metrics import ContinualMetrics, summarize
from callbacks.task_switch import TaskSwitch

__all__ = ["ContinualCallback", "ContinualMetrics", "TaskSwitch", "summarize"]
