"""Sequential: behaviour cloning of the whole policy on each task in turn, nothing against forgetting."""

from __future__ import annotations

from lightning_modules.robot.base import RobotImitationModule


class Sequential(RobotImitationModule):
    """LIBERO's `base` lifelong algorithm (the lower bound): every parameter trains on the current task's
    demonstrations with the NLL of the base class; the optimizer is rebuilt at each task."""
