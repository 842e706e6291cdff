"""Small helpers for state that differs between DDP ranks (replay buffers hold each rank's own shard)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_cpu(obj: Any) -> Any:
    """Moves every tensor inside nested dicts/lists to the CPU (checkpoints must load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_rank_states(state: Any) -> list[Any]:
    """Every rank's `state`, indexed by rank; a collective, so all ranks must call it together."""
    rank, size = world()
    state = to_cpu(state)
    if size == 1:
        return [state]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, state)
    return out
