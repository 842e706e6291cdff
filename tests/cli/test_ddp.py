"""Two DDP processes on CPU (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, fit_args, read_reports

ER = "classification/er_splitdigits.yaml"


def run_in_subprocess(args: list[str]) -> None:
    """`lifelong <args>` in a fresh process (DDP spawns its ranks from the command line)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one_and_keep_ranks_in_sync(run_fit, tmp_path):
    run_fit(ER, tmp_path / "single")
    record = tmp_path / "record"
    args = fit_args(
        ER,
        tmp_path / "ddp",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.init_args.batch_size",
        "5",  # half the per-device batch: the same global batch of 10
        "--model.init_args.minibatch_size",
        "5",
        "--trainer.callbacks+=tests.helpers.RecordRankState",
        f"--trainer.callbacks.out_dir={record}",
    )
    run_in_subprocess(args)

    (single,), (ddp,) = read_reports(tmp_path / "single"), read_reports(tmp_path / "ddp")
    # Evaluation covers the whole test sets on both ranks: the untrained model scores the same.
    assert ddp["untrained"] == pytest.approx(single["untrained"], abs=1e-6)
    final_single, final_ddp = single["summary"]["average_accuracy"], ddp["summary"]["average_accuracy"]
    assert abs(final_single - final_ddp) < 5.0, (final_single, final_ddp)

    # After each task switch and one step, every trainable tensor is equal on both ranks.
    for task in range(1, 5):
        a = torch.load(record / f"params_task{task}_rank0.pt")
        b = torch.load(record / f"params_task{task}_rank1.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Each rank's memory holds half the budget, filled from its own shard (so the two differ).
    buffers = [torch.load(record / f"buffer_rank{r}.pt") for r in range(2)]
    assert [b["capacity"] for b in buffers] == [100, 100]
    assert [b["num_seen"] for b in buffers] == [sum(b["num_seen"] for b in buffers) // 2] * 2
    assert not torch.equal(buffers[0]["data"]["x"], buffers[1]["data"]["x"])
    # The checkpoint carries both ranks' buffers.
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    saved = ckpt["continual"]["rank_local"]
    assert len(saved) == 2 and all(
        torch.equal(saved[r]["buffer"]["data"]["x"], buffers[r]["data"]["x"]) for r in range(2)
    )


@pytest.mark.slow
def test_lmsrr_under_ddp_keeps_its_vit_blocks_switches_and_fusion_in_sync(tmp_path):
    """LMSRR's switches get no drift gradient in task 0 and the frozen copy none at all: DDP must still
    reduce every trainable tensor, and the ranks must agree after the switch to task 1."""
    record = tmp_path / "record"
    args = fit_args(
        "classification/lmsrr_splitdigits.yaml",
        tmp_path / "ddp",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--data.init_args.num_tasks=2",
        "--task_switch.steps_per_task=3",
        "--trainer.callbacks+=tests.helpers.RecordRankState",
        f"--trainer.callbacks.out_dir={record}",
    )
    run_in_subprocess(args)
    a, b = (torch.load(record / f"params_task1_rank{r}.pt") for r in range(2))
    assert "switch_logits" in a and any(k.startswith("backbone.fusion") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
