"""SDXL-inpainting's components and the 9-channel UNet input every object-removal method builds.

The UNet reads [noisy latents (4) | mask at latent size (1) | latents of the conditioning image (4)]: the
remover conditions on the masked source (pixels under the mask set to 0, mid-grey in [-1, 1], as diffusers'
inpainting pipeline does), the discriminator on the full source (RORem's released code). `nine_channels`
and `condition_latents` are the one place this layout is built.

Parts load from a local SDXL-inpainting diffusers folder (e.g. a saved
`stable-diffusion-xl-1.0-inpainting-0.1`), as `tiny-pretrained` (the small inpainting base trained on the
embedded data) or as `tiny` (random weights of the same classes, for tests); never from the network. The VAE
stays in float32 (SDXL's VAE overflows in float16).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.components import SD_SCHEDULE, local_base, tiny_vae

SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: SDXL's added conditioning per image: (original size, crop top-left, target size); no aesthetic score
TIME_ID_FIELDS = 6


#: a generator, one per batch row, or None (the global RNG)
Generators = torch.Generator | list[torch.Generator] | None


def randn_like_rows(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like `x` (float32, on x's device), drawn on the CPU from `generator`, or row
    by row from a list of generators (row i's noise then depends on generator i alone)."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for {x.shape[0]} rows")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(x.shape, generator=generator)
    return noise.to(device=x.device, dtype=x.dtype)


class InpaintingParts(nn.Module):
    """The frozen SDXL-inpainting base: 9-channel UNet, VAE (float32), both text encoders and their tokenizers,
    the inference scheduler (`scheduler`, the folder's) and the training one (`noise_scheduler`: a DDPM
    scheduler from the same config, as RORem's training script builds it)."""

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler):
        super().__init__()
        from diffusers import DDPMScheduler

        if unet.config.in_channels != 9:
            raise ConfigError(
                f"model.pretrained_model_name_or_path: the UNet has {unet.config.in_channels} input channels, "
                "an inpainting UNet has 9 (noisy latents, mask, masked-image latents); pass an inpainting model"
            )
        self.unet = unet
        self.vae = vae if vae.dtype == torch.float32 else vae.to(torch.float32)
        # The VAE is float32 throughout, so the pipeline's half-precision upcast (a `vae.to(float32)` per call that
        # diffusers warns about) has nothing to do.
        self.vae.register_to_config(force_upcast=False)
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)
        for part in (unet, vae, text_encoder, text_encoder_2):
            part.requires_grad_(False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """SDXL's prompt encoding: the penultimate hidden states of both text encoders side by side (B x 77 x
        d1+d2) and the second encoder's pooled projection (B x p)."""
        return sdxl_text_states(self.text_encoder, self.text_encoder_2, self.tokenizer, prompts, self.tokenizer_2)

    def time_ids(self, batch_size: int, resolution: int) -> Tensor:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) per row, built for the actual batch size
        (RORem's script builds them for the configured batch size, which breaks a partial last batch)."""
        row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
        return row.to(self.unet.device).expand(batch_size, -1)

    def encode_images(self, images: Tensor, generator: Generators = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents: a sample of the VAE posterior (RORem: `latent_dist.sample()`),
        in float32; its noise from `generator` (one, or one per image so a sample does not depend on its batch)."""
        dist = self.vae.encode(images.float()).latent_dist
        noise = randn_like_rows(dist.mean, generator)
        return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1]."""
        images = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def predict(self, sample: Tensor, timesteps: Tensor, context: Tensor, pooled: Tensor, resolution: int) -> Tensor:
        """The UNet's prediction on a 9-channel `sample` with SDXL's text-time conditioning."""
        added = {"text_embeds": pooled, "time_ids": self.time_ids(sample.shape[0], resolution).to(pooled.dtype)}
        return self.unet(sample, timesteps, context, added_cond_kwargs=added).sample


def sdxl_text_states(text_encoder, text_encoder_2, tokenizer, prompts: list[str], tokenizer_2=None):
    """What SDXL's `encode_prompt` gives the UNet: the penultimate hidden states of both text encoders,
    concatenated, and the pooled projection of the second."""

    def ids(tok) -> Tensor:
        out = tok(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return out.input_ids.to(text_encoder.device)

    first = text_encoder(ids(tokenizer), output_hidden_states=True).hidden_states[-2]
    out = text_encoder_2(ids(tokenizer_2 or tokenizer), output_hidden_states=True)
    return torch.cat([first, out.hidden_states[-2]], dim=-1), out.text_embeds


# -- the 9-channel input ----------------------------------------------------------------------------------


def latent_mask(mask: Tensor, size: int | tuple[int, int], binarize: bool = False) -> Tensor:
    """The pixel mask (B x 1 x H x W in [0, 1], 1 = remove) at latent size by nearest interpolation (RORem's
    training: `F.interpolate`'s default, soft values kept); `binarize` thresholds at 0.5 first (its pipeline)."""
    if binarize:
        mask = (mask >= 0.5).to(mask.dtype)
    return F.interpolate(mask, size=size, mode="nearest")


def masked_image(source: Tensor, mask: Tensor) -> Tensor:
    """The source with the pixels to fill set to 0 (mid-grey in [-1, 1]): source * 1[mask < 0.5]."""
    return source * (mask < 0.5).to(source.dtype)


def condition_latents(
    parts: InpaintingParts,
    source: Tensor,
    mask: Tensor,
    masked: bool = True,
    binarize: bool = False,
    generator: Generators = None,
) -> tuple[Tensor, Tensor]:
    """(mask at latent size, latents of the conditioning image) for sources in [-1, 1]: the masked source
    (`masked`, the remover) or the whole source (the discriminator)."""
    image = masked_image(source, mask) if masked else source
    latents = parts.encode_images(image, generator)
    return latent_mask(mask, latents.shape[-2:], binarize), latents


def nine_channels(noisy: Tensor, small_mask: Tensor, cond_latents: Tensor) -> Tensor:
    """The inpainting UNet's input: [noisy latents | mask | conditioning latents] along channels."""
    if not (noisy.shape[-2:] == small_mask.shape[-2:] == cond_latents.shape[-2:]):
        raise ValueError(f"latent sizes differ: {noisy.shape}, {small_mask.shape}, {cond_latents.shape}")
    return torch.cat([noisy, small_mask.to(noisy.dtype), cond_latents.to(noisy.dtype)], dim=1)


def dilate(mask: Tensor, size: int) -> Tensor:
    """The mask grown by a square structuring element of side `size` (one pass of cv2.dilate, as RORem's
    helper; an even side is centred one pixel towards the top left, as cv2's default anchor)."""
    if size <= 1:
        return mask
    left = (size - 1) // 2
    padded = F.pad(mask, (left, size - 1 - left, left, size - 1 - left), value=0.0)
    return F.max_pool2d(padded, size, stride=1)


# -- loading ----------------------------------------------------------------------------------------------


def tiny_inpainting(seed: int = 0) -> InpaintingParts:
    """Random weights of SDXL-inpainting's classes, small for CPU tests: a 2-level 9-channel UNet (32/64
    channels; text_time conditioning), a 2-level VAE (x2), two 32-wide CLIP text encoders (the second with a
    projection) and SDXL's Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB, clip_tokenizer

    tokenizer = clip_tokenizer()
    text = dict(
        **CLIP_TEXT_VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=9,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * TIME_ID_FIELDS + 32,
        )
        vae = tiny_vae(sample_size=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"})
    return InpaintingParts(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer, scheduler)


def load_inpainting(pretrained_model_name_or_path: str, seed: int = 0) -> InpaintingParts:
    """`tiny`, `tiny-pretrained` (the small inpainting base, built into the cache on first use) or a local
    SDXL-inpainting diffusers folder; never downloads."""

    def load(path: str) -> InpaintingParts:
        from diffusers import StableDiffusionXLInpaintPipeline

        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(path, local_files_only=True)
        return InpaintingParts(*(getattr(pipe, name) for name in SUBFOLDERS))

    return local_base(
        pretrained_model_name_or_path,
        seed,
        tiny_inpainting,
        "inpainting",
        load,
        SUBFOLDERS,
        "an SDXL-inpainting diffusers folder",
        "a local stable-diffusion-xl-1.0-inpainting-0.1, 'tiny-pretrained' or 'tiny'",
    )


def save_inpainting(parts: InpaintingParts, path: str) -> str:
    """Writes the parts as a diffusers folder a stock `StableDiffusionXLInpaintPipeline.from_pretrained` loads."""
    from lightning_modules.nn.diffusion.components import write_model_index

    named = {name: getattr(parts, name) for name in SUBFOLDERS}
    for name, part in named.items():
        part.save_pretrained(os.path.join(path, name))
    write_model_index(
        path,
        "StableDiffusionXLInpaintPipeline",
        named,
        extra={"requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True},
    )
    return path


def inpainting_pipeline(parts: InpaintingParts, unet: nn.Module | None = None):
    """diffusers' `StableDiffusionXLInpaintPipeline` over the parts (the given `unet`, e.g. a trained one)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=unet if unet is not None else parts.unet,
        scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
