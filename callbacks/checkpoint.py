"""`ContinualCheckpoint`: a recent `last.ckpt` at all times, and stop signals that save and stop cleanly.

`last.ckpt` (in `<default_root_dir>/checkpoints/`) is rewritten just before every task boundary (so a run
killed while a boundary evaluates resumes by redoing the boundary, not the task) at the end of each task's
last epoch (after the task switch, so it holds the next task's start) and of an epoch after which fit stops;
in between, once
`every_n_minutes` have passed since the last write (checked after every step and epoch; 10 by default), and
on the optional rules `every_n_epochs` and `every_n_train_steps`. A time rule rather than a write per epoch:
on small steps (Split-Digits) a write per epoch cost more than the epoch, and a stop signal writes one anyway.
Each write goes to a temporary file in the same folder and is renamed over the previous one, so a kill or a
full disk never leaves a truncated checkpoint.

Stop signals (SIGTERM, SIGUSR1, SIGINT by default) only set a flag in the handler. The training loop acts
on it at the next step: every rank agrees (one small all-reduce per step under DDP, so a signal that
reached one rank stops all of them), the checkpoint is written, SLURM's requeue signal requeues the job
(`scontrol requeue`), and the run exits with 128 + the signal's number (143 for SIGTERM), never 0.
Evaluation and rollouts check the flag between batches, so a signal during a long evaluation stops within
a batch, leaving the checkpoint written before the boundary. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from callbacks.base import ContinualCallback
from cli.errors import ConfigError
from cli.files import temporary_name
from cli.runtime import StopRequested, StopSignals, stop_signal

#: the file every save replaces; `--ckpt_path last` resumes from it
LAST = "last.ckpt"


class ContinualCheckpoint(ContinualCallback, Checkpoint):
    """Keeps `last.ckpt` current and turns stop signals into a saved, resumable stop.

    Args:
        dirpath: folder of `last.ckpt` (default: `<trainer.default_root_dir>/checkpoints`).
        every_n_epochs: also write at the end of every n-th epoch (0, the default: no epoch rule); the end of a
            task's last epoch is always written.
        every_n_minutes: also write after a step or at an epoch's end once this long has passed since the
            last write (None: no time rule). Rank 0's clock decides, for every rank.
        every_n_train_steps: also write every n optimizer steps (inside epochs); None: off.
        stop_signals: signal names that save and stop the run (empty: Lightning's default handling).
        slurm_requeue: under SLURM, SIGUSR1 (the signal `#SBATCH --signal=SIGUSR1@90` sends before the time
            limit) also requeues the job (`scontrol requeue`); SIGTERM (scancel) only saves and stops.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 0,
        every_n_minutes: float | None = 10.0,
        every_n_train_steps: int | None = None,
        stop_signals: list[str] | None = None,
        slurm_requeue: bool = True,
    ):
        if every_n_epochs < 0:
            raise ConfigError(f"checkpoint.every_n_epochs must be 0 or more, got {every_n_epochs}")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ConfigError(f"checkpoint.every_n_minutes must be above 0 (or null), got {every_n_minutes}")
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(f"checkpoint.every_n_train_steps must be at least 1 (or null), got {every_n_train_steps}")
        names = ["SIGTERM", "SIGUSR1", "SIGINT"] if stop_signals is None else list(stop_signals)
        valid = sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals))
        unknown = [n for n in names if n not in valid or n in ("SIGKILL", "SIGSTOP")]
        if unknown:
            raise ConfigError(
                f"checkpoint.stop_signals: {unknown} cannot be handled; use names such as SIGTERM, SIGUSR1"
            )
        self.dirpath = dirpath
        self.every_n_epochs = every_n_epochs
        self.every_n_minutes = every_n_minutes
        self.every_n_train_steps = every_n_train_steps
        self.stop_signals = [int(getattr(signal, n)) for n in names]
        self.slurm_requeue = slurm_requeue
        #: the run's settings (set by the CLI), written into every checkpoint so a resume can check them
        self.settings: dict[str, Any] | None = None
        self._step_at_batch_start = -1
        self._last_write = time.monotonic()

    # -- where ---------------------------------------------------------------------------------------------
    def folder(self, trainer: L.Trainer) -> str:
        return os.path.realpath(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))

    def last_path(self, trainer: L.Trainer) -> str:
        return os.path.join(self.folder(trainer), LAST)

    # -- signals -------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        StopSignals.received = []
        StopSignals.last_saved = None
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_write = time.monotonic()  # the time rule counts from the start of training
        # Lightning registers its own SIGTERM handler (a collective inside the handler, then exit code 0)
        # after `setup`: take the signals back.
        self._install(trainer)

    def _install(self, trainer: L.Trainer) -> None:
        if not self.stop_signals:
            return
        launcher = trainer.strategy.launcher
        StopSignals.forward = launcher.kill if trainer.global_rank == 0 and getattr(launcher, "procs", None) else None
        try:
            StopSignals.install(self.stop_signals)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            StopSignals.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        StopSignals.restore()

    def _time_due(self, trainer: L.Trainer) -> bool:
        """Whether `every_n_minutes` have passed since the last write, on rank 0's clock."""
        return self.every_n_minutes is not None and time.monotonic() - self._last_write >= 60 * self.every_n_minutes

    def _agreed(self, trainer: L.Trainer) -> tuple[int | None, bool]:
        """(the stop signal if any rank received one, the largest number, else None; whether the time rule is
        due on rank 0): one collective under DDP, none in one process."""
        signum = (stop_signal() or 0) if self.stop_signals else 0
        due = self._time_due(trainer)
        if trainer.world_size > 1 and (self.stop_signals or self.every_n_minutes is not None):
            local = torch.tensor([signum, int(due and trainer.is_global_zero)], device=trainer.strategy.root_device)
            signum, due = (int(v) for v in trainer.strategy.reduce(local, reduce_op="max").tolist())
        if signum and signum not in StopSignals.received:
            StopSignals.received.append(signum)
        return signum or None, bool(due)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        path = self.last_path(trainer)
        name = signal.Signals(signum).name
        requeue = self.slurm_requeue and signum == signal.SIGUSR1 and SLURMEnvironment.detect()
        if requeue:
            requeue = trainer.strategy.broadcast(_requeue_slurm_job() if trainer.is_global_zero else False)
        what = "the job is requeued and resumes from it" if requeue else "resume with --ckpt_path last"
        raise StopRequested(signum, f"stopped by {name} at step {trainer.global_step}; saved {path}: {what}")

    # -- when ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A checkpoint written after an epoch's last batch would resume past that epoch's end hooks (Lightning
        # counts the epoch as done), skipping the task switch: the epoch-end write covers that batch instead.
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        stepped = trainer.global_step > self._step_at_batch_start
        signum, time_due = self._agreed(trainer)
        if last_batch or not stepped:
            return
        n = self.every_n_train_steps
        if signum is not None or time_due or (n is not None and trainer.global_step % n == 0):
            self.save(trainer)
        if signum is not None:
            self._stop(trainer, signum)

    def on_task_boundary_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs after the task switch (Lightning calls checkpoint callbacks last), so the file holds its result."""
        from callbacks.task_switch import TaskSwitch

        switch = next((cb for cb in trainer.callbacks if isinstance(cb, TaskSwitch)), None)
        n = self.every_n_epochs
        due = (switch is not None and switch.ended_task_this_epoch) or (n > 0 and (trainer.current_epoch + 1) % n == 0)
        due = due or trainer.should_stop  # fit ends here (early stopping, a module's own stop): resumable from here
        signum, time_due = self._agreed(trainer)
        if due or time_due or signum is not None:
            self.save(trainer)
        if signum is not None:
            self._stop(trainer, signum)

    # -- how -----------------------------------------------------------------------------------------------
    def save(self, trainer: L.Trainer) -> str:
        """Writes `last.ckpt` through a temporary file and a rename (every rank calls it: it is a collective)."""
        path = self.last_path(trainer)
        tmp = str(temporary_name(path)) if trainer.is_global_zero else path + ".unused"
        tmp = trainer.strategy.broadcast(tmp)
        try:
            if trainer.is_global_zero:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            trainer.save_checkpoint(tmp, weights_only=False)
        except OSError as err:
            _remove(tmp)
            raise ConfigError(
                f"checkpoint {path}: could not be written ({err.strerror or err}); the previous one is unchanged: "
                "free space or set checkpoint.dirpath to another folder"
            ) from None
        if trainer.is_global_zero:
            _replace(tmp, path)
        trainer.strategy.barrier("ContinualCheckpoint.save")
        StopSignals.last_saved = path
        self._last_write = time.monotonic()
        return path

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["lifelong"] = {"settings": self.settings}


def _replace(tmp: str, path: str) -> None:
    """Renames `tmp` over `path`; a folder (DeepSpeed writes one per checkpoint) is swapped in two renames."""
    if os.path.isdir(tmp) and os.path.isdir(path):
        old = str(temporary_name(path)) + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _requeue_slurm_job() -> bool:
    """`scontrol requeue` for this job (an array task's id is `<array job>_<task>`); whether it succeeded."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False)
    except OSError as err:
        rank_zero_info(f"scontrol requeue {job} could not run ({err.strerror or err})")
        return False
    rank_zero_info(f"scontrol requeue {job}: exit code {result.returncode}")
    return result.returncode == 0
