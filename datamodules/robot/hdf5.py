"""Reads one robomimic / LIBERO demonstration file (`data/demo_i/obs/<key>`, `data/demo_i/actions`) as
training windows: one window of `window` consecutive steps per start index of every demo.

What it covers of robomimic's `SequenceDataset(seq_length=T, frame_stack=1, pad_seq_length=True,
hdf5_cache_mode="low_dim", load_next_obs=False)`: demos in numeric order, end padding by repeating the
last step, images uint8 HWC -> float32 CHW in [0, 1], low-dim keys and actions cached in RAM, images read
from the file on access, one lazily opened h5py handle per process. What it leaves out: goal modes,
frame stacking, observation normalisation, filter keys (`mask/<key>`), `next_obs` and padding masks; none
of them is used by the LIBERO recipes. We read the files ourselves because robomimic's dataset needs its
global `ObsUtils` initialised in every process (DataLoader workers included) and its declared
dependencies pull torchvision; the tests check every window against robomimic's class.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules.robot.stream import is_image_key

_DEMO = re.compile(r"demo_(\d+)$")
LAYOUT = "data/demo_<i>/obs/<key> and data/demo_<i>/actions (robomimic / LIBERO layout)"


@dataclass(frozen=True)
class DemoFileInfo:
    """What a demo file holds, read from its attributes and dataset shapes without loading any data.
    `obs_shapes` is per step as the reader returns it: (d,) for low-dim keys, (3, H, W) for cameras."""

    path: str
    instruction: str
    env_name: str
    demos: tuple[str, ...]
    lengths: tuple[int, ...]
    obs_shapes: dict[str, tuple[int, ...]]
    action_dim: int

    @property
    def num_demos(self) -> int:
        return len(self.demos)

    @property
    def total(self) -> int:
        return sum(self.lengths)


def default_instruction(path: str | os.PathLike) -> str:
    """LIBERO's rule for a file without `problem_info`: its name with underscores as spaces, minus `_demo`."""
    stem = Path(path).name.removesuffix(".hdf5").removesuffix(".h5")
    return stem.removesuffix("_demo").replace("_", " ").strip()


def _open(path: str | os.PathLike):
    import h5py

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: demonstration file not found; check data.root (Meta-World: lifelong make-demos)")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ConfigError(f"{path}: not an HDF5 file ({err}); expected {LAYOUT}") from None


def _attr(group, name: str, default=None):
    value = group.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _demo_names(f, path) -> list[str]:
    data = f.get("data")
    names = [k for k in data.keys() if _DEMO.match(k)] if data is not None and hasattr(data, "keys") else []
    if not names:
        raise ConfigError(f"{path}: no data/demo_<i> groups; expected {LAYOUT}")
    for name in names:
        demo = data[name]
        if "actions" not in demo or "obs" not in demo:
            raise ConfigError(f"{path}: data/{name} lacks 'actions' or 'obs'; expected {LAYOUT}")
    return sorted(names, key=lambda k: int(_DEMO.match(k).group(1)))


def _instruction(f, path) -> str:
    info = _attr(f["data"], "problem_info")
    if info:
        try:
            text = json.loads(info).get("language_instruction")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if text:
            return str(text).strip()
    return default_instruction(path)


def _step_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if is_image_key(key):
        h, w, c = shape
        return (c, h, w)
    return shape if shape else (1,)


def read_info(path: str | os.PathLike) -> DemoFileInfo:
    """The file's instruction, demo names (numeric order), lengths, per-step shapes and action size."""
    with _open(path) as f:
        demos = _demo_names(f, path)
        first = f["data"][demos[0]]
        obs_shapes = {k: _step_shape(k, tuple(first["obs"][k].shape[1:])) for k in first["obs"].keys()}
        lengths = tuple(int(f["data"][d]["actions"].shape[0]) for d in demos)
        return DemoFileInfo(
            path=str(path),
            instruction=_instruction(f, path),
            env_name=str(_attr(f["data"], "env_name", "")),
            demos=tuple(demos),
            lengths=lengths,
            obs_shapes=obs_shapes,
            action_dim=int(first["actions"].shape[1]),
        )


