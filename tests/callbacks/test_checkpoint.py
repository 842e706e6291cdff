"""`ContinualCheckpoint.save` replaces `last.ckpt` only with a complete file, and its options are checked."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from callbacks.checkpoint import ContinualCheckpoint
from cli.errors import ConfigError


class OneProcess:
    def broadcast(self, obj):
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass


class Trainer:
    """What `save` needs of a trainer; `save_checkpoint` writes `payload`, or half of it and then fails."""

    def __init__(self, root, payload: bytes, disk_full: bool = False):
        self.default_root_dir = str(root)
        self.is_global_zero = True
        self.strategy = OneProcess()
        self.payload, self.disk_full = payload, disk_full

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        with open(path, "wb") as f:
            f.write(self.payload[: len(self.payload) // 2] if self.disk_full else self.payload)
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    callback = ContinualCheckpoint()
    path = callback.save(Trainer(tmp_path, b"first checkpoint"))
    assert open(path, "rb").read() == b"first checkpoint"
    with pytest.raises(ConfigError) as err:
        callback.save(Trainer(tmp_path, b"second, longer checkpoint", disk_full=True))
    message = str(err.value)
    assert "\n" not in message and path in message and "No space left on device" in message
    assert "previous one is unchanged" in message
    assert open(path, "rb").read() == b"first checkpoint"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporary file left


def test_a_successful_write_replaces_the_file(tmp_path):
    callback = ContinualCheckpoint(dirpath=str(tmp_path / "elsewhere"))
    callback.save(Trainer(tmp_path, b"one"))
    path = callback.save(Trainer(tmp_path, b"two"))
    assert path == str((tmp_path / "elsewhere" / "last.ckpt").resolve()) and open(path, "rb").read() == b"two"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"every_n_epochs": -1}, "checkpoint.every_n_epochs"),
        ({"every_n_train_steps": 0}, "checkpoint.every_n_train_steps"),
        ({"every_n_minutes": 0}, "checkpoint.every_n_minutes"),
        ({"stop_signals": ["SIGKILL"]}, "SIGKILL"),
        ({"stop_signals": ["SIGNOPE"]}, "SIGNOPE"),
    ],
)
def test_options_are_checked(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ContinualCheckpoint(**kwargs)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def training(tmp_path, **where):
    """A trainer in the middle of fit, as the callback's epoch- and batch-end hooks read it."""
    trainer = Trainer(tmp_path, b"state")
    trainer.callbacks, trainer.world_size, trainer.current_epoch, trainer.global_step = [], 1, 0, 0
    trainer.should_stop = False
    batch = SimpleNamespace(is_last_batch=where.get("last_batch", False))
    trainer.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=batch))
    return trainer


def written(tmp_path) -> bool:
    path = tmp_path / "checkpoints" / "last.ckpt"
    found = path.exists()
    if found:
        path.unlink()
    return found


def test_the_time_rule_writes_once_the_interval_has_passed(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("callbacks.checkpoint.time.monotonic", clock)
    callback = ContinualCheckpoint(every_n_minutes=1.0, stop_signals=[])
    trainer = training(tmp_path)
    callback.on_train_start(trainer, None)
    clock.now += 59
    callback.on_train_epoch_end(trainer, None)
    assert not written(tmp_path)  # 59 s: not yet
    clock.now += 1
    callback.on_train_epoch_end(trainer, None)
    assert written(tmp_path)  # 60 s since the start of training
    clock.now += 30
    trainer.global_step = 1
    callback.on_train_batch_start(trainer, None, None, 0)
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert not written(tmp_path)  # 30 s since that write
    clock.now += 30
    callback.on_train_batch_start(trainer, None, None, 1)
    trainer.global_step = 3
    callback.on_train_batch_end(trainer, None, None, None, 1)
    assert written(tmp_path)  # after a step too, once 60 s have passed again
    clock.now += 600
    last = training(tmp_path, last_batch=True)
    callback.on_train_batch_start(last, None, None, 2)
    last.global_step = 1
    callback.on_train_batch_end(last, None, None, None, 2)
    assert not written(tmp_path)  # never after an epoch's last batch: its epoch end writes instead


def test_without_rules_only_boundaries_write(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("callbacks.checkpoint.time.monotonic", clock)
    callback = ContinualCheckpoint(every_n_minutes=None, stop_signals=[])
    trainer = training(tmp_path)
    callback.on_train_start(trainer, None)
    for epoch in range(3):
        clock.now += 3600
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)
    assert not written(tmp_path)
    callback.on_task_boundary_start(trainer, None, 0)
    assert written(tmp_path)
    trainer.should_stop = True  # fit ends after this epoch: written, so the run can resume from it
    callback.on_train_epoch_end(trainer, None)
    assert written(tmp_path)
