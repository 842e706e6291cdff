"""Denoising as a policy, and the preference objective, as small pure functions.

- `ddim_step_with_log_prob`: diffusers' DDIM step with eta > 0 read as a Gaussian policy
  x_prev ~ N(mu, sigma_t^2) (DDPO, Black et al. 2023): mu is the scheduler's own step without its noise,
  sigma_t = eta sqrt(variance), and log p is the MEAN over latent elements of the Gaussian log-density
  (ddpo-pytorch's scale, which sets the size of the ratios and of the clip range).
- `ppo_loss`: the clipped surrogate max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho = exp(log p - log p_old).
- `PerInputStats`: DDPO's per-prompt advantage normalisation, keyed by input id.
- `dpo_loss`: Diffusion-DPO (Wallace et al. 2023), -log sigmoid(-beta / 2 [(e_w - e_w^ref) - (e_l - e_l^ref)]).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor


def ddim_step_with_log_prob(
    scheduler,
    model_output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One DDIM step of `scheduler` (a `DDIMScheduler` whose timesteps are set) from `sample` at `timestep`:
    returns (prev_sample, log p(prev_sample) per row (B,), mean, std). Without `prev_sample` one is drawn
    (noise from `generator`, row by row with a list); with it (stored during sampling) only its log-probability
    is computed, with gradient through the mean."""
    from lightning_modules.nn.diffusion.inpainting import randn_like_rows

    t = int(timestep)
    zeros = torch.zeros_like(sample)
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=zeros).prev_sample.float()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    variance = scheduler._get_variance(t, prev_t)  # (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
    std = (eta * variance**0.5) * torch.ones((), device=sample.device)
    std = std.float().clamp(min=1e-12)
    if prev_sample is None:
        prev_sample = (mean + std * randn_like_rows(mean, generator)).detach()
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.flatten(1).mean(1), mean, std


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> dict[str, Tensor]:
    """The clipped surrogate (mean over rows), with the ratio, DDPO's approximate KL 1/2 mean((log p - log
    p_old)^2) and the fraction of rows whose ratio left [1 - eps, 1 + eps]."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return {
        "loss": torch.maximum(unclipped, clipped).mean(),
        "ratio": ratio.detach(),
        "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
    }


class PerInputStats:
    """DDPO's per-prompt stat tracker, keyed by input id: each key keeps a FIFO of its last `buffer_size`
    rewards; a key with fewer than `min_count` is normalised with the whole batch's mean and std, otherwise
    A = (r - mean_key) / (std_key + 1e-6). Its buffers are part of a checkpoint (`state_dict`)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, keys: list[str], rewards: Tensor) -> Tensor:
        values = rewards.detach().double().cpu()
        advantages = torch.empty_like(values)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = values.mean(), values.std(unbiased=False)
            else:
                held = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = held.mean(), held.std(unbiased=False)
            advantages[rows] = (values[rows] - mean) / (std + 1e-6)
        return advantages.to(rewards.device, torch.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def dpo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-DPO from per-pair denoising errors (each a mean over the latent elements) of the model and
    the frozen reference on the preferred (w) and rejected (l) sample, at one shared t and noise:
    inside = -beta / 2 [(e_w - e_w^ref) - (e_l - e_l^ref)], loss = -mean log sigmoid(inside).
    Returns (loss, inside per pair, implicit accuracy per pair: 1 where inside > 0, 0.5 at a tie)."""
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    loss = -F.logsigmoid(inside).mean()
    accuracy = (inside > 0).float() + 0.5 * (inside == 0).float()
    return loss, inside, accuracy
