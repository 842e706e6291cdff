"""DDIM sampling with classifier-free guidance, written out so methods can route each UNet call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def ddim_scheduler(train_scheduler, num_inference_steps: int):
    """diffusers' DDIM scheduler on the training schedule (SD's settings: no final alpha, offset 1)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(
        train_scheduler.config, set_alpha_to_one=False, steps_offset=1, clip_sample=False
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def guided(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[Tensor, Tensor, Tensor], Tensor],
    cond: Tensor,
    uncond: Tensor,
    latent_shape: tuple[int, ...],
    train_scheduler,
    num_inference_steps: int = 50,
    guidance_scale: float = 6.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents x_0 for text contexts `cond` (B x L x d). `denoise(latents, t, context)` is called on the
    CFG batch [unconditional; conditional] (2B) and returns the predicted noise."""
    scheduler = ddim_scheduler(train_scheduler, num_inference_steps)
    device, batch = cond.device, cond.shape[0]
    latents = torch.randn((batch, *latent_shape), generator=generator).to(device, cond.dtype)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond.expand(batch, -1, -1), cond])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = denoise(model_input, t.to(device), context).chunk(2)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype) if eta > 0 else None
        latents = scheduler.step(
            guided(eps_u, eps_c, guidance_scale), t, latents, eta=eta, variance_noise=noise
        ).prev_sample
    return latents
