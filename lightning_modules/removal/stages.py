"""`RemovalStages`: RORem's whole recipe as one stream, one method per task, on one model.

    stages: [rorem, discriminator, lcm, dpo]      # or ppo; any order that has D_phi before what needs it

The model is the SDXL-inpainting UNet (RORem trains all of it), D_phi (a LoRA and head on a copy of the base
UNet, `discriminator`), a 4-step student adapter `lcm` (LCM-LoRA, `lightning_modules.removal.lcm`) and a
policy adapter `policy` (Diffusion-DPO, `...removal.dpo`; DDPO-style PPO, `...removal.ppo`). The reference
of DPO and PPO is the UNet with its adapters switched off, the LCM teacher the UNet as the 50-step sampler
runs it (the policy adapter on, if any), never a second copy.

Two samplers: `full`, RORem's (diffusers' SDXL inpainting pipeline, 50 steps, strength 0.99, the policy
adapter on), and `fast`, the 4-step LCM sampler (diffusers' `LCMScheduler` in the same pipeline, the lcm
adapter on top). After each stage every stage's held-out set is evaluated with that stage's sampler (`fast`
for lcm, `full` for the others): the matrix in `continual_metrics.json` shows what each stage did to every
earlier stage's metrics (success, background PSNR/SSIM, D_phi's verdict and its agreement with the ground
truth, and `seconds_per_image`).

`LCMDistill`, `DiffusionDPO` and `RemovalPPO` are this module with every task one method; `init_from` starts
any of them from the checkpoint of an earlier run (RORem's `last.ckpt`, the discriminator's, or a stages run's),
so a stage also runs alone. Checkpoints hold what this run learned plus what `init_from` brought.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
import warnings
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.inpainting import condition_latents, inpainting_pipeline, nine_channels
from lightning_modules.removal.dpo import DPOSettings, PreferenceOptimisation
from lightning_modules.removal.lcm import LCM_TARGET_MODULES, ConsistencyDistillation, LCMSettings
from lightning_modules.removal.ppo import PolicyGradient, PPOSettings
from lightning_modules.removal.rorem import RORem

STAGES = ("rorem", "discriminator", "lcm", "dpo", "ppo")
#: the adapter each adapter-training stage trains
ADAPTERS = {"lcm": "lcm", "dpo": "policy", "ppo": "policy"}


def sampler_of(stage: str) -> Literal["full", "fast"]:
    """The sampler a stage trains and is evaluated with: the 4-step one for lcm, RORem's for the others."""
    return "fast" if stage == "lcm" else "full"