class DemoWindows(Dataset):
    """Windows of `window` steps over the demos of one file; item `{"obs": {key: (T, ...)}, "actions": (T, A)}`
    (float32; plus `"task"` when `task` is given, as the training batches carry it).

    Windows start at every step of every demo, demos in numeric order; past a demo's end its last step
    is repeated. `demos` keeps only the first n demos.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        obs_keys: list[str] | tuple[str, ...],
        window: int = 10,
        demos: int | None = None,
        task: int | None = None,
    ):
        if window < 1:
            raise ConfigError(f"data.window={window}: must be at least 1")
        self.path = str(path)
        self.obs_keys = tuple(obs_keys)
        self.window = window
        self.task = task
        info = read_info(path)
        if demos is not None and not 1 <= demos <= info.num_demos:
            raise ConfigError(f"data.demos={demos}: {path} holds {info.num_demos} demos; use 1..{info.num_demos}")
        self.info = info
        self.demo_names = list(info.demos[:demos] if demos is not None else info.demos)
        self.lengths = np.array(info.lengths[: len(self.demo_names)], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        missing = [k for k in self.obs_keys if k not in info.obs_shapes]
        if missing:
            raise ConfigError(f"data.obs_keys: {missing} not in {path}; available keys: {sorted(info.obs_shapes)}")
        self.image_keys = [k for k in self.obs_keys if is_image_key(k)]
        self.lowdim: dict[str, Tensor] = {}
        with _open(path) as f:
            data = f["data"]
            for name, n in zip(self.demo_names, self.lengths, strict=True):
                for k in self.obs_keys:
                    ds = data[name]["obs"][k]
                    if ds.shape[0] != n:
                        raise ConfigError(f"{path}: data/{name}/obs/{k} has {ds.shape[0]} steps, actions {n}")
                    if not is_image_key(k) and ds.dtype == np.uint8 and ds.ndim == 4:
                        raise ConfigError(f"{path}: obs key {k!r} holds images; camera keys must end with '_rgb'")
            actions = [np.asarray(data[name]["actions"], dtype=np.float32) for name in self.demo_names]
            self.actions = torch.from_numpy(np.concatenate(actions))
            for k in self.obs_keys:
                if not is_image_key(k):
                    parts = [np.asarray(data[name]["obs"][k], dtype=np.float32) for name in self.demo_names]
                    flat = np.concatenate(parts)
                    self.lowdim[k] = torch.from_numpy(flat.reshape(len(flat), -1) if flat.ndim == 1 else flat)
        self._file = None
        self._pid: int | None = None

    # -- file handle: opened lazily in each process, never pickled ------------------------------------
    @property
    def file(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: h5py may already be gone)
            pass

    # -- windows --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Window `index` -> (demo position, start step in that demo)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range 0..{len(self) - 1}")
        d = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return d, int(index - self.offsets[d])

    def __getitem__(self, index: int) -> dict:
        d, start = self.locate(int(index))
        n = int(self.lengths[d])
        steps = np.minimum(np.arange(start, start + self.window), n - 1)
        rows = torch.from_numpy(self.offsets[d] + steps)
        obs = {}
        for k in self.obs_keys:
            if is_image_key(k):
                stop = min(start + self.window, n)
                frames = np.asarray(self.file["data"][self.demo_names[d]]["obs"][k][start:stop])
                frames = frames[steps - start]  # the end padding: the last frame read repeats
                obs[k] = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0).clamp_(0.0, 1.0)
            else:
                obs[k] = self.lowdim[k][rows]
        item = {"obs": obs, "actions": self.actions[rows]}
        if self.task is not None:
            item["task"] = torch.tensor(self.task, dtype=torch.long)
        return item
