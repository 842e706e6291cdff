"""`ContinualModule.log`: a training step's values reach Lightning's `log` only on the steps the logger writes,
and what TensorBoard holds is unchanged: each written value is that step's loss."""

from __future__ import annotations

import lightning as L
import pytest

from cli.main import QUIET, LifelongCLI
from tests.conftest import config


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("every", [4, 1])
def test_training_values_are_logged_on_the_written_steps_only(tmp_path, monkeypatch, every):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls: list[tuple[str, str]] = []
    lightning_log = L.LightningModule.log

    def counted(self, name, *args, **kwargs):
        calls.append((self._current_fx_name, name))
        return lightning_log(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", counted)
    args = ["-c", config("trainer/cpu.yaml"), "-c", config("classification/finetune_splitdigits.yaml"), *QUIET]
    args += ["--task_switch.epochs_per_task", "1", "--trainer.log_every_n_steps", str(every)]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = LifelongCLI(args=args, run=False)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    steps = len(recorder.losses)
    written = [s for s in range(steps) if (s + 1) % every == 0]  # Lightning writes step s after batch s + 1
    assert steps == cli.trainer.global_step > 20
    assert [c for c in calls if c[0] == "training_step"] == [("training_step", "train/ce")] * len(written)
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/ce")]
    assert [s for s, _ in logged] == written
    assert [v for _, v in logged] == pytest.approx([recorder.losses[s] for s in written], rel=1e-6)
