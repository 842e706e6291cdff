"""Robot imitation data: LIBERO / robomimic HDF5 demonstrations, Meta-World's scripted-expert demos, named
task suites and the datamodule that serves them as a lifelong stream."""

from datamodules.robot.datamodule import RobotDataModule
from datamodules.robot.demos import DemoSettings, make_suite_demos, make_task_demos
from datamodules.robot.hdf5 import DemoFileInfo, DemoWindows, read_info
from datamodules.robot.stream import EnvSpec, RobotTaskStream
from datamodules.robot.suites import SUITE_NAMES, Suite, resolve_suite

__all__ = [
    "SUITE_NAMES",
    "DemoFileInfo",
    "DemoSettings",
    "DemoWindows",
    "EnvSpec",
    "RobotDataModule",
    "RobotTaskStream",
    "Suite",
    "make_suite_demos",
    "make_task_demos",
    "read_info",
    "resolve_suite",
]
