"""The object-removal family through `lifelong fit` in real processes: a data-engine run killed (SIGKILL) inside a
round or during a boundary resumes to the uninterrupted run's metrics, engine statistics and UNet; under DDP (2
gloo processes) RORem, D_phi and the data engine keep their ranks equal, evaluate each item once and judge
every input once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.cli.test_resume import last_checkpoint, lifelong, signal_at
from tests.conftest import fit_args, read_reports

#: tiny ops lose much to OpenMP threads on a busy 2-core CPU (DDP ranks get 1 thread each anyway)
THREADS = {"OMP_NUM_THREADS": "1"}
SMALL = ("--task_switch.steps_per_task=3", "--continual_metrics.print_tables=false")
ENGINE_COUNTS = "--data.init_args.counts={train: 8, inputs: 4, eval: 2}"
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2")


def fit(args: list[str]) -> None:
    done = lifelong(args, env=THREADS)
    assert done.returncode == 0, done.stderr[-3000:]


def record(out: Path) -> tuple[str, ...]:
    return ("--trainer.callbacks+=tests.helpers.RecordRemovalRun", f"--trainer.callbacks.out_dir={out}")


def engine_args(root: Path, discriminator: Path, *extra: str) -> list[str]:
    """data_engine_tiny (3 rounds: human, discriminator, discriminator) with 4 inputs and 2 eval items a round;
    the human threshold at 12 dB (not 20) has the random-weight remover pass some removals and fail others,
    with a margin of 1 dB or more on either side."""
    return fit_args(
        "removal/data_engine_tiny.yaml",
        root,
        *SMALL,
        ENGINE_COUNTS,
        f"--model.init_args.discriminator={discriminator}",
        "--model.init_args.human_threshold_db=12",
        *extra,
    )


def per_rank(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """Both ranks' deltas at the start of training and at the end of fit, and their run records."""
    start = [torch.load(out / f"delta_start_rank{r}.pt") for r in range(2)]
    end = [torch.load(out / f"delta_end_rank{r}.pt") for r in range(2)]
    runs = [json.loads((out / f"run_rank{r}.json").read_text()) for r in range(2)]
    return start, end, runs


def assert_ranks_equal_and_trained(start: list[dict], end: list[dict]) -> None:
    a, b = end
    assert a and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any(not torch.equal(start[0][k], a[k]) for k in a)  # it trained: the equality is not the init's


def assert_each_item_once(runs: list[dict], tasks: int, items: int, evaluations: int) -> None:
    """Over both ranks, each evaluation scores each task's items exactly once, and both ranks take part."""
    assert all(r["eval_items"] for r in runs)
    scored = sorted(runs[0]["eval_items"] + runs[1]["eval_items"])
    assert scored == sorted([[t, i] for t in range(tasks) for i in range(items)] * evaluations)


def assert_finite_report(report: dict, names: set[str]) -> None:
    assert set(report["metrics"]) == names
    for metric in report["metrics"].values():
        values = metric["untrained"] + [v for row in metric["matrix"] for v in row]
        assert all(v is not None and math.isfinite(v) for v in values), metric


@pytest.fixture(scope="module")
def discriminator(tmp_path_factory) -> Path:
    """discriminator_tiny fitted once (3 steps on 8 judged removals): the D_phi data_engine_tiny reads."""
    root = tmp_path_factory.mktemp("discriminator")
    fit(fit_args("removal/discriminator_tiny.yaml", root, *SMALL, "--data.init_args.counts={train: 8, eval: 2}"))
    path = root / "checkpoints" / "last.ckpt"
    assert path.is_file()
    yield path


@pytest.fixture(scope="module")
def whole(discriminator, tmp_path_factory) -> Path:
    """The uninterrupted single-process data-engine run the killed ones must end as."""
    root = tmp_path_factory.mktemp("whole")
    fit(engine_args(root, discriminator, "--checkpoint.every_n_train_steps", "2"))
    (report,) = read_reports(root)
    # The human round keeps some removals and rejects others: what is compared below is a real judgement.
    assert 0 < report["data_engine"]["initialization"]["accepted"] < 4, report["data_engine"]
    return root


