"""The text-to-image methods' common parents.

`TextToImageModule` holds what every text-to-image method shares: the frozen Stable Diffusion parts (a
local diffusers folder, `tiny` or `tiny-pretrained`), DDIM sampling with classifier-free guidance through
the stock pipeline, image grids in TensorBoard, and checkpoints and exports that hold only the method's
delta (what `is_delta` names): the frozen base is rebuilt from `pretrained_model_name_or_path`.

`ConceptDiffusionModule` adds what lifelong concept learning shares: one new token per concept (`<new1>`,
...), the epsilon-prediction loss with Custom Diffusion's loss mask, and the evaluation after each concept:
images for every evaluation prompt, scored with CLIP-T (2.5 max(cos, 0) against the prompt without the
token) and CLIP-I (mean cosine to the concept's real images).

Under DDP (`strategy: ddp_find_unused_parameters_true`) each rank trains on its shard of the batch with its
own noise draws; the gradients of every parameter some concept trains are averaged (see `setup`). The
evaluation shards the prompts over the ranks (each generated once, seeded by the prompt alone, so an
image does not depend on the rank) and sums the scores; task-end hooks see the same weights on every rank
and draw no random numbers, so they agree.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.base import ContinualModule
from lightning_modules.nn.diffusion.loss import add_noise, diffusion_target, masked_mse


class TextToImageModule(ContinualModule):
    """Args:
    pretrained_model_name_or_path: a local diffusers Stable Diffusion folder, `tiny` (random weights) or
        `tiny-pretrained` (the small base trained on the embedded data).
    gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~30% slower).
    eval_inference_steps / eval_guidance_scale / eval_eta / eval_seed: DDIM sampling for the evaluation
        after each task.
    log_images: write each task's evaluation images to TensorBoard as a grid.
    """

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        gradient_checkpointing: bool = False,
        eval_inference_steps: int = 50,
        eval_guidance_scale: float = 6.0,
        eval_eta: float = 1.0,
        eval_seed: int = 42,
        log_images: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__(stream, optimizer, lr_scheduler)
        from lightning_modules.nn.diffusion.components import load_stable_diffusion

        self.parts = load_stable_diffusion(pretrained_model_name_or_path)
        if gradient_checkpointing:
            self.parts.unet.enable_gradient_checkpointing()
        self.eval_inference_steps = eval_inference_steps
        self.eval_guidance_scale = eval_guidance_scale
        self.eval_eta = eval_eta
        self.eval_seed = eval_seed
        self.log_images = log_images
        self.strict_loading = False  # checkpoints hold the delta only

    # -- the delta: what checkpoints and exports hold -------------------------------------------
    def is_delta(self, name: str) -> bool:
        """Whether state-dict entry `name` is part of what this method learns (checkpoint, export)."""
        return False

    def compute_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.parts.unet}

    def delta_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.is_delta(k)}

    def export_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """What `lifelong export` writes: the delta inference needs, floating tensors cast to `dtype`."""
        from lightning_modules.nn.diffusion.diffusers_export import cast

        return cast(self.delta_state_dict(), dtype)

    def export_metadata(self) -> dict[str, str]:
        """What `lifelong export` records beside the delta (besides the method, base and dtype)."""
        return {"tasks": json.dumps(list(self.stream.task_names))}

    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Writes into `folder` what a stock diffusers `StableDiffusionPipeline` loads (`lifelong export --format
        diffusers`) and returns its manifest (the files and what each holds). Methods with such an export
        override it."""
        raise ConfigError(f"--format diffusers: {type(self).__name__} has no diffusers export; use --format delta")

    def missing_delta(self, state: dict[str, Tensor]) -> set[str]:
        """Entries of this method's delta that `state` lacks."""
        return set(self.delta_state_dict()) - set(state)

    def load_delta(self, delta: dict[str, Tensor]) -> None:
        """Loads an exported delta (or a checkpoint's state dict) into the freshly built model."""
        missing = self.missing_delta(delta)
        unexpected = {k for k in delta if not self.is_delta(k) or k not in self.state_dict()}
        if missing or unexpected:
            raise ConfigError(
                f"the delta does not fit this model ({len(missing)} entries missing, {len(unexpected)} unexpected, "
                f"e.g. {sorted(missing or unexpected)[0]}): load it with the config it was trained with"
            )
        try:
            self.load_state_dict(delta, strict=False)
        except ConfigError:
            raise ConfigError(
                "the delta does not fit this model (tensor sizes differ, e.g. another rank): load it with the "
                "config it was trained with"
            ) from None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_delta(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        missing = self.missing_delta(checkpoint["state_dict"])
        if missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} of this method's entries (e.g. {sorted(missing)[0]}): "
                f"it was written by another method or settings; use the config it was trained with"
            )

    # -- sampling ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        return self.parts.encode_text(list(prompts))

    def sample_routing(
        self, batch_size: int, gate_prompts: list[str] | None, guided: bool = True
    ) -> contextlib.AbstractContextManager:
        """Context for the UNet calls on a CFG batch [uncond (B); cond (B)] while sampling (`guided`), or on
        the conditional batch (B) alone (guidance_scale <= 1)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        gate_prompts: list[str] | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        resolution: int | None = None,
    ) -> Tensor:
        """Images (B x 3 x H x W in [0, 1]) for `prompts` with the evaluation's DDIM sampling unless a setting is
        given; `gate_prompts` name the concept(s) to route to (methods with routing). guidance_scale <= 1
        samples without CFG (the conditional prediction alone), as diffusers does."""
        size = (resolution or self.stream.resolution) // self.parts.vae_scale_factor
        guidance_scale = self.eval_guidance_scale if guidance_scale is None else guidance_scale
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""])
        with self.sample_routing(len(prompts), gate_prompts, guided=guidance_scale > 1):
            return self._sample(cond, uncond, size, seed, num_inference_steps, guidance_scale, eta)

    @property
    def pipeline(self):
        """diffusers' `StableDiffusionPipeline` over this module's parts with DDIM (built once, not saved)."""
        pipe = self.__dict__.get("_pipeline")
        if pipe is None:
            from lightning_modules.nn.diffusion.sampling import stable_diffusion_pipeline

            pipe = self.__dict__["_pipeline"] = stable_diffusion_pipeline(self.parts)
        return pipe

    def _sample(self, cond, uncond, size, seed, num_inference_steps, guidance_scale, eta) -> Tensor:
        """DDIM (with CFG if guidance_scale > 1) from seeded CPU noise through the stock pipeline, the
        caller's routing held around it; decoded by the suite. Unset settings take the evaluation's."""
        latents = self.pipeline(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond.expand(cond.shape[0], -1, -1),
            height=size * self.parts.vae_scale_factor,
            width=size * self.parts.vae_scale_factor,
            num_inference_steps=num_inference_steps or self.eval_inference_steps,
            guidance_scale=self.eval_guidance_scale if guidance_scale is None else guidance_scale,
            eta=self.eval_eta if eta is None else eta,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images
        return self.parts.decode_latents(latents)

    def _log_grid(self, images: Tensor, task_id: int) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger.experiment, "add_images") or self.global_rank != 0:
            return
        name = self.stream.task_names[task_id]
        logger.experiment.add_images(f"samples/{name}", images.float().cpu(), global_step=self.global_step)


class ConceptDiffusionModule(TextToImageModule):
    """Args (besides `TextToImageModule`'s; the paper's evaluation sampling: 4 samples, 50 DDIM steps, CFG 6,
    eta 1):
    init_token_id: vocabulary id whose embedding initialises every concept token (42170, "ktn").
    train_tokens: learn the current concept's token row (lr `token_lr`).
    loss_reduction: how the masked squared error is reduced per sample: `channel_sum` (the released Custom
        Diffusion / R2MoE code: summed over the 4 latent channels, averaged over the mask; 4x `mean`, which
        scales the diffusion loss against the routing distillation and the effective learning rate) or `mean`.
    clip_model: CLIP for the metrics: `tiny`, a local Hugging Face CLIP folder, or an open_clip file (+ clip_arch).
    dino_model: DINO for the `dino_i` metric (the mean cosine of DINO CLS features to the concept's real
        images, as CLIP-I): `tiny` (random weights), a local Hugging Face DINO ViT folder (e.g. a saved
        facebook/dino-vits16, the protocol's ViT-S/16), or None to skip it.
    eval_samples_per_prompt: images generated per evaluation prompt.
    """

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        init_token_id: int = 42170,
        train_tokens: bool = True,
        token_lr: float = 1e-3,
        gradient_checkpointing: bool = False,
        loss_reduction: Literal["channel_sum", "mean"] = "channel_sum",
        clip_model: str = "tiny",
        clip_arch: str | None = None,
        dino_model: str | None = None,
        eval_samples_per_prompt: int = 4,
        eval_inference_steps: int = 50,
        eval_guidance_scale: float = 6.0,
        eval_eta: float = 1.0,
        eval_seed: int = 42,
        log_images: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        for name in ("tokens", "classes", "gate_prompts", "inference_gate_prompts", "resolution"):
            if stream is not None and not hasattr(stream, name):
                raise ConfigError(
                    "data: a concept-learning method needs a concept stream (datamodules.ConceptDataModule)"
                )
        super().__init__(
            stream,
            pretrained_model_name_or_path,
            gradient_checkpointing,
            eval_inference_steps,
            eval_guidance_scale,
            eval_eta,
            eval_seed,
            log_images,
            optimizer,
            lr_scheduler,
        )
        from lightning_modules.nn.diffusion.clip_score import ClipScorer
        from lightning_modules.nn.diffusion.dino_score import DinoScorer
        from lightning_modules.nn.diffusion.tokens import add_concept_tokens

        self.concept_tokens = add_concept_tokens(
            self.parts.tokenizer, self.parts.text_encoder, list(stream.tokens), init_token_id
        )
        self.clip = ClipScorer(clip_model, clip_arch)
        self.dino = DinoScorer(dino_model) if dino_model is not None else None
        self.train_tokens = train_tokens
        self.loss_reduction = loss_reduction
        self.token_lr = token_lr
        self.eval_samples_per_prompt = eval_samples_per_prompt

    def setup(self, stage: str) -> None:
        """Under DDP: every concept's token (and expert) is allocated up front and reaches the wrapper
        (`ExpertFreezing.setup`); finished and future ones get no gradient, so DDP must look for unused
        parameters (also the current token's row in a step whose captions on some rank lack the token)."""
        super().setup(stage)
        if stage == "fit":
            self.require_find_unused_parameters(
                "a text-to-image method trains the current concept's token (and expert) only"
            )

    # -- what belongs to whom -----------------------------------------------------------------
    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """Parameters that belong to task `task_id` (the expert-freezing callback trains only the current
        task's): here the concept's token row; methods with experts add theirs."""
        return [self.concept_tokens.rows[task_id]] if self.train_tokens else []

    def deepspeed_unsupported(self) -> str | None:
        return "each concept trains its own token row (model.init_args.train_tokens)" if self.train_tokens else None

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Optimizer groups of the current task (each group may carry its own lr / weight decay)."""
        t = self.current_task
        return [{"params": [self.concept_tokens.rows[t]], "lr": self.token_lr}] if self.train_tokens else []

    def is_delta(self, name: str) -> bool:
        """Whether state-dict entry `name` is part of what this method learns (checkpoint, export)."""
        return name.startswith("concept_tokens.rows.")

    def export_metadata(self) -> dict[str, str]:
        return {"concepts": json.dumps(list(self.stream.task_names)), "tokens": json.dumps(list(self.stream.tokens))}

    def save_diffusers_tokens(self, folder: str, task_ids, dtype: torch.dtype) -> list[dict[str, Any]]:
        """Each concept's token row as a textual-inversion file; the manifest entries of those concepts."""
        from lightning_modules.nn.diffusion.diffusers_export import save_token

        stream, concepts = self.stream, []
        for k in task_ids:
            name, token = stream.task_names[k], stream.tokens[k]
            file = save_token(folder, name, token, self.concept_tokens.rows[k], dtype)
            concepts.append({"name": name, "token": token, "class": stream.classes[k], "token_file": file})
        return concepts

    # -- routing hooks (methods with adapters override) ------------------------------------------
    def train_routing(self) -> contextlib.AbstractContextManager:
        """Context for the UNet call of a training step."""
        return contextlib.nullcontext()

    def region_routing(
        self, gate_prompts: list[str], batch_size: int, guided: bool = True
    ) -> contextlib.AbstractContextManager:
        """Context for one concept's region in a composition (R2MoE: that concept's gate)."""
        return self.sample_routing(batch_size, gate_prompts, guided)

    def base_routing(self) -> contextlib.AbstractContextManager:
        """Context in which the UNet is the base model (a composition's background), where the method can."""
        return contextlib.nullcontext()

    def extra_losses(self, context: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms added to the diffusion loss, by name (logged as train/<name>)."""
        return {}

    # -- training -----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The training routing holds from the forward through the backward pass: gradient checkpointing
        # recomputes the UNet's forward during backward and must route it the same way.
        self._routing = self.train_routing()
        self._routing.__enter__()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        routing = self.__dict__.pop("_routing", None)
        if routing is not None:
            routing.__exit__(None, None, None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts = self.parts
        with torch.no_grad():
            latents = parts.encode_images(batch["pixels"])
        noisy, noise, timesteps = add_noise(parts.noise_scheduler, latents)
        context = self.encode_prompts(batch["caption"])
        prediction = parts.unet(noisy, timesteps, context).sample  # routed by `train_routing` (batch hooks)
        target = diffusion_target(parts.noise_scheduler, latents, noise, timesteps)
        terms = {
            "diffusion": masked_mse(prediction, target, batch.get("mask"), self.loss_reduction == "channel_sum"),
            **self.extra_losses(context),
        }
        loss = sum(terms.values())
        batch_size = latents.shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    # -- sampling and evaluation --------------------------------------------------------------
    @torch.no_grad()
    def compose(
        self,
        region_prompts: list[str],
        gate_prompts: list[str],
        masks: Tensor,
        background: str,
        num_images: int,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
    ) -> Tensor:
        """Several concepts in one image: concept i, prompted by region_prompts[i] and routed by
        gate_prompts[i], inside masks[i] (K x 1 x h x w at latent size); the background prompt elsewhere.
        The coarse layers read the full prompt (the regions and the background joined)."""
        from lightning_modules.nn.diffusion.composition import Region, RegionalCrossAttention, regional_attention

        b = num_images
        guidance_scale = self.eval_guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance_scale > 1
        uncond = self.encode_prompts([""])

        def context(prompt: str) -> Tensor:
            """The prompt's context for the UNet's batch: [uncond; cond] with CFG, else cond."""
            cond = self.encode_prompts([prompt]).expand(b, -1, -1)
            return torch.cat([uncond.expand(b, -1, -1), cond]) if guided else cond

        full_prompt = ", ".join([*region_prompts, background] if background else region_prompts)
        regions = [
            Region(context(p), lambda g=g: self.region_routing([g], b, guided), m[None])
            for p, g, m in zip(region_prompts, gate_prompts, masks, strict=True)
        ]
        processor = RegionalCrossAttention(
            regions,
            Region(context(background), self.base_routing),
            Region(context(full_prompt), lambda: self.region_routing(list(gate_prompts), b, guided)),
            min_tokens=(masks.shape[-1] // 4) ** 2,
        )
        cond = self.encode_prompts([full_prompt]).expand(b, -1, -1)
        with regional_attention(self.parts.unet, processor):
            return self._sample(cond, uncond, masks.shape[-1], seed, num_inference_steps, guidance_scale, eta)

    def eval_step(self, batch: dict[str, Any], task_id: int) -> dict[str, Tensor]:
        """Per generated image: CLIP-I (primary) against the concept's real images, CLIP-T against the
        prompt without the token, DINO-I (with `dino_model`) as CLIP-I on DINO features. Images are routed by
        the concept's inference gate prompt (`data.inference_gate`). Noise depends on the prompt only, so
        rows of the matrix differ by the model."""
        n = self.eval_samples_per_prompt
        images, plain = [], []
        for prompt, prompt_plain in zip(batch["prompt"], batch["prompt_plain"], strict=True):
            seed = self.eval_seed + zlib.crc32(prompt.encode())
            gate = [self.stream.inference_gate_prompts[task_id]] * n
            images.append(self.generate([prompt] * n, gate, seed=seed))
            plain += [prompt_plain] * n
        images = torch.cat(images)
        if self.log_images and batch_idx_is_first(batch):
            self._log_grid(images, task_id)
        scores = {
            "clip_i": self.clip.clip_i(images, batch["reference"][0]),
            "clip_t": self.clip.clip_t(images, plain),
        }
        if self.dino is not None:
            scores["dino_i"] = self.dino.dino_i(images, batch["reference"][0])
        return scores


def batch_idx_is_first(batch: dict[str, Any]) -> bool:
    """Whether this evaluation batch starts the concept's prompt list (its grid is logged)."""
    index = batch.get("index")
    return index is None or int(index[0]) == 0
