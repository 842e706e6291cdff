"""Two DDP processes on CPU (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
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


CONCEPTS_FAST = (
    "--data.init_args.concepts=[cat, cup]",
    "--model.init_args.eval_samples_per_prompt=1",
    "--model.init_args.eval_inference_steps=2",
    "--continual_metrics.print_tables=false",
)


def fit_concepts_under_ddp(method: str, root, steps: int) -> tuple[dict, list[list]]:
    """`method` on the tiny preset with 2 gloo processes (batch 1 each: the config's global batch of 2);
    checks that the ranks agree and that evaluation generates every prompt exactly once. Returns the
    report and the (task, prompt) pairs generated, over both ranks."""
    from datamodules import ConceptDataModule

    record = root / "record"
    args = fit_args(
        f"diffusion/{method}_concepts_tiny.yaml",
        root / "ddp",
        *CONCEPTS_FAST,
        f"--task_switch.steps_per_task={steps}",
        "--trainer.strategy=ddp_find_unused_parameters_true",
        "--trainer.devices=2",
        "--data.init_args.batch_size=1",
        "--trainer.callbacks+=tests.helpers.RecordRankState",
        f"--trainer.callbacks.out_dir={record}",
        "--trainer.callbacks+=tests.helpers.RecordConceptRun",
        f"--trainer.callbacks.out_dir={record}",
    )
    run_in_subprocess(args)
    # After the switch to concept 2 and one step, every trainable tensor (its token row, its expert and
    # router increment, the shared K/V or LoRA) is equal on both ranks: the token row and expert, frozen
    # while DDP was built in a fresh run, are reduced too.
    a, b = (torch.load(record / f"params_task1_rank{r}.pt") for r in range(2))
    assert "parts.text_encoder.embeddings.token_embedding.rows.1" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Task-end hooks (R2MoE's removal and router fold) leave the same delta, buffers included, on both ranks.
    a, b = (torch.load(record / f"delta_rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Each evaluation (untrained, after each concept) generates each concept's prompts once over the ranks.
    dm = ConceptDataModule(concepts=["cat", "cup"])
    dm.setup()
    expected = sorted([j, p] for j in range(2) for p in dm.eval_dataset(j).prompts)
    per_rank = [json.loads((record / f"prompts_rank{r}.json").read_text()) for r in range(2)]
    assert all(per_rank)  # both ranks generate
    generated = sorted(per_rank[0] + per_rank[1])
    assert generated == sorted(expected * 3)  # 3 evaluations, no prompt twice in one
    (report,) = read_reports(root / "ddp")
    return report, generated


@pytest.mark.slow
def test_r2moe_under_ddp_keeps_ranks_in_sync_and_scores_like_one_process(run_fit, tmp_path):
    """The untrained model scores the same under DDP (each prompt once, seeded by the prompt): equal
    to a one-process run. The trained rows differ, as the README says: each rank draws its own noise and
    augmentation, and R2MoE gates each rank's batch by that batch's own mean context."""
    ddp, _ = fit_concepts_under_ddp("r2moe", tmp_path, steps=2)
    # one process, batch 2: only its untrained row is compared, so one step of one concept is enough
    single_args = ("--task_switch.steps_per_task=1", "--task_switch.stop_after_task=1")
    run_fit("diffusion/r2moe_concepts_tiny.yaml", tmp_path / "single", *CONCEPTS_FAST, *single_args)
    (single,) = read_reports(tmp_path / "single")
    for name, metric in single["metrics"].items():
        assert ddp["metrics"][name]["untrained"] == pytest.approx(metric["untrained"], abs=1e-4)
    assert all(v is not None for row in ddp["matrix"] for v in row)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["custom_diffusion", "sequential_lora"])
def test_diffusion_baselines_under_ddp_keep_ranks_in_sync(method, tmp_path):
    report, _ = fit_concepts_under_ddp(method, tmp_path, steps=2)
    assert all(v is not None for row in report["matrix"] for v in row)
