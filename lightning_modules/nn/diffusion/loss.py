"""The denoising objective as small pure functions: the regression target by `prediction_type` and the
masked mean squared error (Custom Diffusion's loss mask), computed in float32."""

from __future__ import annotations

import torch
from torch import Tensor


def diffusion_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet regresses: the noise (epsilon) or the velocity (v); any other type raises."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported: use 'epsilon' or 'v_prediction'")


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor | None = None, channel_sum: bool = False) -> Tensor:
    """Mean over the batch of each sample's squared error over its mask (B x 1 x h x w, 0/1): averaged over
    the masked positions and the channels, or (`channel_sum`, the released Custom Diffusion / R2MoE code)
    summed over the channels, i.e. C times larger: their 1-channel mask's sum divides a C-channel sum."""
    err = (prediction.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.float()
    per_pixel = mask.flatten(1).sum(1).clamp_min(1.0)
    if not channel_sum:
        per_pixel = per_pixel * err.shape[1]
    per_sample = (err * mask.expand_as(err)).flatten(1).sum(1) / per_pixel
    return per_sample.mean()


def add_noise(noise_scheduler, latents: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1}: returns (noisy, noise, timesteps)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device, generator=generator
    )
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps
