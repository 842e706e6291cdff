"""Training recipes of the small pretrained bases, from scratch on the embedded world (`datamodules/small_world.py`):

- `digit-classifier`: a small CNN on the coloured train digits (the structure judge);
- `clip`: a small CLIP (transformers `CLIPModel`, OpenAI CLIP's BPE vocabulary), contrastive loss;
- `text-to-image`: Stable Diffusion's classes (`AutoencoderKL`, `UNet2DConditionModel`, the CLIP's text
  tower as `CLIPTextModel`, SD's noise schedule), the VAE first, then the UNet on its latents;
- `inpainting`: SDXL-inpainting's classes (the 9-channel UNet with `text_time` added conditioning, the
  CLIP's text tower twice, as `CLIPTextModel` and `CLIPTextModelWithProjection`), on the same VAE.

Every builder is deterministic for a seed (its own forked RNG, a seeded data stream) and calls
`progress(done, total)` as it trains. `Recipe.steps` scales every model's steps (tests use a few).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules import small_world as world
from lightning_modules.nn.bases.classifier import DigitClassifier
from lightning_modules.nn.diffusion.components import SD_SCHEDULE
from lightning_modules.nn.diffusion.inpainting import sdxl_text_states

Progress = Callable[[int, int], None]


@dataclass
class Recipe:
    """Steps, batch sizes and learning rates of the five training phases (the defaults build the cached
    bases; `scaled(f)` shortens every phase for tests)."""

    classifier_steps: int = 200
    classifier_batch: int = 128
    clip_steps: int = 1500
    clip_batch: int = 128
    vae_steps: int = 2400
    vae_batch: int = 64
    unet_steps: int = 1200
    unet_batch: int = 32
    inpaint_steps: int = 1100
    inpaint_batch: int = 32
    #: images generated once and drawn from (a fifth of the CLIP's and the VAE's time went to making images)
    clip_pool: int = 32768
    vae_pool: int = 8192
    latent_pool: int = 8192  # VAE-encoded training images the UNets draw from
    snr_gamma: float = 5.0  # Min-SNR loss weighting of the text-to-image UNet (Hang et al., 2023); 0: plain MSE
    #: what the inpainting UNet predicts: "v_prediction" (SD 2's velocity: near the clean latents at high
    #: noise, so outside the mask close to a copy of the masked image's latents, and near the noise at low
    #: noise, so the last steps are exact; PSNR outside the mask 27.7 dB against 26.3 for "sample" and 24.4
    #: for SDXL's "epsilon", measured on the same base and data), "sample" or "epsilon"
    inpaint_prediction: str = "v_prediction"
    #: the inpainting UNet's Min-SNR gamma: 0, plain velocity MSE, weights low-noise steps (which decide how
    #: exactly the outside is kept) 1 + SNR times in clean-latent terms instead of gamma: PSNR inside the
    #: mask 17.7 dB against 16.9 with gamma 5, outside 29.5 against 29.3 (same data and steps)
    inpaint_snr_gamma: float = 0.0
    lr: dict = field(default_factory=lambda: {"classifier": 2e-3, "clip": 2e-3, "vae": 3e-3, "unet": 2e-3})

    def scaled(self, factor: float) -> Recipe:
        out = Recipe(**asdict(self))
        for name in ("classifier_steps", "clip_steps", "vae_steps", "unet_steps", "inpaint_steps"):
            setattr(out, name, max(2, int(getattr(self, name) * factor)))
        for name in ("clip_pool", "vae_pool", "latent_pool"):
            setattr(out, name, max(256, int(getattr(self, name) * factor)))
        return out


def _no_progress(done: int, total: int) -> None:
    pass


def noise_loss(
    pred: Tensor, target: Tensor, timesteps: Tensor, scheduler, snr_gamma: float, prediction_type: str = "epsilon"
) -> Tensor:
    """The MSE to `target` (the noise for "epsilon", the clean latents for "sample", the velocity for
    "v_prediction"); with `snr_gamma` > 0
    each sample weighted so that the loss is min(SNR(t), gamma) times the clean-latent MSE whatever the
    parametrisation (Min-SNR, Hang et al., 2023; for epsilon the weight min(SNR, gamma) / SNR of diffusers'
    training examples' `--snr_gamma`), which makes the small UNets learn much faster."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma <= 0:
        return per_sample.mean()
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = snr.clamp(max=snr_gamma)
    if prediction_type == "epsilon":
        weight = weight / snr
    elif prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    elif prediction_type != "sample":
        raise ValueError(f"prediction_type {prediction_type!r}: 'epsilon', 'sample' or 'v_prediction'")
    return (per_sample * weight).mean()


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50):
    """Linear warm-up, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pooled_batches(images: dict, batch_size: int, generator: torch.Generator):
    """Endless batches drawn with replacement from a pool of images (`CaptionedImages.pool`)."""
    while True:
        idx = torch.randint(len(images["caption"]), (batch_size,), generator=generator)
        yield {
            "pixel_values": images["pixel_values"][idx],
            "caption": [images["caption"][i] for i in idx.tolist()],
            "label": images["label"][idx],
        }


def _fit(model: nn.Module, loss_fn: Callable[[int], Tensor], steps: int, lr: float, progress: Progress) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)  # fused: 7x faster step on CPU
    scheduler = _schedule(optimizer, steps, warmup=min(50, max(1, steps // 10)))
    model.train()
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        progress(step + 1, steps)
    model.eval()


# -- the digit classifier --------------------------------------------------------------------------------


def train_classifier(recipe: Recipe, seed: int = 0, progress: Progress = _no_progress) -> DigitClassifier:
    """A CNN on train digits in random colour pairs, shifted up to 3 px (so it reads generated digits that
    are not centred exactly)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
        stream = world.CaptionedImages(seed=seed + 1, digit_fraction=1.0).batches(recipe.classifier_batch)

        def loss(step: int) -> Tensor:
            batch = next(stream)
            x = (batch["pixel_values"] + 1) / 2
            dx, dy = torch.randint(-3, 4, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            return F.cross_entropy(model(x), batch["label"])

        _fit(model, loss, recipe.classifier_steps, recipe.lr["classifier"], progress)
    return model


# -- the small CLIP --------------------------------------------------------------------------------------


def clip_config():
    """Text and vision towers of 4 layers of width 64 (77 tokens, OpenAI's vocabulary; a ViT with 8 x 8
    patches on 32 x 32 images); 64-d joint space."""
    from lightning_modules.nn.diffusion.clip_score import small_clip_config

    return small_clip_config(width=64, intermediate=256, layers=4, projection=64, image_size=world.RESOLUTION)


def clip_contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, caption_index: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric contrastive loss where several images may share a caption: `text_embeds` holds each
    distinct caption once (U x D) and `caption_index[i]` is image i's caption. Image -> text is the usual
    cross-entropy; text -> image averages the log-likelihood over all images of that caption."""
    logits = scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T  # B x U
    image_to_text = F.cross_entropy(logits, caption_index)
    positives = F.one_hot(caption_index, text_embeds.shape[0]).T.float()  # U x B
    log_p = F.log_softmax(logits.T, dim=1)
    text_to_image = -((log_p * positives).sum(1) / positives.sum(1)).mean()
    return (image_to_text + text_to_image) / 2


def _clip_pixels(images: Tensor) -> Tensor:
    """[-1, 1] images -> CLIP's normalisation (the size is already the CLIP's)."""
    from lightning_modules.nn.diffusion.clip_score import CLIP_MEAN, CLIP_STD

    x = (images + 1) / 2
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def train_clip(recipe: Recipe, seed: int = 0, progress: Progress = _no_progress):
    """The small CLIP on digits (half with colour words) and crops of every photo, the concepts' included."""
    from transformers import CLIPModel

    from lightning_modules.nn.diffusion.clip_score import clip_features
    from lightning_modules.nn.diffusion.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer(77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config())
        photos = world.PHOTOS | world.CONCEPT_PHOTOS
        images = world.CaptionedImages(seed=seed + 2, digit_fraction=0.75, photos=photos).pool(recipe.clip_pool)
        stream = pooled_batches(images, recipe.clip_batch, torch.Generator().manual_seed(seed + 2))
        # every caption of the pool tokenized once, padded to the longest only: with CLIP's causal mask the
        # pooled (end-of-text) feature is the same as with 77 positions, at a fraction of the cost
        distinct = sorted(set(images["caption"]))
        row = {c: k for k, c in enumerate(distinct)}
        tokens = tokenizer(distinct, padding="longest", max_length=77, truncation=True, return_tensors="pt")

        def loss(step: int) -> Tensor:
            batch = next(stream)
            captions = sorted(set(batch["caption"]))
            index = torch.tensor([captions.index(c) for c in batch["caption"]])
            rows = torch.tensor([row[c] for c in captions])
            image = clip_features(model.get_image_features(pixel_values=_clip_pixels(batch["pixel_values"])))
            text = clip_features(
                model.get_text_features(input_ids=tokens.input_ids[rows], attention_mask=tokens.attention_mask[rows])
            )
            return clip_contrastive_loss(image, text, index, model.logit_scale.exp().clamp(max=100))

        _fit(model, loss, recipe.clip_steps, recipe.lr["clip"], progress)
    return model, tokenizer


