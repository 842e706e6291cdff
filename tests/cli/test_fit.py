"""End-to-end runs of `lifelong fit` / `test` on Split-Digits, in this process."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.conftest import config, read_reports

ER = "classification/er_splitdigits.yaml"
FINETUNE = "classification/finetune_splitdigits.yaml"
JOINT = "classification/joint_splitdigits.yaml"
SHORT = ("--task_switch.epochs_per_task", "2")


def test_er_forgets_less_than_finetune_and_reports_everything(run_fit, tmp_path):
    run_fit(FINETUNE, tmp_path / "ft", *SHORT)
    run_fit(JOINT, tmp_path / "joint", *SHORT)
    cli = run_fit(ER, tmp_path / "er", *SHORT)
    (ft,), (er,), (joint,) = (read_reports(tmp_path / d) for d in ("ft", "er", "joint"))
    # The bounds bracket ER: Joint (all data so far) > ER (200 examples) > Finetune.
    assert joint["summary"]["average_accuracy"] > er["summary"]["average_accuracy"]
    assert er["metric"] == "accuracy" and er["tasks"][0] == "classes 0,1" and len(er["matrix"]) == 5
    assert all(v is not None for row in er["matrix"] for v in row)
    # Class-IL: unseen tasks' classes are masked, so their accuracy is exactly 0.
    assert er["matrix"][0][1:] == [0.0] * 4
    assert set(er["metrics"]) == {"accuracy", "task_il_accuracy"}
    assert ft["summary"]["average_accuracy"] < 30  # Finetune keeps roughly the last task only
    assert er["summary"]["average_accuracy"] > ft["summary"]["average_accuracy"] + 30
    assert er["summary"]["forgetting"] < ft["summary"]["forgetting"]
    # Task-IL scores are never below class-IL ones (Mammoth's sanity check on label order).
    til = er["metrics"]["task_il_accuracy"]["matrix"]
    assert all(til[i][j] >= er["matrix"][i][j] for i in range(5) for j in range(i + 1))
    # The untrained baseline exists for FWT; on 2 classes it is near chance, never perfect.
    assert len(er["untrained"]) == 5 and max(er["metrics"]["task_il_accuracy"]["untrained"]) < 95
    # TensorBoard got the per-task curves, the summaries and the heatmap.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"eval/accuracy/task_0", "eval/accuracy/task_4", "eval/accuracy/forgetting", "train/ce"} <= scalars
    assert [e.step for e in events.Scalars("eval/accuracy/task_0")] == [0, 1, 2, 3, 4]
    # The heatmap is drawn once, when the last task ends: it holds every row.
    assert [e.step for e in events.Images("eval/accuracy/matrix")] == [4]
    assert os.path.exists(tmp_path / "er" / "checkpoints" / "last.ckpt")


def test_resumed_run_ends_with_the_same_metrics_as_an_uninterrupted_one(run_fit, tmp_path):
    run_fit(ER, tmp_path / "full", *SHORT)
    run_fit(ER, tmp_path / "cut", *SHORT, "--task_switch.stop_after_task", "2")
    (partial,) = read_reports(tmp_path / "cut")
    assert partial["matrix"][1][0] is not None and partial["matrix"][2] == [None] * 5
    assert heatmap_steps(tmp_path / "cut") == [1]  # a run stopped early draws it at its last task
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 2 and ckpt["continual"]["rank_local"][0]["buffer"]["num_seen"] > 0
    run_fit(ER, tmp_path / "cut", *SHORT, "--ckpt_path", "last")
    assert heatmap_steps(tmp_path / "cut") == [4]  # and the resumed run at the stream's last
    (full,), resumed = read_reports(tmp_path / "full"), read_reports(tmp_path / "cut")[-1]
    for name, block in full["metrics"].items():
        for row_a, row_b in zip(block["matrix"], resumed["metrics"][name]["matrix"], strict=True):
            assert row_a == pytest.approx(row_b, abs=1e-6)
    assert resumed["summary"] == pytest.approx(full["summary"], abs=1e-6)


def heatmap_steps(root) -> list[int]:
    """The steps at which the latest run under `root` drew the matrix heatmap."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest = max(glob.glob(str(root / "lightning_logs" / "version_*")), key=os.path.getmtime)
    return [e.step for e in EventAccumulator(latest).Reload().Images("eval/accuracy/matrix")]


