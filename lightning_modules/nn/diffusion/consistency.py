"""Latent consistency distillation as small pure functions (LCM, Luo et al. 2023; diffusers' LCM-LoRA training):
the boundary scalings of the consistency function, the skipping-step DDIM solver on a 50-step skeleton, and the
distance between the student's and the target's outputs.

    f(z, t) = c_skip(t) z + c_out(t) x0(z, t),   c_skip = s^2 / ((10 t)^2 + s^2),  c_out = 10 t / sqrt((10 t)^2 + s^2)

with s = sigma_data = 0.5 and 10 the timestep scaling, so f(z, 0) = z (c_skip = 1, c_out = 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def boundary_scalings(
    timesteps: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at integer `timesteps` (float32): 1 and 0 at t = 0, about 0 and 1 from t = 19 on."""
    t = timesteps.float() * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def ddim_skeleton(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """The solver's timesteps k (i + 1) - 1 for i < N, k = T / N: [19, 39, ..., 999] for T = 1000, N = 50."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def solver_timesteps(
    index: Tensor, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50
) -> tuple[Tensor, Tensor]:
    """(start s, target t) for skeleton indices `index`: s = skeleton[i], t = max(s - k, 0)."""
    k = num_train_timesteps // num_ddim_timesteps
    start = ddim_skeleton(num_train_timesteps, num_ddim_timesteps).to(index.device)[index]
    return start, (start - k).clamp(min=0)


def alpha_bar(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """abar at `timesteps`, shaped to broadcast over `like` (B x ...), in float32."""
    a = alphas_cumprod.to(like.device)[timesteps.to(like.device)].float()
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def previous_alpha_bar(alphas_cumprod: Tensor, target: Tensor, like: Tensor) -> Tensor:
    """abar at the solver's target: abar[t] (abar[0] at t = 0, as SDXL has no final alpha of one)."""
    return alpha_bar(alphas_cumprod, target, like)


def x0_and_eps(
    prediction: Tensor, sample: Tensor, abar: Tensor, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """(predicted clean latents, predicted noise) from the UNet's `prediction` at noisy `sample`."""
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    prediction, sample = prediction.float(), sample.float()
    if prediction_type == "epsilon":
        return (sample - sigma * prediction) / alpha, prediction
    if prediction_type == "v_prediction":
        x0 = alpha * sample - sigma * prediction
        return x0, alpha * prediction + sigma * sample
    if prediction_type == "sample":
        return prediction, (sample - alpha * prediction) / sigma
    raise ValueError(f"prediction_type {prediction_type!r}: 'epsilon', 'v_prediction' or 'sample'")


def ddim_solver_step(x0: Tensor, eps: Tensor, abar_prev: Tensor) -> Tensor:
    """One deterministic DDIM step (eta = 0) to the target: sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def consistency_output(sample: Tensor, x0: Tensor, timesteps: Tensor) -> Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0."""
    c_skip, c_out = boundary_scalings(timesteps.to(sample.device))
    shape = (-1, *([1] * (sample.dim() - 1)))
    return c_skip.reshape(shape) * sample.float() + c_out.reshape(shape) * x0.float()


def guided(cond: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """The LCM paper's guidance form: cond + w (cond - uncond) (w per row)."""
    w = w.float().reshape(-1, *([1] * (cond.dim() - 1)))
    return cond + w * (cond - uncond)


def consistency_distance(
    prediction: Tensor, target: Tensor, kind: Literal["l2", "huber"] = "l2", huber_c: float = 0.001
) -> Tensor:
    """Per-sample distance (B,): the mean squared error over its elements (`l2`), or the mean pseudo-Huber
    sqrt((a - b)^2 + c^2) - c (`huber`, c = 0.001 as diffusers)."""
    diff = prediction.float() - target.float()
    if kind == "l2":
        per_element = diff**2
    elif kind == "huber":
        per_element = torch.sqrt(diff**2 + huber_c**2) - huber_c
    else:
        raise ValueError(f"distance {kind!r}: 'l2' or 'huber'")
    return per_element.flatten(1).mean(1)
