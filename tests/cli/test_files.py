"""`cli.files`: outputs appear whole or not at all, with the permissions a plain file would have."""

from __future__ import annotations

import errno
import os

import pytest

from cli.errors import ConfigError
from cli.files import atomic_write, atomic_write_text, check_output_file, check_output_folder


def private_writer(text: bytes):
    """Writes like a library that creates its files readable by the owner only (as safetensors does)."""

    def write(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(text)

    return write


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.bin", private_writer(b"a"))
        assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.bin").write_bytes(b"old")
        os.chmod(tmp_path / "old.bin", 0o640)
        atomic_write(tmp_path / "old.bin", private_writer(b"b"))
        assert (tmp_path / "old.bin").read_bytes() == b"b" and (tmp_path / "old.bin").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "report.json", "{}")

    def half_then_full_disk(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"half')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ConfigError, match=r"report.json: could not be written \(No space left on device\)"):
        atomic_write(tmp_path / "report.json", half_then_full_disk, "report")
    assert (tmp_path / "report.json").read_text() == "{}" and os.listdir(tmp_path) == ["report.json"]


def test_what_is_not_a_regular_file_or_folder_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out .*folder: exists and is not a regular file"):
        check_output_file(tmp_path / "folder", "--out")
    with pytest.raises(ConfigError, match="--out .*/file is not a folder"):
        check_output_file(tmp_path / "file" / "x.bin", "--out")
    with pytest.raises(ConfigError, match="--out .*/file is not a folder"):
        check_output_folder(tmp_path / "file" / "sub", "--out")
    assert check_output_folder(tmp_path / "new" / "sub", "--out") == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def _waiter(folder):
    """A thread that takes `folder_lock(folder)` and sets its event once it holds it."""
    import threading

    from cli.files import folder_lock

    got = threading.Event()

    def take():
        with folder_lock(folder):
            got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, got


def test_folder_lock_makes_a_second_holder_wait_and_leaves_no_file(tmp_path):
    from cli.files import folder_lock

    with folder_lock(tmp_path):
        thread, got = _waiter(tmp_path)
        assert not got.wait(0.5)  # held here: the other one waits
    assert got.wait(10)
    thread.join(10)
    assert os.listdir(tmp_path) == []


def test_folder_lock_falls_back_to_a_lock_file_where_a_folder_cannot_be_locked(tmp_path, monkeypatch):
    import stat

    import cli.files as files

    real = files.fcntl.flock

    def nfs_like(fd, op):  # NFS refuses an exclusive lock on a descriptor opened read-only, e.g. a folder's
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    monkeypatch.setattr(files.fcntl, "flock", nfs_like)
    with files.folder_lock(tmp_path):
        assert os.listdir(tmp_path) == [files.LOCK_FILE]
        thread, got = _waiter(tmp_path)
        assert not got.wait(0.5)
    assert got.wait(10)
    thread.join(10)


def test_folder_lock_follows_a_folder_removed_and_made_again_while_waiting(tmp_path):
    from cli.files import folder_lock

    folder = tmp_path / "cache"
    folder.mkdir()
    with folder_lock(folder):
        thread, got = _waiter(folder)
        assert not got.wait(0.5)
        folder.rmdir()  # a first maker that failed cleans up its new folder, still holding the lock
    assert got.wait(10)  # the waiter locks the folder at that path now, made again
    thread.join(10)
    assert folder.is_dir()