def assert_same_engine_run(whole: Path, cut: Path) -> None:
    """The resumed run's last report equals the uninterrupted one (metrics and engine statistics), and both
    end with bit-equal weights (UNet, retrained D_phi) and the same accepted removals."""
    (a,), reports = read_reports(whole), read_reports(cut)
    assert reports[-1]["metrics"] == a["metrics"]
    assert reports[-1]["data_engine"] == a["data_engine"]
    assert set(a["data_engine"]) == {"initialization", "round-1", "round-2"}
    x, y = last_checkpoint(whole), last_checkpoint(cut)
    assert x["global_step"] == y["global_step"] == 9
    assert x["state_dict"].keys() == y["state_dict"].keys()
    assert any(k.startswith("parts.unet.") for k in x["state_dict"])
    assert [k for k in x["state_dict"] if not torch.equal(x["state_dict"][k], y["state_dict"][k])] == []
    accepted = [c["RemovalDataModule"]["accepted"] for c in (x, y)]
    assert accepted[0].keys() == accepted[1].keys() == {0, 1, 2}
    assert all(torch.equal(accepted[0][k][n], accepted[1][k][n]) for k in accepted[0] for n in accepted[0][k])


@pytest.mark.slow
def test_a_data_engine_run_killed_during_a_boundary_and_inside_a_round_resumes_to_the_same_run(
    whole, discriminator, tmp_path
):
    """Killed while round 0 ends (its human judgement and D_phi's retraining), resumed, killed again inside
    round 1, resumed again: each resume starts from the last checkpoint (the boundary redone with the same
    seeds; the round continued mid-epoch) and the run ends as the uninterrupted one."""
    args = engine_args(tmp_path, discriminator, "--checkpoint.every_n_train_steps", "2")
    killed = lifelong(args + signal_at("SIGKILL", during_boundary_of=0), env=THREADS)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["global_step"] == 3 and ckpt["callbacks"]["TaskSwitch"]["boundary"] == 0
    assert ckpt["callbacks"]["DataEngine"]["rounds"] == {} and ckpt["RemovalDataModule"]["accepted"] == {}
    killed = lifelong(args + ["--ckpt_path", "last"] + signal_at("SIGKILL", step=5), env=THREADS)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["TaskSwitch"]["task"] == 1  # inside the second round
    assert list(ckpt["callbacks"]["DataEngine"]["rounds"]) == ["initialization"]  # the first engine had run
    assert list(ckpt["RemovalDataModule"]["accepted"]) == [0]
    resumed = lifelong(args + ["--ckpt_path", "last"], env=THREADS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_engine_run(whole, tmp_path)


RORem_METRICS = {"gt_success", "psnr_inside", "psnr_background", "ssim_background"}
D_METRICS = {"d_success", "d_success_90", "d_score"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "metrics", "trains"),
    [("discriminator_tiny", {"accuracy", "accuracy_90", "squared_error", "score"}, "scorer.")],
)
def test_removal_methods_under_ddp_keep_ranks_equal_and_evaluate_each_item_once(config, metrics, trains, tmp_path):
    """3 eval items over 2 ranks (2 + 1, no padding): the untrained and the trained evaluation each score every
    item once; after 3 steps every trained tensor is equal on both ranks. (RORem's DDP run is the data engine's
    test below: its UNet, trained in every round, is compared there.)"""
    out = tmp_path / "record"
    counts = "--data.init_args.counts={train: 8, inputs: 0, eval: 3}"
    fit(fit_args(f"removal/{config}.yaml", tmp_path / "ddp", *SMALL, counts, *DDP, *record(out)))
    start, end, runs = per_rank(out)
    assert_ranks_equal_and_trained(start, end)
    assert all(k.startswith(trains) for k in end[0])
    assert_each_item_once(runs, tasks=1, items=3, evaluations=2)
    (report,) = read_reports(tmp_path / "ddp")
    assert_finite_report(report, metrics)


@pytest.mark.slow
def test_the_data_engine_under_ddp_judges_every_input_once_and_both_ranks_accept_the_same(
    whole, discriminator, tmp_path
):
    out = tmp_path / "record"
    fit(engine_args(tmp_path / "ddp", discriminator, *DDP, *record(out)))
    start, end, runs = per_rank(out)
    assert_ranks_equal_and_trained(start, end)  # the UNet and the retrained D_phi
    assert runs[0]["accepted"] == runs[1]["accepted"]
    assert_each_item_once(runs, tasks=3, items=2, evaluations=4)
    (report,) = read_reports(tmp_path / "ddp")
    assert_finite_report(report, RORem_METRICS | D_METRICS)
    stats = report["data_engine"]
    assert list(stats) == ["initialization", "round-1", "round-2"]
    assert [s["processed"] for s in stats.values()] == [4, 4, 4]  # every input, not one rank's half
    assert [s["accepted"] for s in stats.values()] == runs[0]["accepted"]
    assert [s["judge"] for s in stats.values()] == ["human", "discriminator", "discriminator"]
    # Removals are seeded per input: the untrained model (the same base) scores as in one process.
    (single,) = read_reports(whole)
    for name in ("gt_success", "psnr_inside"):
        assert report["metrics"][name]["untrained"] == pytest.approx(single["metrics"][name]["untrained"], abs=1e-5)
