"""Lifelong robot imitation: DMPEL and the LIBERO baselines, all on the foundation policy."""

from lightning_modules.robot.base import RobotImitationModule
from lightning_modules.robot.dmpel import DMPEL
from lightning_modules.robot.er import ER, RobotER
from lightning_modules.robot.ewc import EWC, RobotEWC
from lightning_modules.robot.iscil import IsCiL
from lightning_modules.robot.l2m import L2M
from lightning_modules.robot.packnet import PackNet
from lightning_modules.robot.sequential import Sequential
from lightning_modules.robot.tail import TAIL

__all__ = [
    "DMPEL",
    "ER",
    "EWC",
    "L2M",
    "TAIL",
    "IsCiL",
    "PackNet",
    "RobotER",
    "RobotEWC",
    "RobotImitationModule",
    "Sequential",
]
