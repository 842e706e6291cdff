"""`RichProgressBar`: Lightning's rich progress bar, redrawn and updated at a rate a reader can follow
instead of at every training step.

Lightning's bar updates its counters and metrics text at every step and asks its drawing thread for a
redraw each time; the thread redraws up to `refresh_rate` times a second (Lightning's default: 100), each
redraw holding the GIL for 1-1.5 ms. On steps of a millisecond (Split-Digits) that made the bar the largest
cost of the suite's loop after Lightning's own, ~0.8 ms per step in a terminal. This bar redraws at most
20 times a second by default and updates only when a redraw is due (and at an epoch's last batch, so every
epoch ends drawn complete); what it shows is Lightning's bar, at most 1 / `refresh_rate` s late.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar as _LightningRichProgressBar


class RichProgressBar(_LightningRichProgressBar):
    """Args: as Lightning's `RichProgressBar`, with `refresh_rate` (redraws per second, also the rate at which
    the bar follows the steps) 20 instead of 100. Lightning's drawing thread sleeps 1 / `refresh_rate` s between
    looks, so the end of fit waits up to that long for it (50 ms)."""

    def __init__(self, refresh_rate: int = 20, **kwargs: Any):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._last_update = float("-inf")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.refresh_rate > 0 and batch_idx + 1 < self.total_train_batches:
            now = time.monotonic()
            if now - self._last_update < 1 / self.refresh_rate:
                return  # not drawn before the next update anyway
            self._last_update = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
