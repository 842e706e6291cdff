"""`EMATeacher`: an exponential moving average of the parameters a module names, as a distillation teacher.

The module says what to average (`ema_parameters()`: name -> parameter) and receives the averaged tensors
(`set_ema_teacher(weights)`, keyed like `ema_parameters`); the callback never reaches into the module
otherwise. At each task start the teacher is reset to the student (RID: the model after the previous task,
since the new adapter starts at zero); after every optimiser step

    teacher <- momentum * teacher + (1 - momentum) * student.

The averaged tensors are in the checkpoint (a resumed run distils from the same teacher). Under DDP the
student is the same on every rank after each step (its gradients are averaged), so the teacher is too.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from callbacks.base import ContinualCallback
from cli.errors import ConfigError


class EMATeacher(ContinualCallback):
    """Args: momentum: the weight of the old average at each update (the spec's 0.999); every_n_steps:
    update after every n-th optimiser step (with momentum ** n then, the same decay per step on average)."""

    def __init__(self, momentum: float = 0.999, every_n_steps: int = 1):
        if not 0 <= momentum < 1:
            raise ConfigError(f"ema_teacher.momentum must be in [0, 1), got {momentum}")
        if every_n_steps < 1:
            raise ConfigError(f"ema_teacher.every_n_steps must be at least 1, got {every_n_steps}")
        self.momentum = momentum
        self.every_n_steps = every_n_steps
        self.weights: dict[str, Tensor] = {}
        self.updates = 0
        self._last_step = -1

    @staticmethod
    def _check(pl_module: L.LightningModule) -> None:
        for hook in ("ema_parameters", "set_ema_teacher"):
            if not callable(getattr(pl_module, hook, None)):
                raise ConfigError(
                    f"ema_teacher: {type(pl_module).__name__} has no {hook}(); the EMA teacher serves methods that "
                    "distil from one (e.g. RID): remove the callback for this method"
                )

    def reset(self, pl_module: L.LightningModule) -> None:
        """The teacher becomes a copy of the student's current parameters."""
        self.weights = {k: p.detach().clone() for k, p in pl_module.ema_parameters().items()}
        self.updates = 0
        pl_module.set_ema_teacher(self.weights)

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA step towards the student's parameters."""
        momentum = self.momentum**self.every_n_steps
        for k, p in pl_module.ema_parameters().items():
            self.weights[k].lerp_(p.detach().to(self.weights[k].dtype), 1 - momentum)
        self.updates += 1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(pl_module)
        self._last_step = trainer.global_step
        if not self.weights:
            self.reset(pl_module)
            return
        names = set(pl_module.ema_parameters())
        if set(self.weights) != names:
            raise ConfigError(
                "ema_teacher: the checkpoint's teacher does not average this model's parameters; resume with the "
                "method and settings it was trained with"
            )
        self.weights = {k: v.to(pl_module.device) for k, v in self.weights.items()}
        pl_module.set_ema_teacher(self.weights)

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        self.reset(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimiser step (gradient accumulation)
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self.update(pl_module)

    def state_dict(self) -> dict:
        return {
            "momentum": self.momentum,
            "updates": self.updates,
            "weights": {k: v.detach().cpu() for k, v in self.weights.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.weights = dict(state_dict["weights"])
        self.updates = int(state_dict["updates"])
