"""The suite's progress bar: Lightning's rich bar, updated when a redraw is due, complete at every epoch's end."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.callbacks import RichProgressBar as LightningRichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.progress import RichProgressBar
from tests.conftest import config


def test_bar_updates_when_a_redraw_is_due_and_ends_every_epoch_complete(monkeypatch, tmp_path):
    updates, ends = [], []
    lightning_update = LightningRichProgressBar.on_train_batch_end

    def update(self, trainer, pl_module, outputs, batch, batch_idx):
        updates.append((trainer.current_epoch, batch_idx))
        lightning_update(self, trainer, pl_module, outputs, batch, batch_idx)

    class Recording(RichProgressBar):
        def on_train_epoch_end(self, trainer, pl_module):
            task = self.progress.tasks[self.train_progress_bar_id]
            ends.append((task.completed, task.total))
            super().on_train_epoch_end(trainer, pl_module)

    monkeypatch.setattr(LightningRichProgressBar, "on_train_batch_end", update)
    monkeypatch.setattr("callbacks.progress.time.monotonic", lambda: 100.0)  # a clock that never moves
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[Recording()],
        max_epochs=2,
        limit_train_batches=10,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    # The first step updates; then only each epoch's last batch, since no redraw falls due.
    assert updates == [(0, 0), (0, 9), (1, 9)]
    assert ends == [(10, 10), (10, 10)]


def test_the_cli_adds_this_bar_unless_it_is_off_or_given(tmp_path):
    from cli.main import LifelongCLI

    base = ["-c", config("classification/finetune_splitdigits.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    base += ["--trainer.logger", "false"]

    def bars(*extra: str) -> list[type]:
        cli = LifelongCLI(args=[*base, *extra], run=False)
        return [type(c) for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]

    assert bars() == [RichProgressBar]  # also when enable_progress_bar is not given at all
    assert bars("--trainer.enable_progress_bar", "true") == [RichProgressBar]
    assert bars("--trainer.enable_progress_bar", "false") == []
    given = ("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar",)
    assert [b.__name__ for b in bars(*given)] == ["TQDMProgressBar"]
