"""RID, reward incremental distillation (Wang et al., 2024): a LoRA group (a fresh adapter per reward, the
earlier ones frozen) plus momentum distillation from an EMA teacher while the new reward is learned.

    L = -s_t r_t(x_0) + lambda_md * mean_k || eps_theta(x_k, k, c) - sg(eps_teacher(x_k, k, c)) ||^2

over the denoising steps k of the student's own trajectory that keep their graph. The teacher is the
exponential moving average of the trained adapter (`callbacks.EMATeacher`, reset to the student at each
reward's start, when it equals the model after the previous reward because the new adapter's B is 0).

No code of RID was released; the spec (`specs/diffusion_r2moe_rid.md`, B.3) reconstructs it, and every
unverified choice is an option here:
- distillation target (`distill_target`): `noise`, the teacher's conditional noise prediction on the same
  input (the spec's recommended reading, the default), or `guided_noise`, the CFG-combined prediction;
- distillation weight `distill_weight` (lambda_md; the spec: 1-10 relative to the 0.01-scaled reward loss);
- EMA momentum: `EMATeacher.momentum` (the spec's 0.999);
- the reward-gradient backbone: DRaFT-K or AlignProp truncation (`truncation`, `backprop_steps`).
`RewardDistillation` is the ablation without the group: one adapter, the same distillation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.diffusion.reward_tuning import RewardTuningModule


class RID(RewardTuningModule):
    """Args (besides `RewardTuningModule`'s): distill_weight (lambda_md), distill_target (`noise` or
    `guided_noise`). Needs `callbacks.EMATeacher` in `trainer.callbacks`."""

    ADAPTER_PER_TASK = True

    def __init__(self, *args: Any, distill_weight: float = 1.0, distill_target: str = "noise", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if distill_target not in ("noise", "guided_noise"):
            raise ConfigError(f"model.distill_target: {distill_target!r} is not one of 'noise', 'guided_noise'")
        if distill_weight < 0:
            raise ConfigError(f"model.distill_weight must be at least 0, got {distill_weight}")
        self.distill_weight = distill_weight
        self.distill_target = distill_target
        self._teacher: dict[str, Tensor] | None = None

    def on_fit_start(self) -> None:
        """The callbacks' `on_fit_start` ran first: EMATeacher has handed over its tensors by now."""
        if self.distill_weight > 0 and self._teacher is None:
            raise ConfigError(
                f"{type(self).__name__} distils from an EMA teacher: add callbacks.EMATeacher to trainer.callbacks"
            )

    # -- the EMA teacher's interface (callbacks.EMATeacher) ----------------------------------------
    def ema_parameters(self) -> dict[str, nn.Parameter]:
        """What the teacher averages: the adapter the current reward trains (the rest is shared and frozen)."""
        return self.adapter_parameters(self.adapter_of(self.current_task))

    def set_ema_teacher(self, weights: dict[str, Tensor] | None) -> None:
        """The callback hands over its averaged tensors (keyed as `ema_parameters`); read, never written here.
        They are kept under the UNet's own parameter names (the same tensors, which the callback updates in
        place), as the teacher's forward swaps them into the UNet."""
        prefix = "parts.unet."
        self._teacher = None if weights is None else {k.removeprefix(prefix): v for k, v in weights.items()}

    def teacher_prediction(self, latents: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        """The UNet with the teacher's adapter weights in place of the student's (the same module, the
        parameters swapped for this call only)."""
        if self._teacher is None:
            raise ConfigError(
                f"{type(self).__name__} distils from an EMA teacher: add callbacks.EMATeacher to trainer.callbacks"
            )
        out = torch.func.functional_call(self.parts.unet, self._teacher, (latents, timestep, context))
        return out.sample

    def step_losses(self, step: int, latents: Tensor, timestep: Tensor, prediction: Tensor, context: Tensor) -> dict:
        if self.distill_weight == 0:
            return {}
        guided = self.train_guidance_scale > 1
        with torch.no_grad():
            if guided and self.distill_target == "noise":  # the conditional half is all the target needs
                teacher = self.teacher_prediction(latents.chunk(2)[1], timestep, context.chunk(2)[1])
            else:
                teacher = self.teacher_prediction(latents, timestep, context)
        student = prediction
        if guided:
            if self.distill_target == "noise":
                student = prediction.chunk(2)[1]
            else:
                g = self.train_guidance_scale
                (su, sc), (tu, tc) = prediction.chunk(2), teacher.chunk(2)
                student, teacher = su + g * (sc - su), tu + g * (tc - tu)
        return {"distill": self.distill_weight * F.mse_loss(student.float(), teacher.float())}


class RewardDistillation(RID):
    """RID's distillation without the LoRA group: one adapter every reward trains, distilled from its EMA."""

    ADAPTER_PER_TASK = False