def text_encoder_from_clip(clip, with_projection: bool = False):
    """The CLIP's text tower as SD's `CLIPTextModel` (or SDXL's second encoder, `CLIPTextModelWithProjection`,
    with the CLIP's text projection), the same weights, frozen."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip.config.text_config
    if with_projection:
        config.projection_dim = clip.config.projection_dim
        encoder = CLIPTextModelWithProjection(config)
        encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    else:
        encoder = CLIPTextModel(config)
    tower = getattr(encoder, "text_model", encoder)  # transformers 5 dropped the wrapper of CLIPTextModel
    tower.load_state_dict(clip.text_model.state_dict())
    return encoder.eval().requires_grad_(False)


# -- the VAE ---------------------------------------------------------------------------------------------


def vae_model():
    """SD's `AutoencoderKL` at 2x downsampling (32 x 32 images -> 16 x 16 x 4 latents). One normalisation
    group: with a group per channel (SD's 32 groups at these widths) GroupNorm removes each channel's mean,
    the background colour of a digit, which the VAE then learns back only slowly."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=world.RESOLUTION,
        norm_num_groups=1,
        mid_block_add_attention=False,
    )


VAE_CROP = 16


def train_vae(recipe: Recipe, seed: int = 0, progress: Progress = _no_progress):
    """Reconstruction (L1 + MSE) plus a small KL; then SD's latent scaling factor (1 / std of the latents),
    written into the VAE's config as SD's 0.18215 is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = vae_model()
        images = world.CaptionedImages(seed=seed + 3, digit_fraction=0.6).pool(recipe.vae_pool)
        stream = pooled_batches(images, recipe.vae_batch, torch.Generator().manual_seed(seed + 3))

        def loss(step: int) -> Tensor:
            # a random 16 x 16 window of each batch: the VAE is convolutional, so it learns the same maps
            # at a quarter of the cost per image (SD's VAE, too, was trained on crops smaller than its use)
            x = next(stream)["pixel_values"]
            top, left = torch.randint(0, world.RESOLUTION - VAE_CROP + 1, (2,)).tolist()
            x = x[:, :, top : top + VAE_CROP, left : left + VAE_CROP]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

        _fit(vae, loss, recipe.vae_steps, recipe.lr["vae"], progress)
        with torch.no_grad():
            x = next(world.CaptionedImages(seed=seed + 4, digit_fraction=0.75).batches(512))["pixel_values"]
            std = vae.encode(x).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


@torch.no_grad()
def _latent_pool(vae, count: int, seed: int, photos: dict[str, str] | None) -> dict:
    """`count` training images of the world, VAE posterior mean and std cached once (a UNet step samples
    latents from them), with their captions."""
    images = world.CaptionedImages(seed=seed, digit_fraction=0.75, photos=photos).pool(count)
    dists = [vae.encode(chunk).latent_dist for chunk in images["pixel_values"].split(256)]
    return {
        "mean": torch.cat([d.mean for d in dists]),
        "std": torch.cat([d.std for d in dists]),
        "pixel_values": images["pixel_values"],
        "caption": images["caption"],
    }


# -- the text-to-image UNet ------------------------------------------------------------------------------


#: (both UNets train in channels-last memory format: 7% faster on CPU; saved contiguous)
#: the levels both UNets share: 16 x 16 x 4 latents, three levels (32, 64, 64 channels), cross-attention at
#: the two lower ones; 4 normalisation groups, 8 to 16 channels a group (SD: 10), as a group per 2 channels
#: washes out colour
UNET_LEVELS = dict(
    sample_size=world.RESOLUTION // 2,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=4,
)


def text_to_image_unet(cross_attention_dim: int):
    """SD's `UNet2DConditionModel` at `UNET_LEVELS`."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(in_channels=4, cross_attention_dim=cross_attention_dim, **UNET_LEVELS)


