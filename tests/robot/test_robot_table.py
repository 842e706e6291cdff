"""benchmarks/robot.py's foundation policy: the file it trains when missing is the one every CW config
loads, and the table names the weights its runs started from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

import benchmarks.robot as robot_table
from benchmarks.robot import FOUNDATION, foundation_line, label_name, tag

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "robot"


def test_the_foundation_the_table_trains_is_the_one_every_cw_config_loads():
    configs = sorted(CONFIGS.glob("*_cw3.yaml")) + sorted(CONFIGS.glob("*_cw10.yaml"))
    assert len(configs) >= 16
    for config in configs:
        assert yaml.safe_load(config.read_text())["model"]["init_args"]["policy_checkpoint"] == FOUNDATION, config
    pretrain = yaml.safe_load((CONFIGS / "pretrain_metaworld.yaml").read_text())
    assert f"{pretrain['trainer']['default_root_dir']}/checkpoints/last.ckpt" == FOUNDATION


def test_the_table_names_one_foundation_several_or_none():
    row = {"foundation": "554b0bdc7778"}
    assert "`554b0bdc7778` (the same for every run)" in foundation_line({"tail": [row, row], "dmpel": [row]})
    mixed = foundation_line({"tail": [row], "dmpel": [{"foundation": "0f36f6ebb1d4"}]})
    assert "different weights (`0f36f6ebb1d4`, `554b0bdc7778`)" in mixed
    assert "unknown" in foundation_line({"tail": [row], "dmpel": [{}]})
    assert (
        foundation_line({"tail": [{}], "dmpel": [{"foundation": None}]})
        == "Foundation policy: not recorded for these runs."
    )


def test_a_replicate_table_gets_its_own_name_and_labels_are_checked():
    assert tag("cw3", None) == "cw3" and tag("cw10", None, "second_foundation") == "cw10_second_foundation"
    assert tag("cw3", 20, "second_foundation") == "cw3_20rollouts_second_foundation"
    assert label_name("run_2") == "run_2"
    for bad in ["", "Second", "a b", "../x", "é"]:
        with pytest.raises(argparse.ArgumentTypeError, match="lower-case letters"):
            label_name(bad)


def test_a_missing_foundation_is_trained_once_before_the_runs(tmp_path, monkeypatch):
    calls = []

    def pretrain(cmd, cwd, check):
        calls.append((cmd[1:], cwd))
        (tmp_path / FOUNDATION).parent.mkdir(parents=True)
        (tmp_path / FOUNDATION).write_bytes(b"weights")

    monkeypatch.setattr(robot_table, "ROOT", tmp_path)
    monkeypatch.setattr(robot_table.subprocess, "run", pretrain)
    robot_table.ensure_foundation()
    robot_table.ensure_foundation()  # present now: nothing to do
    fit = ["fit", "-c", "configs/trainer/cpu.yaml", "-c", "configs/robot/pretrain_metaworld.yaml"]
    assert calls == [(["-m", "cli.main", *fit], tmp_path)]
