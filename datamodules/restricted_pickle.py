"""Reading pickled data files without running their code. Loading a pickle may call any importable
function the file names (`os.system`, `builtins.eval`, ...), so a file the suite did not write is read with
an unpickler that builds plain values (dicts, lists, strings, bytes, numbers) and numpy arrays, and
refuses every other class or function before calling it."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

try:  # numpy >= 2 (numpy.core remains as a deprecated alias)
    from numpy._core import multiarray, numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric


def _latin1(text: str, encoding: str) -> bytes:
    """What protocol-2 pickles written by Python 3 call (`_codecs.encode(text, "latin1")`) to store bytes."""
    if encoding != "latin1":
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


#: (module, name) a pickle may name -> what it gets: numpy's array and dtype reconstruction, under the
#: module names of numpy 1.x (and Python 2 pickles such as CIFAR's) and of numpy 2.x
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    **{(f"{core}.multiarray", "_reconstruct"): multiarray._reconstruct for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.multiarray", "scalar"): multiarray.scalar for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): numeric._frombuffer for core in ("numpy.core", "numpy._core")},
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a class or function outside the allowed set; the message names it as `module.name`."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose files can only build plain values and numpy arrays (see `_ALLOWED`)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"it names {module}.{name}, which loading would call; only numpy arrays and plain values are read"
            ) from None


def load_restricted(path: str | os.PathLike, encoding: str = "ASCII") -> Any:
    """The object pickled in `path`, built by `RestrictedUnpickler` (`encoding` as for `pickle.load`: "bytes"
    reads Python 2 strings as bytes). Raises `RefusedGlobal` for a file that names anything else."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding).load()
