"""The reward methods through `lifelong fit` on the tiny preset: the stream's metrics, frozen adapters, a
killed and resumed run, and two DDP ranks."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.test_ddp import run_in_subprocess
from tests.cli.test_resume import last_checkpoint, lifelong, signal_at
from tests.conftest import fit_args, read_reports

TWO_REWARDS = ("--data.init_args.rewards=[compressibility, brightness]", "--continual_metrics.print_tables=false")
METHODS = ["sequential_reward", "lora_group", "rid", "joint_reward", "reward_distillation"]


def record(root) -> tuple[str, ...]:
    return ("--trainer.callbacks+=tests.helpers.RecordTaskEnds", f"--trainer.callbacks.out_dir={root / 'record'}")


@pytest.mark.parametrize("method", METHODS)
def test_each_reward_method_fills_the_matrices_and_keeps_what_it_must(method, run_fit, tmp_path):
    run_fit(f"diffusion/{method}_rewards_tiny.yaml", tmp_path, *TWO_REWARDS, *record(tmp_path))
    (report,) = read_reports(tmp_path)
    assert report["metric"] == "reward" and report["tasks"] == ["compressibility", "brightness"]
    assert set(report["metrics"]) == {"reward", "ssim", "reward_normalised"}
    assert all(v is not None for row in report["matrix"] for v in row)
    assert all(-1 <= v <= 1 for row in report["metrics"]["ssim"]["matrix"] for v in row)
    assert report["metrics"]["ssim"]["untrained"] == pytest.approx([1.0, 1.0])  # the base against itself
    after = [torch.load(tmp_path / "record" / f"delta_task{t}_rank0.pt") for t in range(2)]
    first = {k: v for k, v in after[0].items() if ".reward_0." in k or ".reward." in k}
    assert first and any(v.abs().sum() > 0 for k, v in first.items() if ".lora_B." in k)  # it trained
    moved = any(not torch.equal(after[1][k], v) for k, v in first.items())
    # A group freezes the first reward's adapter bit for bit; one shared adapter keeps training.
    assert moved == (method not in ("lora_group", "rid"))


@pytest.mark.slow
def test_a_killed_rid_run_resumes_to_the_same_metrics_adapters_and_teacher(run_fit, tmp_path):
    run_fit("diffusion/rid_rewards_tiny.yaml", tmp_path / "whole", *TWO_REWARDS)
    args = fit_args("diffusion/rid_rewards_tiny.yaml", tmp_path / "cut", *TWO_REWARDS)
    args += ["--checkpoint.every_n_train_steps", "2"]
    killed = lifelong(args + signal_at("SIGKILL", step=5))
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = last_checkpoint(tmp_path / "cut")
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["TaskSwitch"]["task"] == 1  # inside the second reward
    resumed = lifelong(args + ["--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (whole,), reports = read_reports(tmp_path / "whole"), read_reports(tmp_path / "cut")
    assert reports[-1]["metrics"] == whole["metrics"]
    a, b = last_checkpoint(tmp_path / "whole"), last_checkpoint(tmp_path / "cut")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ta, tb = a["callbacks"]["EMATeacher"]["weights"], b["callbacks"]["EMATeacher"]["weights"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_rid_under_ddp_keeps_adapters_and_teacher_equal_on_both_ranks(tmp_path):
    args = fit_args(
        "diffusion/rid_rewards_tiny.yaml",
        tmp_path / "ddp",
        *TWO_REWARDS,
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.devices=2",
        "--data.init_args.batch_size=1",
        "--trainer.callbacks+=tests.helpers.RecordRankState",
        f"--trainer.callbacks.out_dir={tmp_path / 'record'}",
        *record(tmp_path),
    )
    run_in_subprocess(args)
    out = tmp_path / "record"
    a, b = (torch.load(out / f"params_task1_rank{r}.pt") for r in range(2))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(".reward_1." in k for k in a)  # only the second reward's adapter trains
    a, b = (torch.load(out / f"teacher_task1_rank{r}.pt") for r in range(2))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(out / f"delta_task1_rank{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    (report,) = read_reports(tmp_path / "ddp")
    assert all(v is not None for row in report["matrix"] for v in row)
    json.dumps(report)
