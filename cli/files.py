"""Writing files the suite produces without ever harming what is already there.

Every output (checkpoints, exports, reports, demonstrations, images) is written to a temporary file in
the destination's folder and renamed over the destination only once it is complete, so a kill, a full
disk or an error leaves the previous version intact. A destination that exists but is not a regular
file (a folder, a device, a socket) is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cli.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folder_lock does nothing
    fcntl = None


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a Path if a file may be written there (new, or a regular file to replace); else ConfigError
    naming `option` (e.g. "--out") and the path."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ConfigError(f"{option} {p}: exists and is not a regular file; choose a new file name")
    _check_writable(p.parent if str(p.parent) else Path("."), p, option)
    return p


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` as a Path if files may be written into it (an existing folder, or one that can be created);
    else ConfigError naming `option` and the path."""
    p = Path(path)
    _check_writable(p, p, option)
    return p


def _check_writable(folder: Path, given: Path, option: str) -> None:
    """The nearest existing one of `folder` and its parents must be a folder this process may write into."""
    for existing in (folder, *folder.resolve().parents):
        if existing.exists():
            if not existing.is_dir():
                raise ConfigError(f"{option} {given}: {existing} is not a folder; choose a folder for the files")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"{option} {given}: {existing} is not writable; choose a folder you can write to")
            return


#: the lock file `folder_lock` falls back to where a folder itself cannot be locked (NFS, some FUSE mounts)
LOCK_FILE = ".lifelong.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive advisory lock on an existing folder while the block runs: processes that make the same
    files there take turns, and each checks inside the block whether another has already made them.

    The lock is `flock` on the folder itself, so no file is left behind; where the filesystem refuses that (NFS
    turns `flock` into a byte-range lock, which a folder opened read-only cannot take) it locks a hidden
    `LOCK_FILE` inside instead. A folder removed and made again while this process waited is locked anew. Without
    `fcntl` (Windows) it does nothing."""
    if fcntl is None:
        yield
        return
    fd = _locked(Path(folder))
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _locked(folder: Path) -> int:
    """An open descriptor holding the lock on `folder` (or on its lock file), the one at that path now."""
    while True:
        target = folder
        fd = os.open(target, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            target = folder / LOCK_FILE
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(target)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the folder was removed (a failed first maker cleans up) while this process waited
        folder.mkdir(parents=True, exist_ok=True)


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name beside `path`, unique to this process, for writing before the rename."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], option: str = "output") -> None:
    """Calls `write(tmp)` to write a temporary file beside `path`, then renames it over `path`.

    On any failure the temporary file is removed and `path` is left as it was; a full disk or a
    folder that cannot be written to becomes a ConfigError naming `option` and the path.
    """
    p = check_output_file(path, option)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(p)
    try:
        write(str(tmp))
        os.chmod(tmp, _file_mode(p))  # some writers create private files; keep what a plain `open` would give
        os.replace(tmp, p)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise ConfigError(
                f"{option} {p}: could not be written ({os.strerror(err.errno)}); the previous file, if any, is "
                "unchanged: free space or choose another folder"
            ) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _file_mode(path: Path) -> int:
    """The permissions `path` should get: those of the file it replaces, else what the umask allows."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str, option: str = "output") -> None:
    """`atomic_write` of a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, option)


def load_torch_file(path: str | os.PathLike, option: str) -> Any:
    """A torch file a user hands in (a checkpoint, weights), loaded as plain data: `weights_only=True`, so no
    code in it runs. A missing, unreadable or foreign file is a ConfigError naming `option` and the path."""
    import torch

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{option} {p}: not found")
    if p.is_dir():
        raise ConfigError(f"{option} {p}: a folder, not a file; pass the file inside it")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (zip, pickle and unpickling errors vary)
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        raise ConfigError(
            f"{option} {p}: not a torch file, or a truncated one ({type(err).__name__}{': ' if reason else ''}{reason})"
        ) from None
