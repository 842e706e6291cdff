"""Callbacks used by tests that run the CLI in subprocesses (DDP): they record per-rank state to files."""

from __future__ import annotations

import os

import torch

from callbacks.base import ContinualCallback


class RecordRankState(ContinualCallback):
    """After the first optimizer step of every task after the first, saves this rank's trainable tensors;
    at the end of fit, saves this rank's replay buffer."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._pending: int | None = None

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        self._pending = task_id if task_id > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is None:
            return
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(params, os.path.join(self.out_dir, f"params_task{self._pending}_rank{trainer.global_rank}.pt"))
        self._pending = None

    def on_fit_end(self, trainer, pl_module) -> None:
        buffer = getattr(pl_module, "buffer", None)
        if buffer is not None:
            torch.save(buffer.state_dict(), os.path.join(self.out_dir, f"buffer_rank{trainer.global_rank}.pt"))


class SignalAt(ContinualCallback):
    """Rank `rank` sends `signal` to its own process after optimizer step `step` (a real kill when the signal is
    SIGKILL), or, with `during_boundary_of` set, as that task's boundary begins to evaluate."""

    def __init__(
        self, signal: str = "SIGKILL", step: int | None = None, during_boundary_of: int | None = None, rank: int = 0
    ):
        import signal as signals

        self.signum = int(getattr(signals, signal))
        self.step = step
        self.during_boundary_of = during_boundary_of
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)

    def on_task_training_end(self, trainer, pl_module, task_id: int) -> None:
        if task_id == self.during_boundary_of and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class RecordLearningRates(ContinualCallback):
    """The learning rate (first parameter group) that each epoch's first optimizer step uses."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class RecordConceptRun(ContinualCallback):
    """For a text-to-image run: which evaluation prompts this rank generated (task, prompt) and, at the end
    of fit, the module's delta (tokens, experts, routers and their buffers) on this rank."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.prompts: list[list] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        eval_step = pl_module.eval_step

        def recording(batch, task_id):
            self.prompts += [[task_id, p] for p in batch["prompt"]]
            return eval_step(batch, task_id)

        pl_module.eval_step = recording

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        os.makedirs(self.out_dir, exist_ok=True)
        rank = trainer.global_rank
        with open(os.path.join(self.out_dir, f"prompts_rank{rank}.json"), "w") as f:
            json.dump(self.prompts, f)
        delta = {k: v.detach().clone() for k, v in pl_module.delta_state_dict().items()}
        torch.save(delta, os.path.join(self.out_dir, f"delta_rank{rank}.pt"))


class RecordTaskEnds(ContinualCallback):
    """Saves the module's delta at every task end, and the EMA teacher's weights (if one runs) after the first
    optimizer step of every task after the first, per rank."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._pending: int | None = None

    def on_task_end(self, trainer, pl_module, task_id: int) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        delta = {k: v.detach().clone() for k, v in pl_module.delta_state_dict().items()}
        torch.save(delta, os.path.join(self.out_dir, f"delta_task{task_id}_rank{trainer.global_rank}.pt"))

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        self._pending = task_id if task_id > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from callbacks import EMATeacher

        teachers = [cb for cb in trainer.callbacks if isinstance(cb, EMATeacher)]
        if self._pending is None or not teachers:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"teacher_task{self._pending}_rank{trainer.global_rank}.pt")
        torch.save({k: v.detach().cpu() for k, v in teachers[0].weights.items()}, path)
        self._pending = None


def check_deepspeed_claim(trainer, module) -> None:
    """A fit's check of its method's DeepSpeed claim: a method whose `deepspeed_unsupported()` gives no reason
    must give the optimizer the same parameters in every task (DeepSpeed keeps the first task's optimizer)."""
    from callbacks import TaskSwitch

    switch = next((c for c in trainer.callbacks if isinstance(c, TaskSwitch)), None)
    if switch is not None and module.deepspeed_unsupported() is None:
        assert not switch.trainable_changes, (
            f"{type(module).__name__} trains other parameters at task(s) {switch.trainable_changes} but its "
            "deepspeed_unsupported() gives no reason"
        )


class RecordRemovalRun(ContinualCallback):
    """For an object-removal run, per rank: the module's delta (what it learns) when training starts and at the end
    of fit, the (task, index) of every evaluation item this rank scored, and the datamodule's accepted count per
    round at the end of fit."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.items: list[list[int]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        eval_step = pl_module.eval_step

        def recording(batch, task_id):
            self.items += [[task_id, int(i)] for i in batch["index"]]
            return eval_step(batch, task_id)

        pl_module.eval_step = recording

    def _save_delta(self, trainer, pl_module, when: str) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        delta = {k: v.detach().cpu().clone() for k, v in pl_module.delta_state_dict().items()}
        torch.save(delta, os.path.join(self.out_dir, f"delta_{when}_rank{trainer.global_rank}.pt"))

    def on_train_start(self, trainer, pl_module) -> None:
        self._save_delta(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        self._save_delta(trainer, pl_module, "end")
        check_deepspeed_claim(trainer, pl_module)
        dm = trainer.datamodule
        accepted = [dm.accepted_count(k) for k in range(dm.num_tasks)] if hasattr(dm, "accepted_count") else []
        with open(os.path.join(self.out_dir, f"run_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"eval_items": self.items, "accepted": accepted}, f)
