"""Facts about the current run that datamodules, modules and callbacks all read: its seed, and whether a
stop signal has arrived (the checkpoint callback installs the handlers and acts on them; long loops such as
evaluations and rollouts call `check_stop` between items)."""

from __future__ import annotations

import os
import signal
from typing import Any


def run_seed(default: int = 0) -> int:
    """The run's seed: what `seed_everything` set (LightningCLI's `seed_everything:`), else `default`."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one training step on one rank, distinct for every (seed, step, rank)."""
    return ((seed * 1_000_003 + step) * 10_007 + rank) % (2**63 - 1)


def seed_torch(seed: int) -> None:
    """Leaves every torch generator as `torch.manual_seed(seed)` does, at a fraction of its cost per step.

    `torch.manual_seed` also seeds every accelerator runtime torch is built with; one that has not started
    (CUDA, XPU, MTIA on a machine without them, or on the CPU build's stubs) gets the seed queued together
    with a formatted stack trace, about 0.5 ms under Lightning's deep stacks, every training step. Here a
    runtime that has started is seeded at once and one that could start is queued exactly as torch does; one
    that cannot start (nothing of it is available) is skipped, since its queue would never be read.
    """
    import torch

    seed = int(seed)
    for backend in (torch.cuda, torch.xpu, torch.mtia):
        if backend._is_in_bad_fork():  # torch.manual_seed skips these too
            continue
        if backend.is_initialized() or backend.is_available():
            backend.manual_seed_all(seed)
    torch.mps.manual_seed(seed)  # immediate, and nothing without MPS
    seed_custom_device = getattr(torch.random, "_seed_custom_device", None)
    if seed_custom_device is not None:
        seed_custom_device(seed)
    torch.default_generator.manual_seed(seed)


class StopRequested(Exception):
    """A stop signal was acted on; `exit_code` is 128 + the signal's number, the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Process-wide record of stop signals received (a handler may only set a flag) and of the last save."""

    received: list[int] = []
    last_saved: str | None = None
    #: rank 0 of a run that started its other ranks itself passes the signals on to them
    forward: Any = None
    previous: dict[int, Any] = {}

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in cls.received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if signum not in cls.received:
            cls.received.append(signum)
            if cls.forward is not None:
                cls.forward(signum)

    @classmethod
    def install(cls, signums: list[int]) -> None:
        for s in signums:
            if s not in cls.previous:
                cls.previous[s] = signal.getsignal(s)
            signal.signal(s, cls.handler)

    @classmethod
    def restore(cls) -> None:
        for s, old in cls.previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        cls.previous = {}
        cls.forward = None


def stop_signal() -> int | None:
    """The first stop signal this process received and has not yet acted on, else None."""
    return StopSignals.received[0] if StopSignals.received else None


def check_stop(where: str) -> None:
    """Raises `StopRequested` if a stop signal arrived; long loops (evaluation, rollouts) call it between items.
    Nothing is saved here: the last checkpoint (written before the boundary being evaluated) is the resume point."""
    signum = stop_signal()
    if signum is not None:
        saved = StopSignals.last_saved
        resume = f"resume from {saved} with --ckpt_path last" if saved else "no checkpoint was written yet"
        raise StopRequested(signum, f"stopped by {signal.Signals(signum).name} during {where}; {resume}")