@pytest.mark.parametrize("stage", ["test", "validate"])
def test_test_and_validate_score_a_checkpoint_on_every_task(run_fit, tmp_path, stage):
    from cli.main import LifelongCLI

    run_fit(ER, tmp_path, "--task_switch.epochs_per_task", "1")
    (report,) = read_reports(tmp_path)
    args = ["-c", config("trainer/cpu.yaml"), "-c", config(ER), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.enable_progress_bar", "false", "--continual_metrics.print_tables", "false"]
    LifelongCLI(args=[stage, *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
    (scored,) = read_reports(tmp_path, f"{stage}_metrics.json")
    assert scored["trained_tasks"] == 5
    assert scored["scores"]["accuracy"] == pytest.approx(report["matrix"][-1], abs=1e-6)
    assert scored["scores"]["task_il_accuracy"] == pytest.approx(
        report["metrics"]["task_il_accuracy"]["matrix"][-1], abs=1e-6
    )


def test_a_one_task_stream_fits_tests_and_validates(run_fit, tmp_path, capsys):
    from cli.main import LifelongCLI

    one = ("--data.init_args.num_tasks", "1", "--task_switch.epochs_per_task", "1")
    cli = run_fit(ER, tmp_path, *one, "--continual_metrics.print_tables", "true")
    (report,) = read_reports(tmp_path)
    ((score,),) = report["matrix"]
    assert isinstance(score, float) and 0 < score <= 100 and len(report["untrained"]) == 1
    summary = report["summary"]
    assert summary["average_accuracy"] == score and summary["average_incremental_accuracy"] == score
    assert summary["forgetting"] is None and summary["bwt"] is None and summary["fwt"] is None
    assert "after T1" in capsys.readouterr().out  # the tables were printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir).Reload()
    assert "eval/accuracy/matrix" in events.Tags()["images"]
    assert "eval/accuracy/forgetting" not in events.Tags()["scalars"]  # undefined figures are not logged
    args = ["-c", config("trainer/cpu.yaml"), "-c", config(ER), "--trainer.default_root_dir", str(tmp_path), *one]
    args += ["--trainer.enable_progress_bar", "false", "--continual_metrics.print_tables", "false"]
    for stage in ("test", "validate"):
        LifelongCLI(args=[stage, *args, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt")])
        (scored,) = read_reports(tmp_path, f"{stage}_metrics.json")
        assert scored["trained_tasks"] == 1 and scored["scores"]["accuracy"] == [pytest.approx(score, abs=1e-6)]


def test_steps_per_task_runs_exactly_that_many_steps_per_task(run_fit, tmp_path):
    cli = run_fit(FINETUNE, tmp_path, "--task_switch.steps_per_task", "20")
    assert cli.trainer.global_step == 100 and cli.trainer.current_epoch == 5
    (report,) = read_reports(tmp_path)
    assert all(v is not None for row in report["matrix"] for v in row)  # evaluated after each of the 5 tasks


def test_optimizer_is_rebuilt_at_each_task_start(run_fit, tmp_path):
    cli = run_fit(
        FINETUNE,
        tmp_path,
        "--data.init_args.num_tasks",
        "2",
        "--task_switch.epochs_per_task",
        "1",
        "--model.init_args.optimizer",
        "torch.optim.Adam",
    )
    # Adam counts its steps: a fresh optimizer for task 2 has taken only task 2's steps.
    (optimizer,) = cli.trainer.optimizers
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {cli.trainer.num_training_batches}
    assert cli.trainer.global_step > cli.trainer.num_training_batches


EXPERIMENTS = sorted(glob.glob(config("classification/*.yaml")) + glob.glob(config("diffusion/*.yaml")))
EXPERIMENTS += sorted(glob.glob(config("classification/mammoth/*.yaml")))
EXPERIMENTS += sorted(glob.glob(config("removal/*.yaml")))
EXPERIMENTS += sorted(glob.glob(config("robot/*.yaml")))
TRAINERS = sorted(glob.glob(config("trainer/*.yaml")))


@pytest.mark.parametrize(
    "configs",
    [(config("trainer/cpu.yaml"), p) for p in EXPERIMENTS] + [(config(ER), p) for p in TRAINERS],
    ids=lambda c: os.path.relpath(c[1], config("")),
)
def test_every_config_parses(configs, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", configs[0], "-c", configs[1], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules." in printed and "class_path: datamodules." in printed


def test_a_ddp_trained_checkpoint_tests_on_one_device(run_fit, tmp_path):
    """A checkpoint whose replay buffers were saved by 2 ranks (capacity 100 each) scores on 1 device."""
    from cli.main import LifelongCLI

    run_fit(ER, tmp_path, "--task_switch.steps_per_task", "3", "--data.init_args.num_tasks", "2")
    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["continual"]["rank_local"][0]["buffer"]
    half = {**state, "capacity": 100, "data": {k: v[:50] for k, v in state["data"].items()}}
    ckpt["continual"]["rank_local"] = [{"buffer": half}, {"buffer": half}]
    torch.save(ckpt, path)
    args = ["-c", config("trainer/cpu.yaml"), "-c", config(ER), "--trainer.default_root_dir", str(tmp_path)]
    args += ["--data.init_args.num_tasks", "2", "--trainer.enable_progress_bar", "false"]
    LifelongCLI(args=["test", *args, "--continual_metrics.print_tables", "false", "--ckpt_path", str(path)])
    (scored,) = read_reports(tmp_path, "test_metrics.json")
    assert scored["trained_tasks"] == 2 and len(scored["scores"]["accuracy"]) == 2
