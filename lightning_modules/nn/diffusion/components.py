"""Stable Diffusion's components (UNet, VAE, CLIP text encoder, tokenizer, noise scheduler), loaded with
diffusers/transformers from a local diffusers folder, or built as the `tiny` preset: random weights of
the same classes, small enough for CPU tests and demos, and the same on every call (a checkpoint need
not store the frozen base; it is rebuilt)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from cli.errors import ConfigError

TINY = "tiny"
#: the UNet's attention projections: where AlignProp, DDPO and RORem's discriminator put their LoRA
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# SD 1.x's training schedule: 1000 steps, "scaled linear" betas 0.00085 -> 0.012, epsilon prediction (and its
# saved config's steps_offset 1, which diffusers' pipelines expect).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


class StableDiffusionParts(nn.Module):
    """The frozen base of a text-to-image method. `tokenizer` and `noise_scheduler` hold no weights."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer, noise_scheduler):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        for part in (unet, vae, text_encoder):
            part.requires_grad_(False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def tokenize(self, prompts: list[str]) -> Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.text_encoder.device)

    def encode_text(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states (B x 77 x d), the UNet's cross-attention context."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> scaled latents (a sample of the VAE posterior)."""
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1]."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def tiny_vae(sample_size: int):
    """The tiny presets' VAE: SD's `AutoencoderKL` with 2 levels (32/64 channels, x2 downsampling), random
    weights from the global RNG (the callers seed it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=sample_size,
    )


def tiny_stable_diffusion(seed: int = 0) -> StableDiffusionParts:
    """Random-weight SD of the real classes: a 2-level UNet (32/64 channels, cross-attention 32), a
    2-level VAE (x2 downsampling) and a 5-layer CLIP text encoder with CLIP's full BPE vocabulary."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB, clip_tokenizer

    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        vae = tiny_vae(sample_size=64)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_TEXT_VOCAB,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                initializer_range=0.5,
            )
        )
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, DDPMScheduler(**SD_SCHEDULE))


def local_base(source: str, seed: int, tiny, cached: str, load, subfolders, what: str, instead: str):
    """The frozen base `pretrained_model_name_or_path` names: `tiny` -> tiny(seed); `tiny-pretrained` -> the
    small base `cached`, built into the cache on first use and read by `load`; else a local diffusers folder with
    `subfolders`, read by `load`, or one line saying it is not `what` and to pass `instead`. Never downloads."""
    if source == TINY:
        return tiny(seed)
    from lightning_modules.nn.bases import cache

    if source == cache.PRESET:
        return cache.checked(cache.ensure(cached), lambda p: load(str(p)))
    missing = [s + "/" for s in subfolders if not os.path.isdir(os.path.join(source, s))]
    if missing:
        raise ConfigError(
            f"model.pretrained_model_name_or_path: {source!r} is not {what} (missing {', '.join(missing)}); "
            f"pass {instead}"
        )
    return load(source)


def load_stable_diffusion(pretrained_model_name_or_path: str, seed: int = 0) -> StableDiffusionParts:
    """`tiny`, `tiny-pretrained` (the small base trained on the embedded data, built into the cache on first
    use) or a local diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/); never downloads."""

    def load(path: str) -> StableDiffusionParts:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return StableDiffusionParts(
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True),
            AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True),
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True),
        )

    return local_base(
        pretrained_model_name_or_path,
        seed,
        tiny_stable_diffusion,
        "text-to-image",
        load,
        SUBFOLDERS,
        "a diffusers folder",
        "a local Stable Diffusion folder (e.g. a saved stable-diffusion-v1-5) or 'tiny'",
    )


def write_model_index(path, pipeline_class: str, parts: dict, extra: dict | None = None) -> None:
    """Writes the `model_index.json` a stock diffusers pipeline reads from a saved folder: (library, class)
    per component, as diffusers' own `save_pretrained` writes it, plus the pipeline's config `extra`."""
    import json

    from diffusers import __version__

    index = {"_class_name": pipeline_class, "_diffusers_version": __version__}
    for name, part in parts.items():
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    if pipeline_class == "StableDiffusionPipeline":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}
    index |= extra or {}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def save_tiny(path: str, seed: int = 0) -> str:
    """Writes the tiny preset as a diffusers folder (what a saved SD checkpoint looks like on disk), with the
    `model_index.json` that lets a stock `StableDiffusionPipeline.from_pretrained` load it."""
    parts = tiny_stable_diffusion(seed)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(parts, name).save_pretrained(os.path.join(path, name))
    parts.noise_scheduler.save_pretrained(os.path.join(path, "scheduler"))
    named = {name: getattr(parts, "noise_scheduler" if name == "scheduler" else name) for name in SUBFOLDERS}
    write_model_index(path, "StableDiffusionPipeline", named)
    return path