class RemovalStages(ConsistencyDistillation, PreferenceOptimisation, PolicyGradient, RORem):
    """Args (besides `RORem`'s, which set the `full` sampler and the evaluation):
    stages: the method of each task, one of rorem, discriminator, lcm, dpo, ppo (a list as long as the data's
        rounds; `LCMDistill`, `DiffusionDPO`, `RemovalPPO` fill it with their own).
    init_from: a checkpoint of an earlier run whose learned tensors start this one (RORem's UNet, D_phi's LoRA
        and head, adapters); None: the base model as loaded.
    lcm / dpo / ppo: each method's settings (see `LCMSettings`, `DPOSettings`, `PPOSettings`).
    policy_rank / policy_alpha: the policy adapter's LoRA on the attention projections (the diffusers
        Diffusion-DPO LoRA variant: 8 / 8).
    rorem_lr: the UNet's learning rate in a rorem stage (None: the optimizer's).
    """

    #: the method every task runs when `stages` is not given (None: `stages` is required)
    STAGE: str | None = None

    def __init__(
        self,
        stream=None,
        stages: list[str] | None = None,
        init_from: str | None = None,
        pretrained_model_name_or_path: str = "tiny",
        prompt_embedding: Literal["encoded", "zeros"] = "encoded",
        binarize_mask: bool = False,
        gradient_checkpointing: bool = False,
        discriminator: str | None = None,
        lcm: LCMSettings | None = None,
        dpo: DPOSettings | None = None,
        ppo: PPOSettings | None = None,
        policy_rank: int = 8,
        policy_alpha: float = 8.0,
        rorem_lr: float | None = None,
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
        num_tasks = None if stream is None else stream.num_tasks
        self.stages = self._check_stages(stages, num_tasks)
        self.lcm = lcm or LCMSettings()
        self.dpo = dpo or DPOSettings()
        self.ppo = ppo or PPOSettings()
        for settings in (self.lcm, self.dpo, self.ppo):
            settings.check()
        super().__init__(
            stream,
            pretrained_model_name_or_path,
            prompt_embedding,
            binarize_mask,
            gradient_checkpointing,
            discriminator,
            eval_inference_steps,
            eval_strength,
            eval_guidance_scale,
            eval_prompt,
            eval_seed,
            mask_dilation,
            background_margin,
            human_threshold_db,
            clip_model,
            scorer_lr,
            log_images,
            optimizer,
            lr_scheduler,
        )
        self.parts.unet.requires_grad_(False)  # what trains is chosen per stage (`_train_stage`)
        self.rorem_lr = rorem_lr
        initial = self._read_init(init_from)
        if self.scorer is None and ("discriminator" in self.stages or any(k.startswith("scorer.") for k in initial)):
            self.scorer = self.build_scorer()  # from the base UNet as loaded, as RORem's D_phi
            self.scorer.requires_grad_(False)
        self._check_scorer_order(discriminator is not None or any(k.startswith("scorer.") for k in initial))
        self.adapters = [
            name
            for name in ("lcm", "policy")
            if any(ADAPTERS.get(s) == name for s in self.stages) or any(f".lora_A.{name}." in k for k in initial)
        ]
        self._add_adapters(policy_rank, policy_alpha)
        self._initial_keys = self._load_initial(initial, init_from) if initial else set()
        self._merge_wanted = False
        self._sampler: Literal["full", "fast"] = "full"
        self._last_remove_seconds = 0.0
        self._ema_target: dict[str, Tensor] | None = None  # the lcm adapter's EMA (callbacks.EMATeacher)
        self.advantage_stats = self.ppo.stat_tracker()
        self._train_stage(self.stages[0])  # DDP wraps the model before the first optimizer is built

    # -- the stream ---------------------------------------------------------------------------------
    @classmethod
    def _check_stages(cls, stages: list[str] | None, num_tasks: int | None) -> list[str]:
        if stages is None:
            if cls.STAGE is None:
                raise ConfigError(f"model.stages: list the method of each task ({', '.join(STAGES)})")
            return [cls.STAGE] * (num_tasks or 1)
        if cls.STAGE is not None:
            raise ConfigError(f"model.stages: {cls.__name__} runs {cls.STAGE} in every task; use RemovalStages to mix")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"model.stages must be a non-empty list of {', '.join(STAGES)}, got {stages!r}")
        for k, stage in enumerate(stages):
            if stage not in STAGES:
                raise ConfigError(f"model.stages[{k}]: {stage!r} is not one of {', '.join(STAGES)}")
        if num_tasks is not None and len(stages) != num_tasks:
            raise ConfigError(
                f"model.stages has {len(stages)} entries but the data has {num_tasks} rounds: one stage per round"
            )
        return list(stages)

    def _needs_scorer(self, stage: str) -> bool:
        return (
            stage == "ppo"
            or (stage == "dpo" and self.dpo.pairs == "online")
            or (stage == "lcm" and self.lcm.reward_weighting != "none")
        )

    def _check_scorer_order(self, loaded: bool) -> None:
        trained = False
        for k, stage in enumerate(self.stages):
            trained = trained or stage == "discriminator"
            if self._needs_scorer(stage) and not (trained or loaded):
                raise ConfigError(
                    f"model.stages[{k}] ({stage}) scores removals with D_phi, but none is trained before it or "
                    "loaded: put a discriminator stage first, or set model.discriminator / model.init_from"
                )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.trainer.world_size > 1 and len(set(self.stages)) > 1:
            raise ConfigError(
                f"model.stages: a stream of different methods ({', '.join(dict.fromkeys(self.stages))}) trains other "
                "parameters in each stage, which DDP cannot follow; run it on one device, or each stage as its own "
                "fit (LCMDistill, DiffusionDPO, RemovalPPO with model.init_from) under DDP"
            )
        if stage == "fit" and "lcm" in self.stages and self.lcm.target == "ema":
            from callbacks.ema_teacher import EMATeacher

            if not any(isinstance(c, EMATeacher) for c in self.trainer.callbacks):
                raise ConfigError(
                    "model.lcm.target ema averages the student with callbacks.EMATeacher: add it to trainer.callbacks "
                    "(full LCM: momentum 0.95), or use lcm.target: student (LCM-LoRA)"
                )

    @property
    def stage(self) -> str:
        return self.stages[self.current_task]

    # -- adapters ---------------------------------------------------------------------------------------
    def _add_adapters(self, policy_rank: int, policy_alpha: float) -> None:
        from peft import LoraConfig

        from lightning_modules.nn.diffusion.components import ATTENTION_PROJECTIONS

        configs = {
            "lcm": LoraConfig(
                r=self.lcm.rank,
                lora_alpha=self.lcm.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=self.lcm.target_modules or LCM_TARGET_MODULES,
            ),
            "policy": LoraConfig(
                r=policy_rank,
                lora_alpha=policy_alpha,
                init_lora_weights="gaussian",
                target_modules=ATTENTION_PROJECTIONS,
            ),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in self.adapters:
                self.parts.unet.add_adapter(configs[name], adapter_name=name)
        if self.adapters:
            self.parts.unet.disable_adapters()

    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The LoRA matrices of `adapter` by their names in this module ({} when it does not exist)."""
        keys = (f".lora_A.{adapter}.", f".lora_B.{adapter}.")
        return {n: p for n, p in self.named_parameters() if any(k in n for k in keys)}

    def _lora_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.parts.unet.modules() if isinstance(m, BaseTunerLayer)]

    def active_adapters(self, mode: str) -> list[str]:
        """The adapters a mode runs: `full` the policy, `fast` the policy and the lcm student, `reference` none."""
        wanted = {"full": ["policy"], "fast": ["policy", "lcm"], "reference": []}[mode]
        return [a for a in wanted if a in self.adapters]

    def use(self, mode: Literal["full", "fast", "reference"]) -> None:
        """Switches the UNet's adapters to `mode` (merged ones are taken out first and, when merging was asked
        for, the new ones folded in); which parameters train is left as the stage set it."""
        if not self.adapters:
            return
        flags = {n: p.requires_grad for n, p in self.parts.unet.named_parameters() if "lora_" in n}
        for layer in self._lora_layers():
            while layer.merged:
                layer.unmerge()
        active = self.active_adapters(mode)
        if active:
            self.parts.unet.enable_adapters()
            self.parts.unet.set_adapters(active)
        else:
            self.parts.unet.disable_adapters()
        for n, p in self.parts.unet.named_parameters():  # peft marks active adapters trainable: undo that
            if n in flags:
                p.requires_grad_(flags[n])
        if self._merge_wanted and active:
            for layer in self._lora_layers():
                layer.merge(adapter_names=[a for a in active if a in layer.lora_A])

    @contextlib.contextmanager
    def using(self, mode: Literal["full", "fast", "reference"]):
        """`use(mode)` for the duration, then the stage's training mode again."""
        self.use(mode)
        try:
            yield
        finally:
            self.use(self.training_mode())

    def training_mode(self) -> Literal["full", "fast"]:
        return sampler_of(self.stage)

    # LoRAMerge's hooks: fold the sampler's adapters in while the model only samples.
    def merge_adapters(self) -> None:
        self._merge_wanted = True
        self.use(self._sampler)

    def unmerge_adapters(self) -> None:
        self._merge_wanted = False
        for layer in self._lora_layers():
            while layer.merged:
                layer.unmerge()

    def adapters_merged(self) -> bool:
        return any(layer.merged for layer in self._lora_layers())

    # -- export --------------------------------------------------------------------------------------------
    def save_diffusers(self, folder: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Files a stock `StableDiffusionXLInpaintPipeline` loads: each adapter as `<name>_lora.safetensors`
        (`pipe.load_lora_weights(folder, weight_name=...)`, then `pipe.fuse_lora()`), and `unet/` (the trained
        UNet without adapters) when this model's UNet is not the base's."""
        import copy

        from diffusers import StableDiffusionXLInpaintPipeline
        from diffusers.utils.peft_utils import recurse_remove_peft_layers
        from peft.utils import get_peft_model_state_dict

        from lightning_modules.nn.diffusion.diffusers_export import cast

        self.unmerge_adapters()
        unet = self.parts.unet
        manifest: dict[str, Any] = {"loras": {}}
        for name in self.adapters:
            state = cast(get_peft_model_state_dict(unet, adapter_name=name), dtype)
            config = unet.peft_config[name].to_dict()
            config["target_modules"] = sorted(config["target_modules"])
            weight_name = f"{name}_lora.safetensors"
            StableDiffusionXLInpaintPipeline.save_lora_weights(
                folder, unet_lora_layers=state, weight_name=weight_name, unet_lora_adapter_metadata=config
            )
            manifest["loras"][name] = weight_name
        if "rorem" in self.stages or any(k.startswith("parts.unet.") and "lora_" not in k for k in self._initial_keys):
            plain = recurse_remove_peft_layers(copy.deepcopy(unet))
            plain.peft_config, plain._hf_peft_config_loaded = {}, False
            plain.to(dtype).save_pretrained(os.path.join(folder, "unet"))
            manifest["unet"] = "unet"
        return manifest

    def loading_snippet(self, manifest: dict[str, Any], folder: str) -> list[str]:
        """Python lines that load the export into a stock SDXL inpainting pipeline and remove (4 LCM steps with the
        student; RORem's 50 steps without). A 50-step sampler with the policy alone: `pipe.set_adapters(["policy"])`."""
        lines = [
            "import torch",
            "from diffusers import LCMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel",
            f'pipe = StableDiffusionXLInpaintPipeline.from_pretrained("{manifest["base"]}")',
        ]
        if "unet" in manifest:
            lines.append(f'pipe.unet = UNet2DConditionModel.from_pretrained("{folder}/unet")')
        loras = manifest["loras"]
        for name, file in loras.items():
            lines.append(f'pipe.load_lora_weights("{folder}", weight_name="{file}", adapter_name="{name}")')
        if loras:
            lines += [f"pipe.set_adapters({list(loras)})", "pipe.fuse_lora()"]
        if "lcm" in loras:
            lines += [
                "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)",
                'image = pipe("", image=source, mask_image=mask, num_inference_steps=4, strength=1.0, '
                "guidance_scale=1.0).images[0]",
            ]
        else:
            lines.append(
                'image = pipe("", image=source, mask_image=mask, num_inference_steps=50, strength=0.99, '
                "guidance_scale=1.0).images[0]"
            )
        return lines

    # -- init_from and checkpoints ------------------------------------------------------------------------
    @staticmethod
    def _read_init(path: str | None) -> dict[str, Tensor]:
        if path is None:
            return {}
        from cli.files import load_torch_file

        checkpoint = load_torch_file(path, "model.init_from")
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not state:
            raise ConfigError(f"model.init_from {path}: not a checkpoint written by lifelong fit (no state_dict)")
        return state

    def _load_initial(self, state: dict[str, Tensor], path: str) -> set[str]:
        """Loads `state` (keys of a plain UNet are mapped onto peft's `base_layer`); returns the keys it set."""
        mine = self.state_dict()
        chosen: dict[str, Tensor] = {}
        for key, value in state.items():
            target = key if key in mine else None
            if target is None and key.startswith("parts.unet."):
                stem, _, leaf = key.rpartition(".")
                alias = f"{stem}.base_layer.{leaf}"
                target = alias if alias in mine else None
            if target is None:
                continue
            if tuple(mine[target].shape) != tuple(value.shape):
                raise ConfigError(
                    f"model.init_from {path}: {key} has shape {tuple(value.shape)}, this model's "
                    f"{tuple(mine[target].shape)}: use the base model, resolution and ranks it was trained with"
                )
            chosen[target] = value
        if not chosen:
            raise ConfigError(
                f"model.init_from {path}: none of its tensors fits this model; pass the last.ckpt of a RORem, "
                "RemovalDiscriminator or removal-stages run on the same base model"
            )
        self.load_state_dict(chosen, strict=False)
        return set(chosen)

    def is_delta(self, name: str) -> bool:
        """What the stages train (the UNet for rorem, D_phi for discriminator, each adapter for its methods) and
        what `init_from` or `discriminator` brought: a checkpoint then starts a later stage on its own."""
        if name in self.__dict__.get("_initial_keys", ()) or self.is_scorer_delta(name):
            return True
        if not name.startswith("parts.unet."):
            return False
        lora = ".lora_A." in name or ".lora_B." in name
        return (not lora and "rorem" in self.stages) or (lora and any(f".{a}." in name for a in self.adapters))

    # -- training ---------------------------------------------------------------------------------------
    def deepspeed_unsupported(self) -> str | None:
        trained = {ADAPTERS.get(s, s) for s in self.stages}  # dpo and ppo train the same policy adapter
        return f"the stages {self.stages} train different parameters" if len(trained) > 1 else None

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """The current stage's parameters as one optimizer group: the UNet's own weights (rorem), D_phi's LoRA
        and head (discriminator), the lcm adapter (lcm) or the policy adapter (dpo, ppo). A query only: the
        stage's requires-grad flags and sampler are set when its task starts (`on_task_start`)."""
        return [self._stage_group(self.stage)]

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        self._train_stage(self.stage)

    def _train_stage(self, stage: str) -> None:
        """Marks `stage`'s parameters, and only those, as requiring grad, and switches to its sampler."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self._stage_group(stage)["params"]:
            p.requires_grad_(True)
        self.use(sampler_of(stage))

    def _stage_group(self, stage: str) -> dict[str, Any]:
        """`stage`'s optimizer group (its parameters, and its learning rate where it has its own)."""
        if stage == "rorem":
            params = [p for n, p in self.parts.unet.named_parameters() if "lora_" not in n]
            group = {"params": params} if self.rorem_lr is None else {"params": params, "lr": self.rorem_lr}
        elif stage == "discriminator":
            group = {"params": self.scorer.trainable(), "lr": self.scorer_lr}
        else:
            settings = {"lcm": self.lcm, "dpo": self.dpo, "ppo": self.ppo}[stage]
            group = {"params": list(self.adapter_parameters(ADAPTERS[stage]).values()), "lr": settings.lr}
        return group

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._train_stage(self.stage)  # the resumed task's parameters, before DDP sees which ones train

    def conditioning(self, batch: dict[str, Tensor], repeat: int = 1) -> tuple[Tensor, Tensor]:
        """(mask at latent size, masked-source latents) of the batch, each row `repeat` times."""
        source, mask = batch["source"], batch["mask"]
        if repeat > 1:
            source, mask = source.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        with torch.no_grad():
            return condition_latents(self.parts, source, mask, True, self.binarize_mask)

    def unet_output(self, noisy: Tensor, cond: tuple[Tensor, Tensor], timesteps: Tensor, prompt: str = "") -> Tensor:
        """The UNet's prediction on [noisy | mask | masked latents] at `timesteps` under `prompt`."""
        small_mask, masked = cond
        context, pooled = self.prompt_conditioning(prompt)
        b = noisy.shape[0]
        sample = nine_channels(noisy, small_mask, masked).to(self.parts.unet.dtype)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        return self.parts.predict(sample, timesteps, context.expand(b, -1, -1), pooled.expand(b, -1), self.resolution)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        stage = self.stage
        if stage in ("rorem", "lcm") and not bool(batch["has_target"].all()):
            raise ConfigError(
                f"data.rounds[{self.current_task}]: the {stage} stage trains on ground truths, but an entry has no GT; "
                "give this round triplets with GT (data.train_needs_target: false is for the dpo and ppo stages)"
            )
        if stage == "rorem":
            return super().training_step(batch, batch_idx)
        if stage == "discriminator":
            return self.scorer_step(batch, f"data.rounds[{self.current_task}]")
        return {"lcm": self.lcm_step, "dpo": self.dpo_step, "ppo": self.ppo_step}[stage](batch)

    # -- removing and evaluating ---------------------------------------------------------------------
    @property
    def fast_pipeline(self):
        """The inpainting pipeline with diffusers' `LCMScheduler` (50-step skeleton) for the 4-step student."""
        pipe = self.__dict__.get("_fast_pipeline")
        if pipe is None:
            from diffusers import LCMScheduler

            pipe = self.__dict__["_fast_pipeline"] = inpainting_pipeline(self.parts)
            known = inspect.signature(LCMScheduler.__init__).parameters  # the base's Euler keys LCM does not take
            config = {k: v for k, v in self.parts.scheduler.config.items() if k in known}
            pipe.scheduler = LCMScheduler.from_config(
                config, original_inference_steps=self.lcm.num_ddim_timesteps, clip_sample=False
            )
        return pipe

    @property
    def pipeline(self):
        """The pipeline of the sampler in use: RORem's, or the LCM one (`fast_pipeline`)."""
        return self.fast_pipeline if self._sampler == "fast" else super().pipeline

    @torch.no_grad()
    def remove(
        self,
        source: Tensor,
        mask: Tensor,
        seeds: list[int],
        num_inference_steps: int | None = None,
        strength: float | None = None,
        guidance_scale: float | None = None,
        sampler: Literal["full", "fast"] | None = None,
    ) -> Tensor:
        """As `RORem.remove`, with `sampler` (default: the evaluation's) `full` (RORem's pipeline, the policy
        adapter on) or `fast` (the LCM student: `lcm.inference_steps` at `lcm.strength`, no CFG)."""
        sampler = sampler or self._sampler
        if sampler == "fast" and "lcm" not in self.adapters:
            raise ConfigError("the fast sampler needs the lcm adapter: train an lcm stage or init_from an LCM run")
        previous = self._sampler
        self._sampler = sampler
        start = time.perf_counter()
        try:
            with self.using(sampler):
                if sampler == "full":
                    out = super().remove(source, mask, seeds, num_inference_steps, strength, guidance_scale)
                else:  # `pipeline` is the fast one while `_sampler` says so
                    steps = num_inference_steps or self.lcm.inference_steps
                    strength = self.lcm.strength if strength is None else strength
                    out = super().remove(source, mask, seeds, steps, strength, 1.0)
        finally:
            self._sampler = previous
        self._last_remove_seconds = time.perf_counter() - start
        return out

    def eval_step(self, batch: dict[str, Any], task_id: int) -> dict[str, Tensor]:
        """RORem's metrics with the task's sampler, plus `seconds_per_image` (the removal's wall time over the
        batch) and `d_agreement` (D_phi's verdict at 0.5 equals the ground-truth one)."""
        self._sampler = sampler_of(self.stages[task_id])
        try:
            scores = super().eval_step(batch, task_id)
        finally:
            self._sampler = "full"
        b = batch["source"].shape[0]
        scores["seconds_per_image"] = torch.full((b,), self._last_remove_seconds / b, device=self.device)
        if "d_success" in scores:
            scores["d_agreement"] = (scores["d_success"] == scores["gt_success"].float()).float()
        return scores


class LCMDistill(RemovalStages):
    """RORem-4S: LCM-LoRA consistency distillation of a trained RORem UNet (`init_from`: its last.ckpt) into the
    4-step `lcm` adapter, in every task; plain or reward-weighted (`lcm.reward_weighting`)."""

    STAGE = "lcm"


class DiffusionDPO(RemovalStages):
    """Diffusion-DPO of the `policy` adapter on a trained RORem UNet against the UNet without adapters, on
    preference pairs from a file or made online by D_phi, in every task."""

    STAGE = "dpo"


class RemovalPPO(RemovalStages):
    """DDPO-style PPO of the `policy` adapter with D_phi's score (minus an optional background penalty) as the
    reward, in every task."""

    STAGE = "ppo"
