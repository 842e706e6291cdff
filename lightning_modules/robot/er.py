"""Experience replay as in LIBERO / the DMPEL code: after each task its first windows are kept, and every
later step trains on the current batch concatenated with an equally large batch drawn from the kept ones.

    loss = mean NLL over [current batch; replay batch]
         = B/(B+R) nll + R/(B+R) replay_nll        (logged as train/nll and train/replay_nll)

The buffer holds window indices, not data: task t keeps windows 0..n_t-1 of its training set (windows
are ordered demo by demo, so this is the task's first demos), and replayed items are read back from the
datamodule's `train_dataset(t)` - images stay on disk, and the checkpoint needs only the counts n_t.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from cli.errors import ConfigError
from lightning_modules.robot.base import RobotImitationModule


class RobotER(RobotImitationModule):
    """Args:
    buffer_share: share of each finished task's windows kept for replay, its first ones (spec: 0.2).
    buffer_windows: keep the first this-many windows per task instead (LIBERO's original: 1000).
    """

    def __init__(self, *args: Any, buffer_share: float = 0.2, buffer_windows: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0.0 < buffer_share <= 1.0:
            raise ConfigError(f"model.buffer_share={buffer_share}: must be in (0, 1]")
        if buffer_windows is not None and buffer_windows < 1:
            raise ConfigError(f"model.buffer_windows={buffer_windows}: must be at least 1 (or null for buffer_share)")
        self.buffer_share = buffer_share
        self.buffer_windows = buffer_windows
        # n_t: task t's first n_t windows are in the buffer (the whole buffer; identical on every rank).
        self.register_buffer("replay_counts", torch.zeros(self.num_tasks, dtype=torch.long))

    def kept_windows(self, num_windows: int) -> int:
        """How many of a task's `num_windows` windows the buffer keeps (share 0.2: num_windows // 5, at least 1)."""
        if self.buffer_windows is not None:
            return min(self.buffer_windows, num_windows)
        return max(1, int(Fraction(str(self.buffer_share)) * num_windows))

    def buffer_indices(self) -> list[tuple[int, int]]:
        """The buffer's content: (task, window index) pairs in order."""
        return [(t, i) for t, n in enumerate(self.replay_counts.tolist()) for i in range(n)]

    def on_task_end(self, task_id: int) -> None:
        super().on_task_end(task_id)
        self.replay_counts[task_id] = self.kept_windows(len(self._dataset(task_id)))

    def _dataset(self, task_id: int) -> Dataset:
        return self.trainer.datamodule.train_dataset(task_id)  # the datamodule keeps its readers open

    def replay_batch(self, size: int) -> dict[str, Any]:
        """`size` windows drawn uniformly (with replacement) from the buffer, with the global RNG (which
        the datamodule seeds per step), read from the tasks' datasets and augmented like training batches."""
        counts = self.replay_counts[: self.current_task]
        flat = torch.randint(int(counts.sum()), (size,)).tolist()
        ends = counts.cumsum(0).tolist()
        items, tasks = [], []
        for f in flat:
            t = next(k for k, end in enumerate(ends) if f < end)
            items.append(self._dataset(t)[f - (ends[t] - int(counts[t]))])
            tasks.append(t)
        batch = default_collate(items)
        batch["task"] = torch.tensor(tasks, dtype=torch.long)
        return self.as_model_batch(batch, augment=True)

    def training_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.current_task == 0 or int(self.replay_counts[: self.current_task].sum()) == 0:
            return super().training_terms(batch)
        b = len(batch["actions"])
        memory = self.replay_batch(b)
        r = len(memory["actions"])
        obs = {k: torch.cat([v, memory["obs"][k].to(v.dtype)]) for k, v in batch["obs"].items()}
        task = torch.cat([batch["task"], memory["task"]])
        actions = torch.cat([batch["actions"], memory["actions"].to(batch["actions"].dtype)])
        nll = -self.policy(obs, self.lang(task)).log_prob(actions)  # (B + R, T), one forward for both
        return {"nll": b / (b + r) * nll[:b].mean(), "replay_nll": r / (b + r) * nll[b:].mean()}

    def added_memory(self, task_id: int) -> dict[str, int]:
        """What is stored for task `task_id`: its replayed windows (indices; the data stays on disk)."""
        return {"replay_windows": int(self.replay_counts[task_id])}


ER = RobotER
