"""The robot family through `lifelong`: demonstrations on disk, then DMPEL fit end to end, and a run
stopped after task 1 and resumed that reports exactly what the uninterrupted run did."""

from __future__ import annotations

import pytest

from cli.main import main
from tests.conftest import read_reports

TASKS = "[reach-v3, handle-press-side-v3]"


def small(root, demos) -> list[str]:
    return [
        "--data.init_args.suite=null",
        f"--data.init_args.tasks={TASKS}",
        f"--data.init_args.root={demos}",
        "--data.init_args.demos=3",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_episodes=2",
        "--data.init_args.horizon=60",
        "--model.init_args.policy_checkpoint=null",
        "--model.init_args.rollout_workers=0",
        "--model.init_args.language_encoder=tiny",
        "--model.init_args.replay_epochs=2",
        "--task_switch.epochs_per_task=2",
        "--continual_metrics.curve_every=2",
    ]


@pytest.mark.slow
def test_make_demos_then_dmpel_fit_and_resume(run_fit, tmp_path):
    demos = tmp_path / "demos"
    main(["make-demos", "--tasks", TASKS, "--demos", "3", "--horizon", "60", "--out", str(demos), "--progress=false"])
    assert sorted(p.name for p in demos.glob("*.hdf5")) == ["handle-press-side-v3.hdf5", "reach-v3.hdf5"]

    run_fit("robot/dmpel_cw3.yaml", tmp_path / "full", *small(tmp_path, demos))
    (full,) = read_reports(tmp_path / "full")
    assert full["metric"] == "success_rate" and full["fwt_definition"] == "libero"
    assert all(v is not None for v in full["matrix"][1]) and set(full["summary"]) >= {"fwt", "nbt", "auc"}
    assert [e for e, _ in full["curves"]["handle-press-side-v3"]] == [0, 2]

    part = tmp_path / "part"
    run_fit("robot/dmpel_cw3.yaml", part, *small(tmp_path, demos), "--task_switch.stop_after_task=1")
    run_fit("robot/dmpel_cw3.yaml", part, *small(tmp_path, demos), "--ckpt_path=last")
    resumed = read_reports(part)[-1]
    assert resumed["matrix"] == full["matrix"] and resumed["curves"] == full["curves"]
    assert resumed["summary"] == full["summary"]
