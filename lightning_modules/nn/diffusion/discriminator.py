"""RORem's removal discriminator D_phi: the down and mid blocks of the SDXL-inpainting UNet (conv_in, the
time and text-time embeddings included; no up blocks, no conv_out) and a classification head on the
mid-block features, whose softplus output is the removal score (trained by MSE to 0/1 human labels, so it
reads as P(success) but is not bounded by 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError


def truncate_to_mid_block(unet: nn.Module) -> nn.Module:
    """Drops the UNet's up blocks and output layers in place (their compute would be wasted, and under DDP an
    adapter on them would get no gradient); returns the UNet."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = None
    return unet


def mid_block_features(unet: nn.Module, sample: Tensor, timesteps: Tensor, context: Tensor, added: dict) -> Tensor:
    """The UNet2DConditionModel forward up to its mid block: time embedding (+ text-time embedding), conv_in,
    the down blocks, the mid block; returns the mid block's output (B x C x h x w)."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timesteps)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(hidden, emb, encoder_hidden_states=context)
    return unet.mid_block(hidden, emb)


def mid_feature_size(unet: nn.Module, latent_size: int) -> int:
    """The mid block's side for a latent of side `latent_size` (each down block but the last halves it)."""
    return latent_size // 2 ** (len(unet.config.block_out_channels) - 1)


class DiscriminatorHead(nn.Module):
    """RORem's `cls_pred_branch` generalised to any feature side s = 4 * 2^n: n blocks of [Conv 4x4 stride 2
    pad 1, GroupNorm, SiLU] (SDXL at 512: s = 16, n = 2), then [Conv 4x4 stride 4, GroupNorm, SiLU] (4 -> 1)
    and a 1x1 Conv to one logit; the score is softplus(logit) >= 0. PyTorch's default initialisation. GroupNorm
    has 32 groups (RORem's) where the width allows groups of 16 channels or more, fewer otherwise."""

    def __init__(self, channels: int, feature_size: int, groups: int = 32):
        super().__init__()
        n = math.log2(feature_size / 4) if feature_size >= 4 else -1
        if n < 0 or n != int(n):
            raise ConfigError(
                f"data.resolution: the discriminator's features are {feature_size} x {feature_size}, but its head "
                "needs a side 4 x 2^n (RORem scores 512 x 512 images: 16 x 16); use a resolution that gives one"
            )
        # RORem: 32 groups of 40 channels. The last norm sees a 1 x 1 map, where a group of 2 channels would only
        # keep the sign of their difference, so narrower heads keep groups of at least 16 channels.
        groups = math.gcd(min(groups, max(1, channels // 16)), channels)
        layers: list[nn.Module] = []
        for _ in range(int(n)):
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, channels, 4, stride=4), nn.GroupNorm(groups, channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def logit(self, features: Tensor) -> Tensor:
        return self.layers(features).flatten(1).squeeze(1)

    def forward(self, features: Tensor) -> Tensor:
        """Scores (B,) in [0, inf)."""
        return F.softplus(self.logit(features))


class RemovalScorer(nn.Module):
    """D_phi: a UNet cut after its mid block (the base inpainting UNet's weights, frozen), LoRA on its attention
    projections (rank 4, alpha 4, gaussian init: RORem's) and the trainable head. `score` takes images."""

    ADAPTER = "discriminator"

    def __init__(self, unet: nn.Module, feature_size: int, rank: int = 4, lora_alpha: float = 4.0):
        super().__init__()
        from peft import LoraConfig

        from lightning_modules.nn.diffusion.components import ATTENTION_PROJECTIONS

        self.unet = truncate_to_mid_block(unet).requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=ATTENTION_PROJECTIONS
        )
        self.unet.add_adapter(config, adapter_name=self.ADAPTER)
        self.head = DiscriminatorHead(unet.config.block_out_channels[-1], feature_size)

    @staticmethod
    def learns(name: str) -> bool:
        """Whether entry `name` of this module's state dict is learned (a LoRA matrix or the head)."""
        return ".lora_" in name or name.startswith("head.")

    def trainable(self) -> list[nn.Parameter]:
        """The LoRA matrices and the head: everything else stays frozen (conv_in included)."""
        return [p for n, p in self.named_parameters() if self.learns(n)]

    def forward(self, sample: Tensor, context: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
        """Scores (B,) of 9-channel inputs at timestep 0."""
        timesteps = torch.zeros(sample.shape[0], dtype=torch.long, device=sample.device)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return self.head(mid_block_features(self.unet, sample, timesteps, context, added).float())

    def score(
        self,
        parts,
        source: Tensor,
        mask: Tensor,
        edited: Tensor,
        context: Tensor,
        pooled: Tensor,
        binarize: bool = False,
        generator=None,
    ) -> Tensor:
        """Scores of removals (images in [-1, 1]) as RORem's discriminator reads them: the edited image's latents
        "noised" at t = 0, the mask, the latents of the whole (unmasked) source; VAE samples and noise drawn from
        `generator` (fix it for reproducible scores; a list, one per removal, makes a score independent of its
        batch)."""
        from lightning_modules.nn.diffusion.inpainting import condition_latents, nine_channels, randn_like_rows

        with torch.no_grad():
            small_mask, source_latents = condition_latents(parts, source, mask, False, binarize, generator)
            latents = parts.encode_images(edited, generator)
            noise = randn_like_rows(latents, generator)
            zero = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
            noisy = parts.noise_scheduler.add_noise(latents, noise, zero)
        sample = nine_channels(noisy, small_mask, source_latents)
        time_ids = parts.time_ids(sample.shape[0], source.shape[-1])
        return self(sample, context.expand(sample.shape[0], -1, -1), pooled.expand(sample.shape[0], -1), time_ids)
