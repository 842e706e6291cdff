"""Facts about the current run that datamodules, modules and callbacks all read."""

from __future__ import annotations

import os


def run_seed(default: int = 0) -> int:
    """The run's seed: what `seed_everything` set (LightningCLI's `seed_everything:`), else `default`."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one training step on one rank, distinct for every (seed, step, rank)."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1)
