"""DDIM sampling with gradients through the last denoising steps only, for reward-gradient tuning
(DRaFT-K: a fixed number K of final steps; AlignProp: from a random truncation point). Every step is
diffusers' `DDIMScheduler.step` (with eta, its variance noise drawn from the caller's generator); the steps
before the truncation point run without a graph, so memory grows with K, not with the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: unet_call(latents (B' x C x h x w), timestep) -> the noise prediction on the UNet's input batch
UNetCall = Callable[[Tensor, Tensor], Tensor]
#: on_grad_step(step index, latents fed to the UNet (CFG batch), timestep, prediction (CFG batch)), e.g. to add
#: a distillation term at the steps that train
GradStepHook = Callable[[int, Tensor, Tensor, Tensor], None]


def first_grad_step(
    num_steps: int, mode: str, k: int, mean: float, std: float, generator: torch.Generator | None = None
) -> int:
    """Index of the first denoising step that keeps its graph: `num_steps - k` for "draft" (DRaFT-K), or
    round(num_steps * (mean + std * z)), z ~ N(0, 1), clipped to [0, num_steps - 1], for "alignprop" (its
    truncation point: mean 0.84, std 0.1 of the steps is AlignProp's 42 +- 5 of 50)."""
    if mode == "draft":
        return max(0, num_steps - k)
    if mode == "alignprop":
        z = torch.randn((), generator=generator).item()
        return min(num_steps - 1, max(0, int(round(num_steps * (mean + std * z)))))
    raise ValueError(f"truncation {mode!r}: 'draft' or 'alignprop'")


def ddim_with_truncated_grad(
    unet_call: UNetCall,
    scheduler,
    latents: Tensor,
    guidance_scale: float,
    eta: float,
    grad_from: int,
    generator: torch.Generator | None = None,
    on_grad_step: GradStepHook | None = None,
) -> Tensor:
    """Runs `scheduler` (a DDIM scheduler whose timesteps are set) from `latents`; steps with index >=
    `grad_from` keep the autograd graph (when grad is enabled at all). With guidance_scale > 1 the UNet sees
    the CFG batch [latents; latents] (the caller's context is [uncond; cond]); `on_grad_step` sees every step
    that keeps its graph. Returns the final latents."""
    guided = guidance_scale > 1
    grad_enabled = torch.is_grad_enabled()
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(grad_enabled and i >= grad_from):
            if not torch.is_grad_enabled():
                latents = latents.detach()
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = unet_call(model_input, t)
            if torch.is_grad_enabled() and on_grad_step is not None:
                on_grad_step(i, model_input, t, prediction)
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, eta=eta, generator=generator).prev_sample
    return latents
