"""`RewardTuningModule`: what every reward-incremental text-to-image method shares (task t = reward t).

Training is reward-gradient fine-tuning of LoRA adapters on the UNet's attention projections (peft): sample
images from the training prompts with DDIM and classifier-free guidance, keep the graph through the last
denoising steps only (DRaFT-K, or AlignProp's random truncation point), decode, and minimise
-loss_scale * reward. Methods differ in their adapters (one shared, or one per reward with the earlier
ones frozen: `ADAPTER_PER_TASK`), in the rewards a step optimises (`rewarded_tasks`) and in extra terms at
the steps that keep their graph (`step_losses`, e.g. RID's distillation).

Evaluation after each reward, on the held-out prompts with seeds fixed per prompt: `reward` (the task's
reward as measured, e.g. the real JPEG size), `ssim` (torchmetrics' SSIM of each image against the base
model's image for the same prompt and seed: how much of the structure survives) and, with a digit judge and
digit prompts, `digit_accuracy` (the share of images the classifier reads as the prompted digit).
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.diffusion.base import TextToImageModule
from lightning_modules.nn.diffusion.components import ATTENTION_PROJECTIONS
from lightning_modules.nn.diffusion.reward_sampling import ddim_with_truncated_grad, first_grad_step


class RewardTuningModule(TextToImageModule):
    """Args (besides `TextToImageModule`'s):
    rank / lora_alpha / target_modules: each adapter's LoRA (rank 4, alpha = rank, attention projections).
    lora_lr: the adapters' learning rate (AlignProp: 1e-3).
    train_inference_steps / train_guidance_scale / train_eta: the DDIM sampling that training differentiates
        through (AlignProp: 50 steps, CFG 5, eta 1).
    truncation: `draft` (gradients through the last `backprop_steps` steps; DRaFT-1 by default) or
        `alignprop` (from a random step, round(steps * (truncation_mean + truncation_std * z)) on).
    eval_samples_per_prompt: images per held-out prompt after each reward.
    digit_judge: the digit classifier (`tiny-pretrained` or its saved folder) for `digit_accuracy`; None: off.
    """

    #: one adapter per reward, the earlier ones frozen (True), or one adapter every reward trains (False)
    ADAPTER_PER_TASK = False

    def __init__(
        self,
        stream=None,
        pretrained_model_name_or_path: str = "tiny",
        rank: int = 4,
        lora_alpha: float = 4.0,
        target_modules: list[str] | None = None,
        lora_lr: float = 1e-3,
        train_inference_steps: int = 50,
        train_guidance_scale: float = 5.0,
        train_eta: float = 1.0,
        truncation: str = "draft",
        backprop_steps: int = 1,
        truncation_mean: float = 0.84,
        truncation_std: float = 0.1,
        gradient_checkpointing: bool = False,
        eval_samples_per_prompt: int = 4,
        eval_inference_steps: int = 50,
        eval_guidance_scale: float = 5.0,
        eval_eta: float = 1.0,
        eval_seed: int = 42,
        digit_judge: str | None = None,
        log_images: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        if stream is not None and not hasattr(stream, "rewards"):
            raise ConfigError("data: a reward-tuning method needs a reward stream (datamodules.RewardDataModule)")
        if truncation not in ("draft", "alignprop"):
            raise ConfigError(f"model.truncation: {truncation!r} is not one of 'draft', 'alignprop'")
        if not 1 <= backprop_steps <= train_inference_steps:
            raise ConfigError(
                f"model.backprop_steps must be in 1..{train_inference_steps} (the train_inference_steps), "
                f"got {backprop_steps}"
            )
        if not 0 <= truncation_mean <= 1 or truncation_std < 0:
            raise ConfigError("model.truncation_mean must be in [0, 1] and model.truncation_std at least 0")
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
        from peft import LoraConfig

        from lightning_modules.nn.rewards import build_reward

        self.rewards = nn.ModuleList(
            build_reward(spec["name"], spec["options"], f"data.rewards[{t}]") for t, spec in enumerate(stream.rewards)
        )
        self.loss_scales = [
            float(spec["loss_scale"]) if spec.get("loss_scale") is not None else reward.default_loss_scale
            for spec, reward in zip(stream.rewards, self.rewards, strict=True)
        ]
        self.adapter_names = [f"reward_{t}" for t in range(self.num_tasks)] if self.ADAPTER_PER_TASK else ["reward"]
        config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            init_lora_weights="gaussian",
            target_modules=target_modules or ATTENTION_PROJECTIONS,
        )
        unet = self.parts.unet
        with warnings.catch_warnings():  # peft warns that a model gets several adapters: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in self.adapter_names:
                unet.add_adapter(config, adapter_name=name)
        # All adapters act at once and add up; one not trained yet has B = 0, so it adds nothing.
        unet.set_adapters(self.adapter_names)
        self.lora_lr = lora_lr
        self.train_inference_steps = train_inference_steps
        self.train_guidance_scale = train_guidance_scale
        self.train_eta = train_eta
        self.truncation = truncation
        self.backprop_steps = backprop_steps
        self.truncation_mean = truncation_mean
        self.truncation_std = truncation_std
        self.eval_samples_per_prompt = eval_samples_per_prompt
        self.judge = None
        if digit_judge is not None:
            from lightning_modules.nn.bases.cache import load_digit_classifier

            self.judge = load_digit_classifier(digit_judge).requires_grad_(False)
        self._base_images: dict[str, Tensor] = {}  # the base model's evaluation images per prompt, recomputed

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.ADAPTER_PER_TASK:
            self.require_find_unused_parameters("a LoRA group trains the current reward's adapter only")

    # -- what belongs to whom -----------------------------------------------------------------
    def deepspeed_unsupported(self) -> str | None:
        return f"{type(self).__name__} trains a new LoRA adapter at each reward" if self.ADAPTER_PER_TASK else None

    def adapter_of(self, task_id: int) -> str:
        return self.adapter_names[task_id if self.ADAPTER_PER_TASK else 0]

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The LoRA A and B matrices of adapter `adapter`, by their names in this module."""
        keys = (f".lora_A.{adapter}.", f".lora_B.{adapter}.")
        return {n: p for n, p in self.named_parameters() if any(k in n for k in keys)}

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """The adapter reward `task_id` trains (the expert-freezing callback freezes every other one)."""
        return list(self.adapter_parameters(self.adapter_of(task_id)).values())

    def trainable_parameters(self) -> list[dict[str, Any]]:
        return [{"params": self.task_parameters(self.current_task), "lr": self.lora_lr}]

    def is_delta(self, name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def export_metadata(self) -> dict[str, str]:
        return {"rewards": json.dumps([spec["name"] for spec in self.stream.rewards])}

    # -- merging (callbacks.LoRAMerge) and export ----------------------------------------------
    def _lora_layers(self, unet: nn.Module | None = None) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in (unet or self.parts.unet).modules() if isinstance(m, BaseTunerLayer)]

    def merge_adapters(self, unet: nn.Module | None = None) -> None:
        """Folds every adapter into the UNet's weights (W + sum_i s B_i A_i): sampling then costs what the base
        costs. A merged UNet ignores its adapters' tensors, so training must unmerge first. `unet`: a copy of
        this module's UNet to merge instead."""
        for layer in self._lora_layers(unet):
            if not layer.merged:
                layer.merge(adapter_names=self.adapter_names)

    def unmerge_adapters(self) -> None:
        """Takes the adapters back out of the UNet's weights (up to float rounding)."""
        for layer in self._lora_layers():
            while layer.merged:
                layer.unmerge()

    def adapters_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    def exported_adapters(self) -> list[str]:
        """The adapters an export holds: those of the rewards trained so far (a group), or the one adapter."""
        return self.adapter_names[: self.current_task + 1] if self.ADAPTER_PER_TASK else self.adapter_names

    def group_lora(self, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The exported adapters as one LoRA of rank k r: per layer sum_i B_i A_i = [B_1 .. B_k] [A_1; ..; A_k],
        with alpha k alpha so the scale alpha / r of each is kept. Returns peft's state dict and LoraConfig kwargs."""
        from peft.utils import get_peft_model_state_dict

        from lightning_modules.nn.diffusion.diffusers_export import cast

        unet, names = self.parts.unet, self.exported_adapters()
        states = [get_peft_model_state_dict(unet, adapter_name=n) for n in names]
        state = {key: torch.cat([s[key] for s in states], dim=0 if ".lora_A." in key else 1) for key in states[0]}
        config = unet.peft_config[names[0]].to_dict()
        config["r"] = config["r"] * len(names)
        config["lora_alpha"] = config["lora_alpha"] * len(names)
        return cast(state, dtype), config

    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """`lora.safetensors`: the adapters of the rewards trained so far as one LoRA, for `load_lora_weights`."""
        from lightning_modules.nn.diffusion.diffusers_export import save_unet_lora

        state, config = self.group_lora(dtype)
        lora = save_unet_lora(folder, "lora.safetensors", state, config)
        trained = self.stream.task_names[: self.current_task + 1]
        return {"lora": lora, "rewards": list(trained), "prompt": self.stream.eval_prompts[0][0]}

    def save_merged_unet(self, folder: str, dtype: torch.dtype = torch.float32) -> str:
        """The UNet with every adapter folded in, as a plain diffusers `UNet2DConditionModel` folder (no peft
        layers left), for `StableDiffusionPipeline.from_pretrained(base, unet=...)`."""
        import copy

        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        unet = copy.deepcopy(self.parts.unet)
        self.merge_adapters(unet)
        unet = recurse_remove_peft_layers(unet)
        unet.peft_config = {}
        unet._hf_peft_config_loaded = False
        unet.to(dtype).save_pretrained(folder)
        return folder

    # -- training -----------------------------------------------------------------------------
    def rewarded_tasks(self) -> list[int]:
        """The rewards a training step maximises (their loss terms add up)."""
        return [self.current_task]

    def step_losses(self, step: int, latents: Tensor, timestep: Tensor, prediction: Tensor, context: Tensor) -> dict:
        """Weighted loss terms at a denoising step that keeps its graph: the UNet's input `latents` and
        `prediction` (on the CFG batch [uncond; cond] when guided) under `context`. None by default."""
        return {}

    def ddim(self, num_inference_steps: int):
        from lightning_modules.nn.diffusion.sampling import ddim_scheduler

        return ddim_scheduler(self.parts.noise_scheduler, num_inference_steps)

    def context(self, prompts: list[str], guided: bool) -> Tensor:
        """The UNet's cross-attention context: [uncond; cond] with guidance, else cond."""
        cond = self.encode_prompts(prompts)
        if not guided:
            return cond
        return torch.cat([self.encode_prompts([""]).expand_as(cond), cond])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        prompts = list(batch["prompt"])
        guided = self.train_guidance_scale > 1
        with torch.no_grad():
            context = self.context(prompts, guided)
        size = self.stream.resolution // self.parts.vae_scale_factor
        unet = self.parts.unet
        latents = torch.randn(len(prompts), unet.config.in_channels, size, size, device=self.device)
        scheduler = self.ddim(self.train_inference_steps)
        grad_from = first_grad_step(
            self.train_inference_steps, self.truncation, self.backprop_steps, self.truncation_mean, self.truncation_std
        )
        collected: dict[str, list[Tensor]] = {}

        def on_grad_step(i: int, x: Tensor, t: Tensor, prediction: Tensor) -> None:
            for name, value in self.step_losses(i, x, t, prediction, context).items():
                collected.setdefault(name, []).append(value)

        latents = ddim_with_truncated_grad(
            lambda x, t: unet(x, t, context).sample,
            scheduler,
            latents,
            self.train_guidance_scale,
            self.train_eta,
            grad_from,
            on_grad_step=on_grad_step,
        )
        images = self.parts.decode_latents(latents)
        terms: dict[str, Tensor] = {}
        for j in self.rewarded_tasks():
            reward = self.rewards[j](images, prompts)
            terms[f"reward/{self.stream.task_names[j]}"] = -self.loss_scales[j] * reward.mean()
            self.log(f"train/reward_value/{self.stream.task_names[j]}", reward.mean().detach(), batch_size=len(prompts))
        terms.update({name: torch.stack(values).mean() for name, values in collected.items()})
        loss = sum(terms.values())
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=len(prompts))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(prompts))
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def prompt_seed(self, prompt: str) -> int:
        return self.eval_seed + zlib.crc32(prompt.encode())

    def base_images(self, prompt: str) -> Tensor:
        """The base model's (adapters off) evaluation images for `prompt`, made once per run."""
        if prompt not in self._base_images:
            with self.base_model():
                images = self.generate([prompt] * self.eval_samples_per_prompt, seed=self.prompt_seed(prompt))
            self._base_images[prompt] = images
        return self._base_images[prompt]

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        """The UNet without its adapters for the duration (merged adapters are taken out and put back)."""
        merged = self.adapters_merged()
        if merged:
            self.unmerge_adapters()
        self.parts.unet.disable_adapters()
        try:
            yield
        finally:
            self.parts.unet.enable_adapters()
            if merged:
                self.merge_adapters()

    def eval_step(self, batch: dict[str, Any], task_id: int) -> dict[str, Tensor]:
        """Per image: the task's measured reward, SSIM against the base model's image, and the digit judge's
        verdict where every prompt of the batch names a digit."""
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        from datamodules import small_world as world

        n = self.eval_samples_per_prompt
        prompts = list(batch["prompt"])
        images = torch.cat([self.generate([p] * n, seed=self.prompt_seed(p)) for p in prompts])
        base = torch.cat([self.base_images(p).to(images.device) for p in prompts])
        repeated = [p for p in prompts for _ in range(n)]
        scores = {
            "reward": self.rewards[task_id].measure(images, repeated),
            "ssim": ssim(images, base, data_range=1.0, reduction="none"),
        }
        digits = {world.digit_prompt(d): d for d in range(10)}
        if self.judge is not None and all(p in digits for p in prompts):
            labels = torch.tensor([digits[p] for p in repeated], device=images.device)
            scores["digit_accuracy"] = (self.judge.predict(images) == labels).float()
        if self.log_images and int(batch["index"][0]) == 0:
            self._log_grid(images, task_id)
        return scores
