"""Online policy-gradient tuning of the remover with D_phi as the reward (DDPO, Black et al. 2023, PPO form).

Each training step is DDPO's epoch on one batch of inputs:

1. sample: every input K times, from pure noise (strength 1) with DDIM at eta > 0 through the policy adapter,
   keeping each step's latents and log p(x_{t-1} | x_t) (the mean over latent elements of the Gaussian step);
2. reward: r = D_phi(source, mask, removal) - lambda (1 - SSIM outside the mask against the source);
3. advantages: per input (its id is the "prompt"), A = (r - mean) / (std + 1e-6) over its recent rewards, the
   batch's statistics until it has `min_count`; clipped to +-adv_clip;
4. train: for each denoising step, in an order shuffled per step of training, the clipped surrogate
   max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log p_theta - log p_old), differentiated one step at
   a time (the gradients add up), then one optimizer step (the trainer's gradient clipping: DDPO's 1.0).

The reward is computed on decoded images (D_phi reads pixels as it was trained); the stat tracker's buffers
are part of the checkpoint. Every row of a batch is trained on the same timestep order (DDPO shuffles per
sample; one order lets the UNet run the whole batch at one timestep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.inpainting import dilate
from lightning_modules.nn.diffusion.policy import PerInputStats, ddim_step_with_log_prob, ppo_loss


@dataclass
class PPOSettings:
    """Defaults: ddpo-pytorch's (TRL's DDPOConfig agrees), with RORem's no-CFG sampling.

    lr: the policy adapter's learning rate (3e-4; AdamW from the optimizer settings).
    sample_steps / eta: the DDIM sampling that is the policy (50 / 1.0; the spec suggests 20-50 for removal).
    samples_per_input: removals per input per step (K, GRPO-like groups for the per-input statistics).
    clip_range: PPO's epsilon (1e-4: the log-probabilities are means over elements, so ratios stay near 1).
    adv_clip: |A| is clipped to this (5).
    timestep_fraction: the share of denoising steps trained on per step (1.0 = all).
    buffer_size / min_count: the per-input stat tracker (16 / 16).
    background_penalty: lambda of the reward's 1 - SSIM outside the (grown) mask (0 = D_phi alone).
    """

    lr: float = 3e-4
    sample_steps: int = 50
    eta: float = 1.0
    samples_per_input: int = 4
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    timestep_fraction: float = 1.0
    buffer_size: int = 16
    min_count: int = 16
    background_penalty: float = 0.0

    def check(self) -> None:
        if self.sample_steps < 1 or self.samples_per_input < 1 or self.buffer_size < 1 or self.min_count < 1:
            raise ConfigError("model.ppo.sample_steps, samples_per_input, buffer_size and min_count must be at least 1")
        if not 0 < self.eta or not 0 < self.clip_range or not 0 < self.adv_clip:
            raise ConfigError(
                "model.ppo.eta, clip_range and adv_clip must be positive (eta > 0 makes the policy random)"
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"model.ppo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.background_penalty < 0:
            raise ConfigError(f"model.ppo.background_penalty must be at least 0, got {self.background_penalty}")

    def stat_tracker(self) -> PerInputStats:
        return PerInputStats(self.buffer_size, self.min_count)


class PolicyGradient:
    """The ppo stage of `RemovalStages`."""

    ppo: PPOSettings
    advantage_stats: PerInputStats

    def ddim(self):
        from lightning_modules.nn.diffusion.sampling import ddim_scheduler

        return ddim_scheduler(self.parts.noise_scheduler, self.ppo.sample_steps)

    @torch.no_grad()
    def sample_trajectories(self, cond: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(latents at every step: S+1 x B x 4 x h x w, log p of each step: S x B, final latents) from noise."""
        scheduler = self.ddim()
        small_mask = cond[0]
        channels = self.parts.unet.config.out_channels
        x = torch.randn(small_mask.shape[0], channels, *small_mask.shape[-2:], device=small_mask.device)
        x = x * scheduler.init_noise_sigma
        latents, log_probs = [x], []
        for t in scheduler.timesteps:
            prediction = self.unet_output(x, cond, t.to(x.device))
            x, log_prob, _, _ = ddim_step_with_log_prob(scheduler, prediction, t, x, self.ppo.eta)
            latents.append(x)
            log_probs.append(log_prob)
        return torch.stack(latents), torch.stack(log_probs), x

    @torch.no_grad()
    def removal_reward(self, source: Tensor, mask: Tensor, images: Tensor, seeds: list[int]) -> dict[str, Tensor]:
        """D_phi's score of each removal, minus `background_penalty` (1 - SSIM outside the mask grown by the
        background margin, against the source)."""
        from lightning_modules.removal.rorem import masked_ssim

        d = self.score(source, mask, images, seeds)
        background = 1 - dilate((mask >= 0.5).float(), 2 * self.background_margin + 1)
        change = 1 - masked_ssim((images + 1) / 2, (source + 1) / 2, background)
        return {"reward": d - self.ppo.background_penalty * change, "d_score": d, "background_change": change}

    def ppo_step(self, batch: dict[str, Any]) -> Tensor:
        s = self.ppo
        k = s.samples_per_input
        source, mask = batch["source"].repeat_interleave(k, 0), batch["mask"].repeat_interleave(k, 0)
        keys = [str(int(i)) for i in batch["index"] for _ in range(k)]
        cond = self.conditioning(batch, repeat=k)
        latents, old_log_probs, final = self.sample_trajectories(cond)
        with torch.no_grad():
            images = self.parts.decode_latents(final) * 2 - 1
        seeds = [self.eval_seed + int(i) for i in batch["index"] for _ in range(k)]
        rewards = self.removal_reward(source, mask, images, seeds)
        advantages = self.advantage_stats.update(keys, rewards["reward"]).clamp(-s.adv_clip, s.adv_clip)

        scheduler = self.ddim()
        steps = len(scheduler.timesteps)
        trained = max(1, int(steps * s.timestep_fraction))
        order = torch.randperm(steps)[:trained].tolist()
        params = list(self.adapter_parameters("policy").values())
        accumulated = [torch.zeros_like(p) for p in params]
        stats: dict[str, list[Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        for j in order:  # one graph at a time: the gradients of the steps add up, as DDPO accumulates them
            t = scheduler.timesteps[j]
            prediction = self.unet_output(latents[j], cond, t.to(self.device))
            _, log_prob, _, _ = ddim_step_with_log_prob(scheduler, prediction, t, latents[j], s.eta, latents[j + 1])
            out = ppo_loss(log_prob, old_log_probs[j], advantages, s.clip_range)
            grads = torch.autograd.grad(out["loss"] / trained, params, allow_unused=True)
            for total, g in zip(accumulated, grads, strict=True):
                if g is not None:
                    total += g
            for name in stats:
                stats[name].append(out[name].detach().float())
        b = len(keys)
        for name, value in rewards.items():
            self.log(f"train/{name}", value.mean(), batch_size=b)
        for name, values in stats.items():
            self.log(f"train/{name}", torch.stack(values).mean(), prog_bar=name == "loss", batch_size=b)
        # A surrogate whose gradient is the accumulated one: Lightning's backward, gradient clipping, DDP averaging
        # and optimizer step then run as for every other method.
        return sum((p * g).sum() for p, g in zip(params, accumulated, strict=True))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["advantage_stats"] = self.advantage_stats.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "advantage_stats" in checkpoint:
            self.advantage_stats.load_state_dict(checkpoint["advantage_stats"])