@torch.no_grad()
def _caption_states(encode: Callable[[list[str]], Tensor], captions: list[str]) -> dict[str, Tensor]:
    """Each distinct caption encoded once (the text towers are frozen)."""
    distinct = sorted(set(captions))
    out: dict[str, Tensor] = {}
    for i in range(0, len(distinct), 128):
        chunk = distinct[i : i + 128]
        states = encode(chunk)
        out |= {c: states[k] for k, c in enumerate(chunk)}
    return out


def train_text_to_image(recipe: Recipe, vae, text_encoder, tokenizer, seed: int = 0, progress: Progress = _no_progress):
    """The UNet with SD's objective (epsilon prediction, SD's schedule) on the frozen VAE and text tower;
    10% of captions dropped to "" so classifier-free guidance works."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**SD_SCHEDULE)

    def encode(prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = text_to_image_unet(text_encoder.config.hidden_size).to(memory_format=torch.channels_last)
        pool = _latent_pool(vae, recipe.latent_pool, seed + 5, None)
        states = _caption_states(encode, pool["caption"] + [""])
        scale = vae.config.scaling_factor

        def loss(step: int) -> Tensor:
            idx = torch.randint(len(pool["caption"]), (recipe.unet_batch,))
            latents = (pool["mean"][idx] + pool["std"][idx] * torch.randn_like(pool["mean"][idx])) * scale
            drop = torch.rand(len(idx)) < 0.1
            context = torch.stack(
                [states["" if d else pool["caption"][i]] for i, d in zip(idx.tolist(), drop, strict=True)]
            )
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
            noisy = scheduler.add_noise(latents, noise, t).to(memory_format=torch.channels_last)
            return noise_loss(unet(noisy, t, context).sample, noise, t, scheduler, recipe.snr_gamma)

        _fit(unet, loss, recipe.unet_steps, recipe.lr["unet"], progress)
    return unet.to(memory_format=torch.contiguous_format), scheduler


# -- the inpainting UNet ---------------------------------------------------------------------------------

#: SDXL's added conditioning: (original size, crop top-left, target size), each number embedded in 8 dims
TIME_IDS = (world.RESOLUTION, world.RESOLUTION, 0, 0, world.RESOLUTION, world.RESOLUTION)
ADDITION_TIME_EMBED_DIM = 8


def inpainting_unet(cross_attention_dim: int, pooled_dim: int):
    """SDXL-inpainting's `UNet2DConditionModel`: 9 input channels (noisy latents, the mask, the masked
    image's latents), `text_time` added conditioning (pooled text embedding + embedded size/crop ids), the
    text-to-image UNet's levels otherwise."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=9,
        cross_attention_dim=cross_attention_dim,
        **UNET_LEVELS,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=ADDITION_TIME_EMBED_DIM * len(TIME_IDS) + pooled_dim,
    )


