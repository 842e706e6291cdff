"""Shared fixtures: run the CLI in-process on a config with quiet, fast settings."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from cli.main import QUIET
from tests.helpers import check_deepspeed_claim

ROOT = Path(__file__).resolve().parent.parent


def config(name: str) -> str:
    return str(ROOT / "configs" / name)


def fit_args(experiment: str, root: Path, *extra: str) -> list[str]:
    """`lifelong fit` arguments for configs/<experiment> on CPU, logging under `root`."""
    return [
        "fit",
        "-c",
        config("trainer/cpu.yaml"),
        "-c",
        config(experiment),
        *QUIET,
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def read_reports(root: Path, name: str = "continual_metrics.json") -> list[dict]:
    """Every report written under `root`, oldest logger version first."""
    paths = sorted(glob.glob(os.path.join(root, "**", name), recursive=True), key=os.path.getmtime)
    return [json.loads(Path(p).read_text()) for p in paths]


@pytest.fixture
def run_fit():
    """Runs `lifelong fit` in this process and returns the LifelongCLI object."""
    from cli.main import LifelongCLI

    def run(experiment: str, root: Path, *extra: str):
        cli = LifelongCLI(args=fit_args(experiment, root, *extra))
        check_deepspeed_claim(cli.trainer, cli.model)
        return cli

    return run
