"""The quality bars of the small pretrained bases, each measured through the stock tools that load them
(diffusers' pipelines, transformers' CLIPModel) on held-out data:

- text-to-image: the share of samples of "a handwritten digit <d>" the digit classifier reads as d;
- CLIP: the share of held-out coloured digits whose nearest of the ten digit captions is their own;
- inpainting: PSNR inside the mask against a mean fill, and PSNR outside the mask after decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules import small_world as world


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] (B x C x H x W), over the pixels where `mask` (B x 1 x H x W)
    is 1, or all pixels."""
    err = (a.float() - b.float()).pow(2)
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.expand_as(err).float()
        mse = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def mean_fill(images: Tensor, masks: Tensor) -> Tensor:
    """The baseline fill: every masked pixel set to the mean colour of the image's unmasked pixels."""
    keep = 1 - masks
    mean = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    return images * keep + mean * masks


@torch.no_grad()
def digit_sample_accuracy(
    folder, classifier, per_digit: int = 10, steps: int = 25, guidance_scale: float = 5.0, seed: int = 0
) -> dict:
    """Samples "a handwritten digit <d>" `per_digit` times per digit with diffusers' StableDiffusionPipeline
    (DDIM, `steps` steps, classifier-free guidance) and returns {"accuracy", "per_digit", "images"}."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(per_digit)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        [world.digit_prompt(int(d)) for d in labels],
        height=world.RESOLUTION,
        width=world.RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images
    right = (classifier.predict(out) == labels).float()
    return {
        "accuracy": right.mean().item(),
        "per_digit": [right[labels == d].mean().item() for d in range(10)],
        "images": out,
    }


@torch.no_grad()
def clip_digit_retrieval(model, tokenizer) -> float:
    """Share of held-out coloured digits whose most similar caption among the ten digit prompts is theirs."""
    from lightning_modules.nn.bases.build import _clip_pixels
    from lightning_modules.nn.diffusion.clip_score import clip_features

    held = world.held_out_digits()
    images = clip_features(model.get_image_features(pixel_values=_clip_pixels(held["pixel_values"])))
    tokens = tokenizer(
        [world.digit_prompt(d) for d in range(10)], padding="max_length", max_length=77, return_tensors="pt"
    )
    texts = clip_features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
    return ((images @ texts.T).argmax(1) == held["label"]).float().mean().item()


@torch.no_grad()
def inpainting_psnr(folder, count: int = 64, steps: int = 25, seed: int = 0, guidance_scale: float = 1.0) -> dict:
    """Held-out digits and photo crops (half each) with seeded random masks, filled by diffusers'
    StableDiffusionXLInpaintPipeline (prompt: the image's caption, strength 1; by default without
    classifier-free guidance: a reconstruction, not a prompt-driven edit, and guidance 5 shifts the colours,
    1.5 dB worse inside and outside): mean PSNR inside the mask of the fill and of `mean_fill`, and PSNR
    outside the mask of the decoded output, over all images and over digits and photos apart."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from lightning_modules.nn.bases.build import random_masks

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    held = world.held_out_digits()
    digits = (held["pixel_values"][: count // 2] + 1) / 2
    captions = [world.digit_prompt(int(d)) for d in held["label"][: count // 2]]
    photos = (world.held_out_photos(count - count // 2, seed) + 1) / 2
    names = list(world.PHOTOS)
    captions += [world.PHOTOS[names[k % len(names)]] for k in range(count - count // 2)]
    images = torch.cat([digits, photos])
    generator = torch.Generator().manual_seed(seed)
    masks = random_masks(count, world.RESOLUTION, generator)
    masks[masks.flatten(1).mean(1) > 0.9] = 0  # a whole-image mask has no outside; use a centre square
    masks[masks.flatten(1).sum(1) == 0, :, 8:24, 8:24] = 1
    filled = pipe(
        prompt=captions,
        image=images,
        mask_image=masks,
        height=world.RESOLUTION,
        width=world.RESOLUTION,
        num_inference_steps=steps,
        strength=1.0,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    inside, outside = psnr(filled, images, masks), psnr(filled, images, 1 - masks)
    by_mean_fill = psnr(mean_fill(images, masks), images, masks)
    half = count // 2
    measures = (("psnr_inside", inside), ("psnr_inside_mean_fill", by_mean_fill), ("psnr_outside", outside))
    return {
        "psnr_inside": inside.mean().item(),
        "psnr_inside_mean_fill": by_mean_fill.mean().item(),
        "psnr_outside": outside.mean().item(),
        **{
            f"{key}_{part}": values[rows].mean().item()
            for part, rows in (("digits", slice(0, half)), ("photos", slice(half, count)))
            for key, values in measures
        },
        "images": images,
        "masks": masks,
        "filled": filled,
    }
