"""Facts about the current run that datamodules, modules and callbacks all read."""

from __future__ import annotations

import os


def run_seed(default: int = 0) -> int:
    """The run's seed: what `seed_everything` set (LightningCLI's `seed_everything:`), else `default`."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))
