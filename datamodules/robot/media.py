"""What a recorded rollout looks like to a reader: an animated GIF of its camera frames where MuJoCo renders,
else its state trajectory drawn as a figure; for TensorBoard (`log_rollout`) and for files (`write_rollout`).

GIFs are encoded with Pillow and written as TensorBoard image summaries (TensorBoard plays an animated GIF
in its Images tab), so no video package is needed. The figure plots the first `TRAJECTORY_DIMS` entries of
each step's low-dimensional observation (Meta-World's state starts with the hand's x, y, z and the gripper
opening; LIBERO's joint states with the first joints) over the episode, with the step that solved the task
marked.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from cli.errors import ConfigError

#: leading entries of the low-dimensional observation drawn in the trajectory figure
TRAJECTORY_DIMS = 4
#: frames per second of the GIFs (Meta-World and LIBERO control at 80 and 20 Hz; a readable pace)
GIF_FPS = 20


def gif_bytes(frames: np.ndarray, fps: int = GIF_FPS) -> bytes:
    """An animated GIF (looping) of `frames`, (T, H, W, 3) uint8."""
    from PIL import Image

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got {frames.shape}")
    images = [Image.fromarray(f) for f in frames]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    return out.getvalue()


def trajectory_figure(states: np.ndarray, solved: bool, title: str):
    """A matplotlib figure of the episode's low-dimensional states (T, D): the first `TRAJECTORY_DIMS`
    entries against the step; the last step is marked as the solving one when `solved`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = np.asarray(states, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = np.arange(len(states))
    for d in range(min(TRAJECTORY_DIMS, states.shape[1] if states.ndim == 2 else 0)):
        ax.plot(steps, states[:, d], label=f"state[{d}]")
    if solved and len(states):
        ax.axvline(len(states) - 1, color="black", linestyle="--", linewidth=1, label="solved")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def low_dim(obs: dict[str, np.ndarray]) -> np.ndarray:
    """One step's low-dimensional observation entries (images left out), concatenated in key order."""
    parts = [np.asarray(v, dtype=np.float32).ravel() for _, v in sorted(obs.items()) if np.ndim(v) <= 1]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def log_rollout(experiment: Any, tag: str, frames: np.ndarray | None, states: np.ndarray, solved: bool, step: int):
    """Writes one recorded episode to a TensorBoard `SummaryWriter`: `tag` as an animated GIF when there are
    frames, else `tag` as the trajectory figure. Returns which was written: "video" or "figure"."""
    if frames is not None and len(frames):
        from tensorboard.compat.proto.summary_pb2 import Summary

        t, h, w, c = np.asarray(frames).shape
        image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames))
        experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        return "video"
    title = f"{tag}: {'solved' if solved else 'not solved'} in {len(states)} steps (no rendering: states)"
    experiment.add_figure(tag, trajectory_figure(states, solved, title), global_step=step)
    return "figure"


def write_rollout(path: str, frames: np.ndarray | None, states: np.ndarray, solved: bool, title: str) -> str:
    """Writes one recorded episode to `path`: a GIF of the frames (`.gif`), or the trajectory figure (`.png`).
    A `.gif` without frames (no rendering here) is one ConfigError line that names the `.png` alternative."""
    from cli.files import atomic_write

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".gif", ".png"):
        raise ConfigError(f"--out {path}: write a .gif (camera frames) or a .png (the state trajectory)")
    if suffix == ".gif":
        if frames is None or not len(frames):
            raise ConfigError(
                f"--out {path}: MuJoCo cannot render here, so there are no frames for a GIF; set MUJOCO_GL=egl "
                "(GPU) or MUJOCO_GL=osmesa (CPU, needs libosmesa), or write the state trajectory as a .png"
            )
        data = gif_bytes(frames)
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(data), "--out")
        return str(out)
    import matplotlib.pyplot as plt

    fig = trajectory_figure(states, solved, title)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"), "--out")
    finally:
        plt.close(fig)
    return str(out)
