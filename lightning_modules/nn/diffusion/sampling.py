"""Sampling through diffusers' own `StableDiffusionPipeline` (DDIM, classifier-free guidance) on the
suite's parts: the same code path a user of an export runs, with the method's routing entered around it."""

from __future__ import annotations


def ddim_scheduler(train_scheduler, num_inference_steps: int | None = None):
    """diffusers' DDIM scheduler on the training schedule (SD's settings: no final alpha, offset 1)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(
        train_scheduler.config, set_alpha_to_one=False, steps_offset=1, clip_sample=False
    )
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def stable_diffusion_pipeline(parts):
    """A stock `StableDiffusionPipeline` over `parts` (shared, not copied), sampling with `ddim_scheduler`.

    The caller passes text embeddings (`prompt_embeds`, `negative_prompt_embeds`), so the pipeline never
    tokenises; it calls the UNet on the CFG batch [unconditional; conditional], as the method's routing
    expects, and skips CFG when guidance_scale <= 1 (the conditional batch alone)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=ddim_scheduler(parts.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
