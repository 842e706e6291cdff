"""Learning curves of the current task, best-checkpoint keeping and LIBERO's FWT / NBT / AUC."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from callbacks.continual_metrics import ContinualMetrics, held_curve, libero_summary, restore_state, snapshot_state
from cli.errors import ConfigError
from cli.main import QUIET
from datamodules.base import ContinualDataModule, TensorDictDataset
from lightning_modules.base import ContinualModule
from tests.conftest import config, read_reports

# -- the formulas, against a hand computation -------------------------------------------------------

# R[i][j]: success on task j after training task i (3 tasks).
R = [
    [0.8, 0.1, 0.0],
    [0.6, 0.9, 0.2],
    [0.4, 0.5, 1.0],
]
CURVES = {
    0: [(0, 0.0), (2, 0.4), (4, 0.8), (6, 0.6)],  # held [0, .4, .8, .8] -> FWT_0 = 0.5, c_0 = 0.8
    1: [(0, 0.2), (2, 0.6), (4, 0.4), (6, 1.0)],  # peak last: held = raw -> FWT_1 = 0.55, c_1 = 1.0
    2: [(0, 0.5), (2, 1.0), (4, 0.5), (6, 1.0)],  # earliest peak at 2 -> [.5, 1, 1, 1], FWT_2 = 0.875
}


def test_held_curve_keeps_the_rise_and_holds_the_earliest_peak():
    assert held_curve([(0, 0.0), (2, 0.4), (4, 0.8), (6, 0.6)]) == pytest.approx([0.0, 0.4, 0.8, 0.8])
    # before the peak the raw values stay (not a running maximum)
    assert held_curve([(0, 0.2), (2, 0.6), (4, 0.4), (6, 1.0)]) == pytest.approx([0.2, 0.6, 0.4, 1.0])
    assert held_curve([(4, 0.5), (0, 0.1), (2, 0.5)]) == pytest.approx([0.1, 0.5, 0.5])  # sorted by epoch


def test_libero_summary_of_three_tasks():
    s = libero_summary(R, CURVES)
    assert s["fwt"] == pytest.approx((0.5 + 0.55 + 0.875) / 3)
    # NBT_0 = mean(.8 - .6, .8 - .4) = .3; NBT_1 = 1.0 - .5 = .5 (c_1 from the curve, not R[1][1] = .9)
    assert s["nbt"] == pytest.approx((0.3 + 0.5) / 2)
    # AUC_0 = (.5 + .6 + .4) / 3 = .5; AUC_1 = (.55 + .5) / 2 = .525; AUC_2 = .875 / 1
    assert s["auc"] == pytest.approx((0.5 + 0.525 + 0.875) / 3)


def test_libero_summary_of_a_partly_finished_run_uses_the_tasks_done():
    s = libero_summary([R[0], R[1], [None, None, None]], CURVES)
    assert s["fwt"] == pytest.approx((0.5 + 0.55) / 2)
    assert s["nbt"] == pytest.approx(0.8 - 0.6)
    assert s["auc"] == pytest.approx(((0.5 + 0.6) / 2 + 0.55) / 2)
    one = libero_summary([R[0], [None] * 3, [None] * 3], CURVES)
    assert one == {"fwt": pytest.approx(0.5), "nbt": None, "auc": pytest.approx(0.5)}


def test_libero_summary_without_a_needed_curve_is_empty():
    assert libero_summary(R, {0: CURVES[0], 1: CURVES[1]}) == {"fwt": None, "nbt": None, "auc": None}
    assert libero_summary([[None] * 3] * 3, CURVES) == {"fwt": None, "nbt": None, "auc": None}


def test_options_are_checked():
    with pytest.raises(ConfigError, match="keep_best needs continual_metrics.curve_every"):
        ContinualMetrics(keep_best=True)
    with pytest.raises(ConfigError, match="curve_every must be at least 1"):
        ContinualMetrics(curve_every=0)
    with pytest.raises(ConfigError, match="curve_on: held_out needs continual_metrics.curve_every"):
        ContinualMetrics(curve_on="held_out")
    with pytest.raises(ConfigError, match="curve_on must be eval or held_out"):
        ContinualMetrics(curve_every=2, curve_on="test")


class _WithKeep(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.trained = nn.Parameter(torch.zeros(3))
        self.register_buffer("stat", torch.zeros(1))

    def state_to_keep(self) -> dict[str, Tensor]:
        return {"trained": self.trained, "stat": self.stat}


def test_snapshot_uses_state_to_keep_and_restores_in_place():
    m = _WithKeep()
    snap = snapshot_state(m)
    assert set(snap) == {"trained", "stat"}
    live = m.trained
    with torch.no_grad():
        m.trained.add_(1.0)
        m.stat.add_(5.0)
        m.frozen.add_(2.0)
    restore_state(m, snap)
    assert m.trained is live and torch.equal(m.trained, torch.zeros(3)) and torch.equal(m.stat, torch.zeros(1))
    assert torch.equal(m.frozen, torch.full((2,), 2.0))  # not kept, not touched
    # without state_to_keep: the parameters that require grad
    plain = nn.Linear(2, 2)
    plain.bias.requires_grad_(False)
    assert set(snapshot_state(plain)) == {"weight"}


# -- end to end: a scripted "policy" whose success depends on how long it trained --------------------

EPISODES = 5
#: successes out of 5 episodes on task t after w epochs of training on it (w = 0..4)
SCRIPT = [
    [0, 1, 4, 0, 4],  # curve at 0, 2, 4 epochs: 0, 80, 80 -> the earliest best (2 epochs) is kept
    [1, 0, 3, 0, 2],  # 20, 60, 40 -> best after 2 epochs
]
#: the same on the held-out episodes (numbers EPISODES..2 EPISODES-1), where the best points come later
HELD_SCRIPT = [
    [0, 1, 2, 0, 3],  # 0, 40, 60 -> best after 4 epochs
    [1, 0, 2, 0, 4],  # 20, 40, 80 -> best after 4 epochs
]


class ScriptedEpisodes(ContinualDataModule):
    """Two tasks; one training batch per epoch; evaluation items are episode numbers."""

    @property
    def task_names(self) -> list[str]:
        return ["reach", "push"]

    def train_dataset(self, task_id: int) -> TensorDictDataset:
        return TensorDictDataset(x=torch.zeros(self.batch_size, 1))

    def eval_dataset(self, task_id: int) -> TensorDictDataset:
        return TensorDictDataset(episode=torch.arange(EPISODES))

    def held_out_dataset(self, task_id: int) -> TensorDictDataset:
        return TensorDictDataset(episode=torch.arange(EPISODES, 2 * EPISODES))


class WithoutHeldOut(ScriptedEpisodes):
    def held_out_dataset(self, task_id: int) -> None:
        return None


class ScriptedPolicy(ContinualModule):
    """`progress[t]` grows by exactly 1 per epoch of task t (SGD, lr 1, loss -progress[t]). Task j's episodes
    succeed as SCRIPT says for its progress, one fewer once a later task has trained (forgetting)."""

    def __init__(self, stop_after_epochs: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.progress = nn.Parameter(torch.zeros(self.num_tasks))
        self.stop_after_epochs = stop_after_epochs
        self.seen_at_task_end: dict[int, list[float]] = {}

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=1.0)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return -self.progress[self.current_task] + 0.0 * batch["x"].sum()

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        w = [int(round(float(p))) for p in self.progress]
        held = batch["episode"] >= EPISODES
        script = HELD_SCRIPT if bool(held.all()) else SCRIPT
        successes = script[task_id][w[task_id]] - int(any(v > 0 for v in w[task_id + 1 :]))
        return {"success_rate": (batch["episode"] - EPISODES * held < successes).float()}

    def on_task_end(self, task_id: int) -> None:
        self.seen_at_task_end[task_id] = self.progress.tolist()

    def on_train_epoch_end(self) -> None:
        if self.stop_after_epochs is not None and self.trainer.current_epoch + 1 == self.stop_after_epochs:
            self.trainer.should_stop = True


def _fit(root, *extra: str):
    from cli.main import LifelongCLI

    args = [
        "fit",
        "-c",
        config("trainer/cpu.yaml"),
        *QUIET,
        "--model",
        f"{__name__}.ScriptedPolicy",
        "--data",
        f"{__name__}.ScriptedEpisodes",
        "--data.init_args.batch_size",
        "2",
        "--task_switch.epochs_per_task",
        "4",
        "--continual_metrics.curve_every",
        "2",
        "--continual_metrics.keep_best",
        "true",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]
    return LifelongCLI(args=args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    cli = _fit(root)
    (report,) = read_reports(root)
    return cli, report


def test_curves_best_weights_and_libero_summary_end_to_end(uninterrupted, capsys):
    cli, report = uninterrupted
    # points after 0, 2 and 4 epochs of each task, in percent
    assert report["curves"] == {"reach": [[0, 0.0], [2, 80.0], [4, 80.0]], "push": [[0, 20.0], [2, 60.0], [4, 40.0]]}
    # the module's on_task_end saw the best weights (2 epochs of training), not the last ones (4 epochs)
    assert cli.model.seen_at_task_end == {0: [2.0, 0.0], 1: [2.0, 2.0]}
    assert report["untrained"] == pytest.approx([0.0, 20.0])
    assert report["matrix"] == [pytest.approx([80.0, 20.0]), pytest.approx([60.0, 60.0])]
    s = report["summary"]
    assert report["fwt_definition"] == "libero"
    assert s["fwt"] == pytest.approx((160 / 3 + 140 / 3) / 2)  # held curves [0, 80, 80], [20, 60, 60]
    assert s["nbt"] == pytest.approx(80.0 - 60.0)
    assert s["auc"] == pytest.approx(((160 / 3 + 60.0) / 2 + 140 / 3) / 2)
    assert s["average_accuracy"] == pytest.approx(60.0) and s["forgetting"] == pytest.approx(20.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("curve/success_rate/task_1")] == [
        (4, pytest.approx(20.0)),
        (6, pytest.approx(60.0)),
        (8, pytest.approx(40.0)),
    ]
    assert {"eval/success_rate/nbt", "eval/success_rate/auc"} <= set(events.Tags()["scalars"])
    (metrics,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ContinualMetrics)]
    metrics.print_report("scripted")
    printed = capsys.readouterr().out
    assert "nbt" in printed and "auc" in printed and "epoch 4" in printed and "T2: push" in printed


def test_held_out_curves_choose_the_kept_weights_apart_from_the_reported_episodes(tmp_path):
    cli = _fit(tmp_path, "--continual_metrics.curve_on", "held_out")
    (report,) = read_reports(tmp_path)
    assert report["curves"] == {"reach": [[0, 0.0], [2, 40.0], [4, 60.0]], "push": [[0, 20.0], [2, 40.0], [4, 80.0]]}
    assert cli.model.seen_at_task_end == {0: [4.0, 0.0], 1: [4.0, 4.0]}  # the held-out bests: the last points
    # the matrix is still scored on the reported episodes: SCRIPT at 4 epochs (push 40, not 60 as with eval)
    assert report["matrix"] == [pytest.approx([80.0, 20.0]), pytest.approx([60.0, 40.0])]
    assert report["untrained"] == pytest.approx([0.0, 20.0])
    with pytest.raises(ConfigError, match="curve_on: held_out needs evaluation items apart from the reported"):
        _fit(
            tmp_path / "none",
            "--continual_metrics.curve_on",
            "held_out",
            "--data",
            f"{__name__}.WithoutHeldOut",
            "--data.init_args.batch_size",
            "2",
        )


@pytest.mark.parametrize(
    "cut",
    [("--task_switch.stop_after_task", "1"), ("--model.init_args.stop_after_epochs", "6")],
    ids=["between-tasks", "mid-task-with-a-kept-best"],
)
def test_resumed_run_writes_the_same_report(uninterrupted, tmp_path, cut):
    _, full = uninterrupted
    _fit(tmp_path, *cut)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ContinualMetrics"))
    if cut[0].endswith("stop_after_epochs"):
        # stopped after 2 epochs of task 1: its best point so far is kept in the checkpoint
        assert state["curves"][1] == [[0, 20.0], [2, 60.0]] and state["best"]["epoch"] == 2
        assert torch.equal(state["best"]["state"]["progress"], torch.tensor([2.0, 2.0]))
    else:
        assert state["best"] is None and list(state["curves"]) == [0]
    # The cut is a setting of its own, which the resumed run drops on purpose.
    _fit(tmp_path, "--ckpt_path", "last", "--allow_changes", "[model.init_args.stop_after_epochs]")
    assert read_reports(tmp_path)[-1] == full