def random_masks(count: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """count x 1 x size x size masks in {0, 1} (1 = to fill): a rectangle, an ellipse or a thick stroke, a
    quarter of the side to most of it; one in ten masks the whole image (so the model also generates)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    masks = torch.zeros(count, 1, size, size)
    for i in range(count):
        u = torch.rand(7, generator=generator).tolist()
        h, w = size * (0.25 + 0.5 * u[1]), size * (0.25 + 0.5 * u[2])
        cy, cx = h / 2 + (size - h) * u[3], w / 2 + (size - w) * u[4]
        if u[0] < 0.1:
            m = torch.ones(size, size)
        elif u[0] < 0.45:
            m = ((yy - cy).abs() <= h / 2) & ((xx - cx).abs() <= w / 2)
        elif u[0] < 0.8:
            m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
        else:  # a stroke: the points within a width of the segment between two random points
            ay, ax, by, bx = u[3] * size, u[4] * size, u[5] * size, u[6] * size
            d = torch.tensor([by - ay, bx - ax])
            t = (((yy - ay) * d[0] + (xx - ax) * d[1]) / d.pow(2).sum().clamp(min=1)).clamp(0, 1)
            m = ((yy - ay - t * d[0]) ** 2 + (xx - ax - t * d[1]) ** 2).sqrt() <= size * (0.08 + 0.1 * u[1])
        masks[i, 0] = m.float()
    return masks


def train_inpainting(
    recipe: Recipe,
    vae,
    text_encoder,
    text_encoder_2,
    tokenizer,
    seed: int = 0,
    progress: Progress = _no_progress,
):
    """The 9-channel UNet with SD-inpainting's objective: predict the whole latent's noise, velocity or clean
    latents (`recipe.inpaint_prediction`) given the mask and the masked image's latents (pixels under the
    mask set to 0, as diffusers' pipeline does); the empty prompt is all zeros (SDXL's
    `force_zeros_for_empty_prompt`), dropped for 10% of samples."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from lightning_modules.nn.diffusion.loss import diffusion_target

    schedule = SD_SCHEDULE | {"prediction_type": recipe.inpaint_prediction}
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in schedule.items() if k != "clip_sample"})
    train_scheduler = DDPMScheduler(**schedule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pool = _latent_pool(vae, recipe.latent_pool, seed + 6, None)
        with torch.no_grad():
            distinct = sorted(set(pool["caption"]))
            states, pooled = sdxl_text_states(text_encoder, text_encoder_2, tokenizer, distinct)
        index = {c: k for k, c in enumerate(distinct)}
        unet = inpainting_unet(states.shape[-1], pooled.shape[-1]).to(memory_format=torch.channels_last)
        scale = vae.config.scaling_factor
        time_ids = torch.tensor([TIME_IDS], dtype=torch.float32)

        def loss(step: int) -> Tensor:
            idx = torch.randint(len(pool["caption"]), (recipe.inpaint_batch,))
            latents = (pool["mean"][idx] + pool["std"][idx] * torch.randn_like(pool["mean"][idx])) * scale
            masks = random_masks(len(idx), world.RESOLUTION)
            with torch.no_grad():
                masked = pool["pixel_values"][idx] * (masks < 0.5)
                masked_latents = vae.encode(masked).latent_dist.sample() * scale
            small_masks = F.interpolate(masks, size=latents.shape[-2:])
            rows = torch.tensor([index[pool["caption"][i]] for i in idx.tolist()])
            keep = (torch.rand(len(idx)) >= 0.1).float()
            context = states[rows] * keep.view(-1, 1, 1)
            text_embeds = pooled[rows] * keep.view(-1, 1)
            noise = torch.randn_like(latents)
            t = torch.randint(0, train_scheduler.config.num_train_timesteps, (len(idx),))
            noisy = train_scheduler.add_noise(latents, noise, t)
            added = {"text_embeds": text_embeds, "time_ids": time_ids.expand(len(idx), -1)}
            sample = torch.cat([noisy, small_masks, masked_latents], dim=1).to(memory_format=torch.channels_last)
            pred = unet(sample, t, context, added_cond_kwargs=added).sample
            sample_target = recipe.inpaint_prediction == "sample"
            target = latents if sample_target else diffusion_target(train_scheduler, latents, noise, t)
            return noise_loss(pred, target, t, train_scheduler, recipe.inpaint_snr_gamma, recipe.inpaint_prediction)

        _fit(unet, loss, recipe.inpaint_steps, recipe.lr["unet"], progress)
    return unet.to(memory_format=torch.contiguous_format), scheduler
