"""RORem (Li et al., CVPR 2025): the SDXL-inpainting UNet fine-tuned on (source, mask, ground truth)
triplets, grown round by round by the data engine (`callbacks.DataEngine`).

Training, as RORem's released script: z_0 = VAE sample of the ground truth, t ~ U{0..999},
z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, and the whole UNet regresses its scheduler's target (epsilon
for SDXL-inpainting) from [z_t | mask | latents of the masked source] with the empty prompt:

    L = || f_theta(z_t, m, E(x_src * (1 - m)), t, "") - eps ||^2        (float32, no SNR weighting, no EMA)

Removal (`remove`), as the released pipeline: diffusers' SDXL inpainting pipeline, 50 steps from the source's
latents noised to strength 0.99 (so 49 steps from t = 961 on SDXL's schedule), guidance 1 (no CFG), the
empty prompt; the output is the full decode (nothing pasted back).

Evaluation after each round on held-out triplets, per removal: `gt_success` (the ground-truth stand-in for a
human judgement: PSNR inside the mask at least `human_threshold_db`), `psnr_inside` against the ground truth,
`psnr_background` and `ssim_background` against the source outside the mask grown by `background_margin`
pixels (torchmetrics' SSIM map), with a discriminator `d_success` (score >= 0.5), `d_success_90` (>= 0.9)
and `d_score`, and with a CLIP `clip_gt` (cosine of the result's and the ground truth's CLIP embeddings).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.inpainting import condition_latents, dilate, inpainting_pipeline, nine_channels
from lightning_modules.nn.diffusion.loss import add_noise, diffusion_target
from lightning_modules.removal.base import RemovalModule

#: RORem's "use_CFG" prompts (with guidance 1 only the positive one changes anything)
QUALITY_PROMPT = "4K, high quality, masterpiece, Highly detailed, Sharp focus, Professional, photorealistic, realistic"
QUALITY_NEGATIVE = "low quality, worst, bad proportions, blurry, extra finger, Deformed, disfigured, unclear background"

NO_DISCRIMINATOR = "model.discriminator is not set: {} needs a RemovalDiscriminator checkpoint (its last.ckpt)"


class RORem(RemovalModule):
    """Args (besides `RemovalModule`'s; RORem: AdamW lr 5e-5, weight decay 1e-2, batch 128, grad clip 1, from
    the optimizer, data and trainer settings):
    discriminator: a `RemovalDiscriminator` checkpoint (`last.ckpt` of its fit) whose D_phi scores removals in
        the evaluation and in the data engine; None: no discriminator metrics (the engine then needs human,
        i.e. ground-truth, judgement).
    eval_inference_steps / eval_strength / eval_guidance_scale / eval_seed: the removal sampling (RORem: 50,
        0.99, 1.0).
    eval_prompt: `empty` (the paper) or `quality` (the README's "use_CFG" prompt pair, with guidance 1 only the
        positive prompt acts).
    mask_dilation: grow the mask by a square of this side before removing (RORem's optional pre-step, 20 at
        512 px; 0 = off).
    background_margin: pixels around the mask left out of the background metrics (the decoder bleeds the fill
        into its border).
    human_threshold_db: the PSNR inside the mask from which a removal counts as good (`gt_success`, and the
        data engine's human judgement).
    clip_model: a CLIP for `clip_gt` (`tiny-pretrained`, a local CLIP folder, `tiny`), or None.
    scorer_lr: the learning rate of D_phi when the data engine retrains it between rounds (RORem: 1e-5).
    log_images: source | mask | removal | ground truth strips of the first evaluation batch in TensorBoard.
    """

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        prompt_embedding: Literal["encoded", "zeros"] = "encoded",
        binarize_mask: bool = False,
        gradient_checkpointing: bool = False,
        discriminator: str | None = None,
        eval_inference_steps: int = 50,
        eval_strength: float = 0.99,
        eval_guidance_scale: float = 1.0,
        eval_prompt: Literal["empty", "quality"] = "empty",
        eval_seed: int = 0,
        mask_dilation: int = 0,
        background_margin: int = 2,
        human_threshold_db: float | None = None,
        clip_model: str | None = None,
        scorer_lr: float = 1e-5,
        log_images: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        if not 0 < eval_strength <= 1:
            raise ConfigError(f"model.eval_strength must be in (0, 1], got {eval_strength}")
        if eval_prompt not in ("empty", "quality"):
            raise ConfigError(f"model.eval_prompt: {eval_prompt!r} is not one of 'empty', 'quality'")
        if eval_inference_steps < 1 or int(eval_inference_steps * eval_strength) < 1:
            raise ConfigError("model.eval_inference_steps x eval_strength must leave at least one step")
        if mask_dilation < 0 or background_margin < 0:
            raise ConfigError("model.mask_dilation and model.background_margin must be 0 or more")
        super().__init__(
            stream,
            pretrained_model_name_or_path,
            prompt_embedding,
            binarize_mask,
            gradient_checkpointing,
            optimizer,
            lr_scheduler,
        )
        from datamodules.removal import HUMAN_THRESHOLD_DB

        self.scorer = None
        if discriminator is not None:
            self.scorer = self.build_scorer()
            load_scorer(self.scorer, discriminator)
            self.scorer.requires_grad_(False)
        # RORem trains every UNet weight in every round (set here, not at a task start: a resumed run has none).
        self.parts.unet.requires_grad_(True)
        self.eval_inference_steps = eval_inference_steps
        self.eval_strength = eval_strength
        self.eval_guidance_scale = eval_guidance_scale
        self.eval_prompt = eval_prompt
        self.eval_seed = eval_seed
        self.mask_dilation = mask_dilation
        self.background_margin = background_margin
        self.human_threshold_db = HUMAN_THRESHOLD_DB if human_threshold_db is None else human_threshold_db
        self.scorer_lr = scorer_lr
        self.log_images = log_images
        self.clip = None
        if clip_model is not None:
            from lightning_modules.nn.diffusion.clip_score import ClipScorer

            self.clip = ClipScorer(clip_model)

    # -- what it learns ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The whole UNet (RORem trains every weight; `trainable_modules` is empty)."""
        return list(self.parts.unet.parameters())

    def is_delta(self, name: str) -> bool:
        """The UNet, and D_phi's LoRA and head (the data engine may retrain them)."""
        return name.startswith("parts.unet.") or self.is_scorer_delta(name)

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts = self.parts
        with torch.no_grad():
            latents = parts.encode_images(batch["target"])
            small_mask, masked_latents = condition_latents(
                parts, batch["source"], batch["mask"], True, self.binarize_mask
            )
        noisy, noise, timesteps = add_noise(parts.noise_scheduler, latents)
        context, pooled = self.prompt_conditioning("")
        b = latents.shape[0]
        sample = nine_channels(noisy, small_mask, masked_latents).to(parts.unet.dtype)
        prediction = parts.predict(sample, timesteps, context.expand(b, -1, -1), pooled.expand(b, -1), self.resolution)
        target = diffusion_target(parts.noise_scheduler, latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float())
        self.log("train/diffusion", loss, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    # -- removing and scoring (the data engine calls these) ---------------------------------------
    @property
    def pipeline(self):
        pipe = self.__dict__.get("_pipeline")
        if pipe is None:
            pipe = self.__dict__["_pipeline"] = inpainting_pipeline(self.parts)
        return pipe

    @torch.no_grad()
    def remove(
        self,
        source: Tensor,
        mask: Tensor,
        seeds: list[int],
        num_inference_steps: int | None = None,
        strength: float | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Removals (B x 3 x H x W in [-1, 1]) of the masked objects of `source` (in [-1, 1]) through diffusers'
        SDXL inpainting pipeline; image i's noise comes from `seeds[i]` alone. Unset settings: the evaluation's."""
        if self.mask_dilation > 1:
            mask = dilate((mask >= 0.5).to(mask.dtype), self.mask_dilation)
        guidance = self.eval_guidance_scale if guidance_scale is None else guidance_scale
        prompt, negative = ("", "") if self.eval_prompt == "empty" else (QUALITY_PROMPT, QUALITY_NEGATIVE)
        context, pooled = self.prompt_conditioning(prompt)
        neg_context, neg_pooled = self.prompt_conditioning(negative)
        b = source.shape[0]
        latents = self.pipeline(
            prompt_embeds=context.expand(b, -1, -1),
            pooled_prompt_embeds=pooled.expand(b, -1),
            negative_prompt_embeds=neg_context.expand(b, -1, -1),
            negative_pooled_prompt_embeds=neg_pooled.expand(b, -1),
            image=(source.float() + 1) / 2,
            mask_image=mask.float(),
            height=source.shape[-2],
            width=source.shape[-1],
            num_inference_steps=num_inference_steps or self.eval_inference_steps,
            strength=self.eval_strength if strength is None else strength,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="latent",
        ).images
        return self.parts.decode_latents(latents) * 2 - 1

    @torch.no_grad()
    def score(self, source: Tensor, mask: Tensor, edited: Tensor, seeds: list[int]) -> Tensor:
        """D_phi's scores (B,) of removals `edited` (all images in [-1, 1]); score i's VAE samples and t = 0 noise
        come from `seeds[i]` alone. Needs a discriminator."""
        if self.scorer is None:
            raise ConfigError(NO_DISCRIMINATOR.format("scoring removals"))
        return self.score_removals(source, mask, edited, [torch.Generator().manual_seed(int(s)) for s in seeds])

    def fit_scorer(self, batches: list[dict[str, Tensor]], steps: int, seed: int = 0) -> list[float]:
        """Retrains D_phi's LoRA and head on labelled removals (dicts of source, mask, target = the removal,
        score = its label) for `steps` AdamW steps at `scorer_lr` (the same on every rank: same data, same
        seed); returns the losses. The data engine calls it between rounds."""
        from lightning_modules.removal.discriminator import scorer_loss

        if self.scorer is None:
            raise ConfigError(NO_DISCRIMINATOR.format("retraining D_phi"))
        params = self.scorer.trainable()
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.scorer_lr, weight_decay=1e-2)
        generator = torch.Generator().manual_seed(seed)
        order = torch.Generator().manual_seed(seed + 1)  # which batch each step draws
        losses = []
        was_training = self.scorer.training
        self.scorer.train()
        with torch.enable_grad():
            for _ in range(steps):
                batch = batches[int(torch.randint(len(batches), (1,), generator=order))]
                scores = self.score_removals(batch["source"], batch["mask"], batch["target"], generator)
                loss = scorer_loss(scores, batch["score"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(float(loss.detach()))
        self.scorer.train(was_training)
        for p in params:
            p.requires_grad_(False)
        return losses

    # -- evaluation -----------------------------------------------------------------------------
    def eval_step(self, batch: dict[str, Any], task_id: int) -> dict[str, Tensor]:
        from datamodules.removal import human_label
        from lightning_modules.nn.bases.quality import psnr

        source, mask, target = batch["source"], batch["mask"], batch["target"]
        seeds = [self.eval_seed + int(i) for i in batch["index"]]
        result = self.remove(source, mask, seeds)
        hard = (mask >= 0.5).float()
        background = 1 - dilate(hard, 2 * self.background_margin + 1)
        out01, source01, target01 = (result + 1) / 2, (source + 1) / 2, (target + 1) / 2
        scores = {
            "gt_success": human_label(result, target, mask, self.human_threshold_db),
            "psnr_inside": psnr(out01, target01, hard),
            "psnr_background": psnr(out01, source01, background),
            "ssim_background": masked_ssim(out01, source01, background),
        }
        if self.scorer is not None:
            d = self.score(source, mask, result, seeds)
            scores |= {"d_success": (d >= 0.5).float(), "d_success_90": (d >= 0.9).float(), "d_score": d}
        if self.clip is not None:
            scores["clip_gt"] = (self.clip.embed_images(out01) * self.clip.embed_images(target01)).sum(-1)
        if self.log_images and int(batch["index"][0]) == 0:
            self._log_grid([source01, hard, out01, target01], task_id)
        return scores


def masked_ssim(images: Tensor, reference: Tensor, region: Tensor) -> Tensor:
    """Per image, the mean of torchmetrics' SSIM map (data range 1) over `region` (B x 1 x H x W, 1 = counted)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(
        images.float(), reference.float(), data_range=1.0, reduction="none", return_full_image=True
    )
    weight = region.float().expand_as(ssim_map)
    return (ssim_map * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1)


def load_scorer(scorer, path: str) -> None:
    """Loads D_phi's LoRA and head from a `RemovalDiscriminator` checkpoint into `scorer` (one line naming the
    file when it is not one)."""
    from cli.files import load_torch_file

    checkpoint = load_torch_file(path, "model.discriminator")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"model.discriminator {path}: not a checkpoint written by lifelong fit (no state_dict)")
    ours = {k[len("scorer.") :]: v for k, v in state.items() if k.startswith("scorer.")}
    wanted = {k for k in scorer.state_dict() if scorer.learns(k)}
    if not ours or wanted - set(ours):
        raise ConfigError(
            f"model.discriminator {path}: not a RemovalDiscriminator checkpoint for this base and resolution "
            f"({len(wanted - set(ours))} of D_phi's {len(wanted)} tensors missing); pass the last.ckpt of its fit"
        )
    try:
        scorer.load_state_dict({k: ours[k] for k in wanted}, strict=False)
    except RuntimeError:
        raise ConfigError(
            f"model.discriminator {path}: its tensors do not fit this base and resolution; use the discriminator "
            "trained on the same base model and data.resolution"
        ) from None
