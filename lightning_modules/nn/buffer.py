"""Reservoir replay memory, shared by ER, DER, DER++, LMSRR and the robot family.

Follows Mammoth's buffer: fixed capacity, reservoir insertion (Vitter's algorithm R: the n-th
example seen is kept with probability capacity/n), uniform sampling without replacement. Storage
is allocated once, at full capacity, on the first insertion. The buffer owns its random generator,
so a run resumed from a checkpoint draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cli.errors import ConfigError


class ReservoirBuffer:
    """`add(**fields)` inserts a batch by reservoir sampling; `sample(n)` draws n stored rows uniformly."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ConfigError(f"model.buffer_size must be at least 1, got {capacity}")
        self.capacity = capacity
        self.num_seen = 0
        self.data: dict[str, Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def _slots(self, n: int) -> tuple[Tensor, Tensor]:
        """Reservoir decisions for the next n examples: (positions in the batch, slots they go to)."""
        rows, slots = [], []
        for i in range(n):
            if self.num_seen < self.capacity:
                slot = self.num_seen
            else:
                slot = int(torch.randint(0, self.num_seen + 1, (1,), generator=self.generator))
            self.num_seen += 1
            if slot < self.capacity:
                rows.append(i)
                slots.append(slot)
        # A later example in the same batch replaces an earlier one sent to the same slot.
        last = {s: r for r, s in zip(rows, slots, strict=True)}
        return torch.tensor(list(last.values()), dtype=torch.long), torch.tensor(list(last), dtype=torch.long)

    def add(self, **fields: Tensor) -> None:
        """Offers a batch of examples; every field has the batch as its first dimension."""
        n = len(next(iter(fields.values())))
        if not self.data:
            self.data = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in fields.items()
            }
        elif fields.keys() != self.data.keys():
            raise ValueError(f"buffer holds fields {sorted(self.data)}, got {sorted(fields)}")
        rows, slots = self._slots(n)
        if len(rows):
            for k, v in fields.items():
                store = self.data[k]
                store[slots.to(store.device)] = v.detach()[rows.to(v.device)].to(store.device, store.dtype)

    def sample(self, size: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """min(size, len) stored examples drawn uniformly without replacement."""
        if len(self) == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        idx = torch.randperm(len(self), generator=self.generator)[: min(size, len(self))]
        out = {k: v[idx.to(v.device)] for k, v in self.data.items()}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "num_seen": self.num_seen,
            "data": {k: v[: len(self)] for k, v in self.data.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["capacity"] != self.capacity:
            raise ConfigError(
                f"the checkpoint's replay buffer holds {state['capacity']} examples per rank but this run has "
                f"{self.capacity}: resume with the buffer size and number of devices it was trained with"
            )
        self.num_seen = int(state["num_seen"])
        self.data = {}
        for k, v in state["data"].items():
            store = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=device)
            store[: len(v)] = v.to(device)
            self.data[k] = store
        self.generator.set_state(state["generator"])
