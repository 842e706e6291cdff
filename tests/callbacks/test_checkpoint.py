"""`ContinualCheckpoint.save` replaces `last.ckpt` only with a complete file, and its options are checked."""

from __future__ import annotations

import errno

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
        ({"stop_signals": ["SIGKILL"]}, "SIGKILL"),
        ({"stop_signals": ["SIGNOPE"]}, "SIGNOPE"),
    ],
)
def test_options_are_checked(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        ContinualCheckpoint(**kwargs)
