"""Runs that survive being killed: real `lifelong fit` processes are killed (SIGKILL) or stopped (SIGTERM,
SIGUSR1) mid-task, mid-epoch or during a boundary's evaluation, on one process and under DDP, and resumed;
the resumed run must end bit-equal to an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, fit_args

ER = "classification/er_splitdigits.yaml"
#: two tasks of 3 epochs; task 0 has 73 batches per epoch (batch 10), so step 100 is inside its second epoch
SHORT = ("--data.init_args.num_tasks", "2", "--trainer.logger", "false")
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.batch_size", "5")
DDP += ("--model.init_args.minibatch_size", "5")


def lifelong(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lifelong <args>` in a fresh process; the test reads its exit code and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def signal_at(signal: str, **where) -> list[str]:
    args = ["--trainer.callbacks+=tests.helpers.SignalAt", f"--trainer.callbacks.init_args.signal={signal}"]
    return args + [f"--trainer.callbacks.init_args.{k}={v}" for k, v in where.items()]


def last_checkpoint(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def loader_state(checkpoint: dict) -> dict:
    (state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


def assert_same_run(a: Path, b: Path) -> None:
    """Both runs ended at the same step with bit-equal weights, replay buffers and metric matrices."""
    x, y = last_checkpoint(a), last_checkpoint(b)
    assert x["global_step"] == y["global_step"]
    assert x["state_dict"].keys() == y["state_dict"].keys()
    assert all(torch.equal(x["state_dict"][k], y["state_dict"][k]) for k in x["state_dict"])
    buffers = [[r["buffer"]["data"]["x"] for r in c["continual"]["rank_local"]] for c in (x, y)]
    assert all(torch.equal(p, q) for p, q in zip(*buffers, strict=True))
    assert x["callbacks"]["ContinualMetrics"]["matrix"] == y["callbacks"]["ContinualMetrics"]["matrix"]


def resume_and_compare(args: list[str], uninterrupted: Path, cut: Path) -> None:
    """Resumes the run in `cut` from its last checkpoint and checks it ends as the uninterrupted one did."""
    resumed = lifelong(args + ["--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, cut)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("lifelong:")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = lifelong(fit_args(ER, root, *SHORT))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_equal(uninterrupted, tmp_path):
    args = fit_args(ER, tmp_path, *SHORT, "--checkpoint.every_n_train_steps", "7")
    killed = lifelong(args + signal_at("SIGKILL", step=100))
    assert killed.returncode == -9  # really killed: no handler ran
    ckpt = last_checkpoint(tmp_path)
    # The newest write is the step checkpoint at 98: inside task 0's second epoch (73 + 25 batches).
    assert ckpt["global_step"] == 98 and ckpt["callbacks"]["TaskSwitch"]["task"] == 0
    assert loader_state(ckpt) == {"epoch": 1, "batches": 25, "epoch_done": False, "batch_size": 10, "world_size": 1}
    resume_and_compare(args, uninterrupted, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_143(uninterrupted, tmp_path):
    args = fit_args(ER, tmp_path, *SHORT)
    stopped = lifelong(args + signal_at("SIGTERM", step=100))
    assert stopped.returncode == 143
    line = one_error_line(stopped)
    assert "SIGTERM at step 100" in line and str(tmp_path / "checkpoints" / "last.ckpt") in line
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["global_step"] == 100 and not loader_state(ckpt)["epoch_done"]
    resume_and_compare(args, uninterrupted, tmp_path)


@pytest.mark.slow
def test_a_signal_during_a_boundary_evaluation_stops_there_and_the_boundary_is_redone(uninterrupted, tmp_path):
    args = fit_args(ER, tmp_path, *SHORT)
    stopped = lifelong(args + signal_at("SIGTERM", during_boundary_of=0))
    assert stopped.returncode == 143
    assert "during the evaluation of task 0" in one_error_line(stopped)
    ckpt = last_checkpoint(tmp_path)  # written as task 0's boundary began: 3 epochs of 73 batches
    assert ckpt["global_step"] == 219 and ckpt["callbacks"]["TaskSwitch"]["boundary"] == 0
    assert ckpt["callbacks"]["ContinualMetrics"]["matrix"] == {}  # no row: the evaluation never finished
    resume_and_compare(args, uninterrupted, tmp_path)


@pytest.mark.slow
def test_ddp_stops_on_a_signal_to_one_rank_without_hanging_and_resumes_bit_equal(tmp_path):
    full = lifelong(fit_args(ER, tmp_path / "full", *SHORT, *DDP))
    assert full.returncode == 0, full.stderr[-3000:]
    args = fit_args(ER, tmp_path / "cut", *SHORT, *DDP)
    stopped = lifelong(args + signal_at("SIGTERM", step=100, rank=1), timeout=240)  # a hang fails here
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM at step 100" in one_error_line(stopped)
    ckpt = last_checkpoint(tmp_path / "cut")
    assert ckpt["global_step"] == 100 and loader_state(ckpt)["world_size"] == 2
    assert len(ckpt["continual"]["rank_local"]) == 2
    resume_and_compare(args, tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_requeues_and_the_requeued_job_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    """The sbatch files' contract: SIGUSR1 before the time limit saves and requeues; the requeued launch
    (SLURM_RESTART_COUNT set, so `--ckpt_path last`) resumes in the same task and ends bit-equal."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    (stub / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lifelong", "SLURM_PROCID": "0"}
    slurm.update(SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", PATH=f"{stub}:{os.environ['PATH']}")
    stopped = lifelong(fit_args(ER, tmp_path / "run", *SHORT) + signal_at("SIGUSR1", step=100), env=slurm)
    assert stopped.returncode == 138
    assert "requeued" in one_error_line(stopped)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert last_checkpoint(tmp_path / "run")["global_step"] == 100
    assert last_checkpoint(tmp_path / "run")["continual"]["task"] == 0  # stopped inside the first task

    resume = "${SLURM_RESTART_COUNT:+--ckpt_path last}"
    for sbatch in sorted((ROOT / "configs" / "slurm").glob("*.sbatch")):
        assert resume in sbatch.read_text(), f"{sbatch.name} does not resume a requeued job"
    requeued = {**slurm, "SLURM_RESTART_COUNT": "1"}
    resumed = lifelong(fit_args(ER, tmp_path / "run", *SHORT) + ["--ckpt_path", "last"], env=requeued)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(uninterrupted, tmp_path / "run")
    reports = [sorted(root.rglob("continual_metrics.json")) for root in (uninterrupted, tmp_path / "run")]
    assert all(len(r) == 1 for r in reports), reports
    assert reports[0][0].read_text() == reports[1][0].read_text()


@pytest.mark.slow
def test_with_epoch_checkpoints_a_kill_resumes_from_the_epoch_end(uninterrupted, tmp_path):
    args = fit_args(ER, tmp_path, *SHORT, "--checkpoint.every_n_epochs", "1")
    assert lifelong(args + signal_at("SIGKILL", step=75)).returncode == -9
    ckpt = last_checkpoint(tmp_path)  # the end of the first epoch (73 batches)
    assert ckpt["global_step"] == 73 and loader_state(ckpt)["epoch_done"] is True
    resume_and_compare(args, uninterrupted, tmp_path)


def test_resume_with_nothing_to_resume_from_is_one_line(capsys, tmp_path):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(ER, tmp_path, *SHORT, "--ckpt_path", "last"))
    assert exit_info.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("lifelong: error: --ckpt_path last: no checkpoint at ")
    assert str(tmp_path / "checkpoints" / "last.ckpt") in line
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def _epoch_start_lrs(tmp_path: Path, *extra: str) -> list[float]:
    from cli.main import LifelongCLI

    cli = LifelongCLI(
        args=fit_args(
            "classification/finetune_splitdigits.yaml",
            tmp_path,
            *SHORT,
            "--task_switch.epochs_per_task",
            "2",
            "--model.init_args.lr_scheduler",
            '{"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}',
            "--trainer.callbacks+=tests.helpers.RecordLearningRates",
            *extra,
        )
    )
    (recorder,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RecordLearningRates"]
    return recorder.lrs


def test_each_task_gets_a_fresh_scheduler_stepped_once_per_epoch_of_its_own(tmp_path):
    """StepLR(step 1, gamma 0.5) rebuilt per task: every task starts at the base rate and halves once."""
    assert _epoch_start_lrs(tmp_path) == [0.1, 0.05, 0.1, 0.05]


def test_a_checkpoint_from_another_method_stops_with_the_differing_keys(capsys, run_fit, tmp_path):
    from cli.main import main

    run_fit(ER, tmp_path, *SHORT, "--task_switch.steps_per_task", "2")
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    args = fit_args("classification/derpp_splitdigits.yaml", tmp_path, *SHORT, "--task_switch.steps_per_task", "2")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lifelong:")]
    assert "was written with other settings" in line and "model.class_path" in line
    assert "'lightning_modules.ER'" in line and "'lightning_modules.DERpp'" in line
    assert "--allow_changes" in line
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before


def test_allowed_changes_resume(run_fit, tmp_path):
    """A listed difference is accepted: the run resumes with the new value and finishes its tasks."""
    one_epoch = ("--task_switch.epochs_per_task", "1")
    run_fit(ER, tmp_path, *SHORT, *one_epoch, "--task_switch.stop_after_task", "1")
    change = ("--model.init_args.minibatch_size", "5")
    cli = run_fit(
        ER,
        tmp_path,
        *SHORT,
        *one_epoch,
        *change,
        "--allow_changes=[model.init_args.minibatch_size]",
        "--ckpt_path=last",
    )
    assert cli.model.minibatch_size == 5 and cli.trainer.current_epoch == 2
    matrix = last_checkpoint(tmp_path)["callbacks"]["ContinualMetrics"]["matrix"]["accuracy"]
    assert all(v is not None for row in matrix for v in row)
