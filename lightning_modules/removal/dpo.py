"""Diffusion-DPO (Wallace et al. 2023) for object removal: the policy adapter on the RORem UNet learns to
prefer the better of two removals of the same (source, mask), against the same UNet with its adapters off.

For each pair, one t ~ U{0..999} and one eps, shared by the preferred (w) and rejected (l) removal:

    e_w = || eps_theta(z_t^w | m | E(x_src * (1 - m)), t) - eps ||^2     (mean over latent elements; e_l, e_ref alike)
    L   = -log sigmoid( -beta / 2 [ (e_w - e_w^ref) - (e_l - e_l^ref) ] )

so the loss falls when the policy's error on the preferred removal drops relative to the reference's. Pairs
come from the data (`target` = preferred, `rejected`; a meta.json with `preferred` and `rejected` keys) or
are made online: K removals per input from the current policy, scored by D_phi, the best against the worst,
kept when their scores differ by at least `margin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.loss import diffusion_target
from lightning_modules.nn.diffusion.policy import dpo_loss


@dataclass
class DPOSettings:
    """beta: the KL weight with T, omega and 1/2 absorbed (5000 in both reference codes).
    lr: the policy adapter's learning rate (diffusers' LoRA variant: 1e-5; Salesforce's full UNet: 2.048e-5).
    pairs: `data` (the round's entries carry `rejected`) or `online` (sampled and ranked by D_phi each step).
    online_samples: removals per input per step (K >= 2); the best- and worst-scored make the pair (the spec: K >= 4).
    online_steps: the removal steps of the online samples (None: the evaluation's).
    margin: online pairs whose two scores differ by less are left out of the loss (the spec's delta: 0.3).
    """

    beta: float = 5000.0
    lr: float = 1e-5
    pairs: Literal["data", "online"] = "online"
    online_samples: int = 4
    online_steps: int | None = None
    margin: float = 0.0

    def check(self) -> None:
        if self.pairs not in ("data", "online"):
            raise ConfigError(f"model.dpo.pairs: {self.pairs!r} is not one of data, online")
        if self.beta <= 0 or self.margin < 0:
            raise ConfigError("model.dpo.beta must be positive and model.dpo.margin at least 0")
        if self.online_samples < 2:
            raise ConfigError(f"model.dpo.online_samples must be at least 2 (a pair), got {self.online_samples}")
        if self.online_steps is not None and self.online_steps < 1:
            raise ConfigError(f"model.dpo.online_steps must be at least 1, got {self.online_steps}")


class PreferenceOptimisation:
    """The dpo stage of `RemovalStages`."""

    dpo: DPOSettings

    def preference_pairs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """(preferred, rejected, kept) images in [-1, 1]: the data's pair, or two online removals ranked by D_phi."""
        if self.dpo.pairs == "data":
            if "rejected" not in batch:
                raise ConfigError(
                    f"data.rounds[{self.current_task}]: dpo with pairs: data needs preference pairs (a meta.json whose "
                    "entries have preferred and rejected); or set model.dpo.pairs: online"
                )
            return batch["target"], batch["rejected"], torch.ones(len(batch["target"]), device=self.device)
        source, mask = batch["source"], batch["mask"]
        k = self.dpo.online_samples
        seeds = torch.randint(0, 2**31 - 1, (k, len(source))).tolist()  # the step's RNG: a resumed run redraws them
        with torch.no_grad():
            removals = torch.stack([self.remove(source, mask, s, self.dpo.online_steps, sampler="full") for s in seeds])
            scores = torch.stack([self.score(source, mask, r, s) for r, s in zip(removals, seeds, strict=True)])
        rows = torch.arange(len(source), device=scores.device)
        best, worst = scores.argmax(0), scores.argmin(0)  # the best- and worst-scored of the K, per input
        margin = scores[best, rows] - scores[worst, rows]
        kept = (margin >= self.dpo.margin).float() * (best != worst).float()
        self.log("train/pair_margin", margin.mean(), batch_size=len(source))
        self.log("train/pairs_kept", kept.mean(), batch_size=len(source))
        best, worst, rows = best.to(removals.device), worst.to(removals.device), rows.to(removals.device)
        return removals[best, rows], removals[worst, rows], kept

    def dpo_step(self, batch: dict[str, Any]) -> Tensor:
        parts = self.parts
        preferred, rejected, kept = self.preference_pairs(batch)
        b = preferred.shape[0]
        with torch.no_grad():
            latents = parts.encode_images(torch.cat([preferred, rejected]))
        small_mask, masked = self.conditioning(batch)
        cond = (small_mask.repeat(2, 1, 1, 1), masked.repeat(2, 1, 1, 1))
        scheduler = parts.noise_scheduler
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)  # one eps and one t per pair, shared by w and l
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=latents.device).repeat(2)
        noisy = scheduler.add_noise(latents, noise, t)
        target = diffusion_target(scheduler, latents, noise, t).float()

        def errors(prediction: Tensor) -> tuple[Tensor, Tensor]:
            per_sample = ((prediction.float() - target) ** 2).flatten(1).mean(1)
            return per_sample[:b], per_sample[b:]

        model_w, model_l = errors(self.unet_output(noisy, cond, t))
        with torch.no_grad(), self.using("reference"):
            ref_w, ref_l = errors(self.unet_output(noisy, cond, t))
        loss_all, inside, accuracy = dpo_loss(model_w, model_l, ref_w, ref_l, self.dpo.beta)
        if self.dpo.pairs == "online":  # pairs under the margin leave the loss; none kept: no update
            per_pair = -torch.nn.functional.logsigmoid(inside)
            loss = (kept * per_pair).sum() / kept.sum().clamp_min(1.0)
        else:
            loss = loss_all
        self.log("train/implicit_accuracy", accuracy.mean(), batch_size=b)
        self.log("train/model_mse", (model_w + model_l).mean().detach() / 2, batch_size=b)
        self.log("train/reference_mse", (ref_w + ref_l).mean() / 2, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss
