"""Every classification method trains two tiny tasks, and resumes to the same result."""

from __future__ import annotations

import glob
import os

import pytest

from tests.conftest import config, read_reports

METHODS = sorted(
    os.path.basename(p).removesuffix("_splitdigits.yaml")
    for p in glob.glob(config("classification/*_splitdigits.yaml"))
)
TINY = ("--data.init_args.num_tasks", "2", "--task_switch.steps_per_task", "6")


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_tasks_and_resumes_identically(run_fit, tmp_path, method):
    experiment = f"classification/{method}_splitdigits.yaml"
    run_fit(experiment, tmp_path / "full", *TINY)
    (full,) = read_reports(tmp_path / "full")
    assert len(full["matrix"]) == 2 and all(v is not None for row in full["matrix"] for v in row)
    run_fit(experiment, tmp_path / "cut", *TINY, "--task_switch.stop_after_task", "1")
    run_fit(experiment, tmp_path / "cut", *TINY, "--ckpt_path", "last")
    resumed = read_reports(tmp_path / "cut")[-1]
    for name, block in full["metrics"].items():
        for a, b in zip(block["matrix"], resumed["metrics"][name]["matrix"], strict=True):
            assert a == pytest.approx(b, abs=1e-6), (method, name)
