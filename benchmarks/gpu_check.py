"""One-GPU readiness check: every family at its paper's shapes, random weights, a few optimizer steps in bf16.

    python benchmarks/gpu_check.py [--tiny] [--steps 3] [--batch N] [--families ...] [--out FILE]

Each family's LightningModule is built as its config builds it (random weights of the real architecture,
nothing downloaded), its task hooks start task 1 (so the terms that only exist after the first task run
too: LMSRR's drift and replay, R2MoE's routing distillation, RID's distillation, DMPEL's mixing of two
experts), and then `--steps` optimizer steps, after one warm-up step, run through the module's own
`training_step` and batch hooks, its own `configure_optimizers`, under `torch.autocast` (bf16 on CUDA;
float32 on a CPU unless `--precision bf16`). The rows:

- LMSRR: two ViT-B/16 (the `base` preset) at 224x224 (CIFAR's 32x32 upsampled, as the released code),
  3 trainable blocks each, batch 32 + 32 replayed, CIFAR-100's 100 classes.
- R2MoE: SD 1.5's UNet (`r2moe_storage.sd15_unet`, with `r2moe_storage.sd15_parts`' tokenizer and
  scheduler), SD 1.5's VAE and 12-layer CLIP text encoder (their public configs, random weights), 512x512,
  batch 2 (a concept and a regularisation image), 10 concepts allocated.
- DMPEL: the LIBERO-Goal policy of `configs/robot/dmpel_libero_goal.yaml` (its `policy` settings, a
  random CLIP ViT-B/16 written to a temporary folder as both image tower and instruction encoder), two
  128x128 cameras, joint and gripper states, window 10, batch 32, 10 tasks allocated.
- RID: reward 1 of `configs/diffusion/rid_rewards_tiny.yaml` at rid_sd15.yaml's shapes: SD 1.5's UNet, VAE
  and CLIP text encoder (as R2MoE's row), 512x512, batch 8, 50 guided DDIM steps with gradients through the
  last (K = 1), UNet gradient checkpointing, distillation from the EMA teacher (its update timed with the step).
- RORem and its discriminator: `configs/removal/{rorem,discriminator}_tiny.yaml` with SDXL-inpainting's
  9-channel UNet, VAE and two text encoders (public configs, random weights: 2.57 B UNet parameters), 512x512,
  gradient checkpointing, one batch of the embedded removal set; batch 16 (RORem: the whole UNet trains) and
  32 (D_phi: LoRA and the head), the sdxl configs' per-GPU batches.
- DeepSpeed ZeRO-2: `lifelong fit` of LMSRR (the same two ViT-B/16) on Split-Digits with
  `configs/trainer/deepspeed_zero2.yaml`, one task of `--steps` + 1 steps, its evaluation and checkpoint;
  needs CUDA and the `deepspeed` package, otherwise the row says which is missing.

`--tiny` runs the same code on small shapes (the `tiny` ViT and SD presets, a small policy with a tiny CLIP
folder) in seconds on a CPU. A family that fails is a row with its one-line error; the exit
status is 1 if any present family failed. Prints a table and writes `benchmarks/out/gpu_check.json` (or
`--out`). Peak memory is `torch.cuda.max_memory_allocated` on CUDA, else the process's peak resident set
while the family ran (sampled).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("lmsrr", "r2moe", "rid", "rorem", "discriminator", "dmpel", "zero2")


@functools.cache
def sibling(name: str):
    """A benchmark script beside this one, as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- measuring -----------------------------------------------------------------------------------
class PeakRSS:
    """The process's peak resident set (bytes) while the block runs, sampled every 10 ms from /proc
    (elsewhere: the lifetime peak of `resource.getrusage`)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that holds, after the block, `peak_memory_gib` and what it measured (`memory`)."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out.update(peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, memory="cuda max_memory_allocated")
    else:
        with PeakRSS() as rss:
            yield out
        out.update(peak_memory_gib=rss.peak / 2**30, memory="peak RSS")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Run:
    """How the check runs: device, autocast dtype (None: float32), steps, and whether shapes are tiny."""

    device: torch.device
    dtype: torch.dtype | None
    steps: int
    tiny: bool
    tmp: str
    batch: int | None = None

    def batch_size(self, default: int) -> int:
        """`default`, unless --batch overrides every family's batch size."""
        return self.batch or default


@dataclass
class Case:
    """One family ready to train: the module (on the device), one batch, its size and a shapes line."""

    model: Any
    batch: dict[str, Any]
    batch_size: int
    shapes: str
    #: what a callback does after each optimizer step and belongs to the step's cost (RID's EMA update)
    after_step: Callable[[], None] | None = None


def start_task(model, task_id: int) -> None:
    """What the task-switch and expert-freezing callbacks do at a task start."""
    from callbacks import ExpertFreezing

    model.on_task_start(task_id)
    ExpertFreezing.apply(model, task_id)


def train_steps(case: Case, run: Run) -> dict[str, Any]:
    """One warm-up step and `run.steps` timed ones through the module's own hooks, step and optimizer,
    in Lightning's order: batch start, training_step, backward, optimizer step, batch end."""
    model, batch = case.model, case.batch
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    model.train()
    times, losses = [], []
    for step in range(run.steps + 1):
        sync(run.device)
        start = time.perf_counter()
        model.on_train_batch_start(batch, step)
        with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
            loss = model.training_step(batch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.on_train_batch_end({"loss": loss}, batch, step)
        if case.after_step is not None:
            case.after_step()
        losses.append(float(loss.detach().float()))
        sync(run.device)
        times.append(time.perf_counter() - start)
    timed = times[1:] if len(times) > 1 else times
    step_s = sum(timed) / len(timed)
    return {
        "step_s": step_s,
        "warmup_s": times[0],
        "samples_per_s": case.batch_size / step_s,
        "loss": losses[-1],
        "losses": losses,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# -- LMSRR -----------------------------------------------------------------------------------------
def lmsrr_case(run: Run) -> Case:
    """Task 1 of LMSRR (drift and replay terms on) on CIFAR-100-shaped images."""
    from datamodules.base import TaskStream
    from lightning_modules import LMSRR

    preset, batch, tasks, per_task = ("tiny", 8, 5, 2) if run.tiny else ("base", 32, 10, 10)
    batch = run.batch_size(batch)
    torch.manual_seed(0)
    stream = TaskStream(tuple(f"t{i}" for i in range(tasks)), (per_task,) * tasks, (3, 32, 32))
    sources = [{"name": "hf_vit", "args": {"preset": preset, "trainable_blocks": 3}}] * 2
    model = LMSRR(
        stream=stream,
        backbone_args={"sources": sources},
        buffer_size=500,
        minibatch_size=batch,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.03),
    ).to(run.device)
    start_task(model, 1)
    d, classes = run.device, tasks * per_task
    model.buffer.add(
        x=torch.rand(batch, 3, 32, 32, device=d),
        y=torch.randint(0, per_task, (batch,), device=d),
        logits=torch.randn(batch, classes, device=d),
        task=torch.zeros(batch, dtype=torch.long, device=d),
    )
    data = {
        "x": torch.randn(batch, 3, 32, 32, device=d),
        "y": torch.randint(per_task, 2 * per_task, (batch,), device=d),
        "task": torch.ones(batch, dtype=torch.long, device=d),
    }
    size = model.backbone.sources[0].image_size
    name = "ViT-B/16" if preset == "base" else "tiny ViT"
    shapes = f"2 x {name} at {size}x{size} (32x32 upsampled), batch {batch} + {batch} replayed, {classes} classes"
    return Case(model, data, batch, shapes)


# -- R2MoE -----------------------------------------------------------------------------------------
def sd15_vae():
    """SD 1.5's VAE (its public vae/config.json), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def sd15_text_encoder():
    """SD 1.5's CLIP ViT-L/14 text encoder (12 layers, width 768), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB

    config = CLIPTextConfig(
        **CLIP_TEXT_VOCAB,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def sd15_full_parts(path: str, seed: int = 0):
    """`r2moe_storage.sd15_parts` (SD 1.5's UNet) with SD 1.5's VAE and full text encoder put in."""
    parts = sibling("r2moe_storage").sd15_parts(path, seed)
    torch.manual_seed(seed)
    parts.vae = sd15_vae().requires_grad_(False)
    parts.text_encoder = sd15_text_encoder().requires_grad_(False)
    return parts


def r2moe_case(run: Run) -> Case:
    """Concept 1 of R2MoE (routing distillation on concept 0's gate prompt), half concept, half regularisation."""
    from lightning_modules.diffusion import R2MoE

    storage = sibling("r2moe_storage")
    concepts, batch = (3, 2) if run.tiny else (10, 2)
    batch = run.batch_size(batch)
    resolution = 64 if run.tiny else 512
    stream = replace(storage.stream(concepts), resolution=resolution)
    torch.manual_seed(0)
    if run.tiny:
        model = R2MoE(stream, pretrained_model_name_or_path="tiny")
    else:
        with mock.patch("lightning_modules.nn.diffusion.components.load_stable_diffusion", sd15_full_parts):
            model = R2MoE(stream, pretrained_model_name_or_path="sd15")
    model.to(run.device)
    start_task(model, 0)
    model.on_task_end(0)
    start_task(model, 1)
    side = resolution // model.parts.vae_scale_factor
    d = run.device
    data = {
        "pixels": torch.rand(batch, 3, resolution, resolution, device=d) * 2 - 1,
        "mask": torch.ones(batch, 1, side, side, device=d),
        "caption": [(f"photo of a {stream.tokens[1]} thing", "photo of a thing")[i % 2] for i in range(batch)],
    }
    unet = "tiny UNet" if run.tiny else "SD 1.5 UNet + VAE + CLIP-L text"
    shapes = f"{unet}, {resolution}x{resolution} (latents {side}x{side}), batch {batch}, {concepts} concepts"
    return Case(model, data, batch, shapes)


# -- RID -------------------------------------------------------------------------------------------
def rid_case(run: Run) -> Case:
    """Reward 1 of RID: its own adapter trains (reward 0's is frozen), DRaFT-1 reward gradients (K = 1)
    through guided DDIM sampling, distillation from the EMA teacher, whose update is part of the step."""
    from callbacks import EMATeacher
    from cli.diffusion import build

    if run.tiny:
        base, resolution, batch, steps = "tiny", 32, 2, 4
        patch = contextlib.nullcontext()
    else:  # rid_sd15.yaml's batch, resolution and sampling
        base, resolution, batch, steps = "sd15", 512, 8, 50
        patch = mock.patch("lightning_modules.nn.diffusion.components.load_stable_diffusion", sd15_full_parts)
    batch = run.batch_size(batch)
    overrides = [
        f"--model.init_args.pretrained_model_name_or_path={base}",
        f"--model.init_args.train_inference_steps={steps}",
        "--model.init_args.train_guidance_scale=5.0",
        "--model.init_args.truncation=draft",
        "--model.init_args.backprop_steps=1",
        f"--model.init_args.gradient_checkpointing={str(not run.tiny).lower()}",
        f"--data.init_args.resolution={resolution}",
        f"--data.init_args.batch_size={batch}",
    ]
    torch.manual_seed(0)
    with patch:
        model, datamodule, _ = build([str(ROOT / "configs/diffusion/rid_rewards_tiny.yaml")], overrides)
    model.to(run.device)
    start_task(model, 0)
    model.on_task_end(0)
    start_task(model, 1)
    teacher = EMATeacher(momentum=0.999)  # rid_sd15.yaml's
    teacher.reset(model)  # what the callback does at each task start
    prompts = list(datamodule.train_prompts(1))
    data = {"prompt": [prompts[i % len(prompts)] for i in range(batch)]}
    unet = "tiny UNet" if run.tiny else "SD 1.5 UNet + VAE + CLIP-L text"
    side = resolution // model.parts.vae_scale_factor
    shapes = (
        f"{unet}, {resolution}x{resolution} (latents {side}x{side}), batch {batch}, {steps} DDIM steps with CFG, "
        f"K = 1, reward {datamodule.stream.task_names[1]}"
    )
    return Case(model, data, batch, shapes, after_step=lambda: teacher.update(model))


# -- RORem and its discriminator -------------------------------------------------------------------
def sdxl_inpainting_parts(path: str, seed: int = 0):
    """SDXL-inpainting's 9-channel UNet, its VAE and its two text encoders (CLIP-L and OpenCLIP bigG), from the
    public configs of diffusers/stable-diffusion-xl-1.0-inpainting-0.1, random weights; the tokenizers and
    the Euler scheduler of the tiny preset (the same classes)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_modules.nn.diffusion.inpainting import InpaintingParts, tiny_inpainting
    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB

    tiny = tiny_inpainting(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=9,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = sd15_vae()
    vae.register_to_config(sample_size=1024, scaling_factor=0.13025)  # SDXL's VAE: SD's layout, its own scale
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    clip_g = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**CLIP_TEXT_VOCAB, **clip_l, projection_dim=768, hidden_act="quick_gelu")
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**CLIP_TEXT_VOCAB, **clip_g, projection_dim=1280, hidden_act="gelu")
    )
    parts = InpaintingParts(
        unet, vae, text_encoder, text_encoder_2, tiny.tokenizer, tiny.tokenizer_2, tiny.noise_scheduler
    )
    return parts.requires_grad_(False)


def removal_case(run: Run, config: str, batch: int, counts: dict[str, int]) -> Case:
    """A removal module built from `config` (the tiny preset, or SDXL-inpainting's shapes at 512 with gradient
    checkpointing, as the sdxl configs train), with one batch of the embedded removal set at its resolution."""
    from cli.diffusion import build
    from lightning_modules.removal.base import RemovalModule

    resolution = 32 if run.tiny else 512
    batch = run.batch_size(batch)
    overrides = [
        f"--data.init_args.resolution={resolution}",
        f"--data.init_args.batch_size={batch}",
        f"--data.init_args.counts={json.dumps({**counts, 'train': max(batch, counts['train'])})}",
        "--data.init_args.num_workers=0",
    ]
    if run.tiny:
        patch = contextlib.nullcontext()
    else:
        overrides += [
            "--model.init_args.pretrained_model_name_or_path=sdxl",
            "--model.init_args.gradient_checkpointing=true",
        ]
        patch = mock.patch("lightning_modules.nn.diffusion.inpainting.load_inpainting", sdxl_inpainting_parts)
    torch.manual_seed(0)
    with patch:
        model, datamodule, _ = build([str(ROOT / config)], overrides, RemovalModule, "an object-removal method")
    model.to(run.device)
    start_task(model, 0)
    datamodule.setup("fit")
    data = next(iter(datamodule.train_dataloader()))
    data = model.transfer_batch_to_device(data, run.device, 0)
    unet = "tiny inpainting UNet" if run.tiny else "SDXL-inpainting UNet + VAE + CLIP-L and bigG text"
    side = resolution // model.parts.vae_scale_factor
    return Case(model, data, batch, f"{unet}, {resolution}x{resolution} (latents {side}x{side}), batch {batch}")


def rorem_case(run: Run) -> Case:
    """RORem's supervised round: the whole 9-channel UNet trains on (source, mask, ground truth) triplets."""
    return removal_case(
        run, "configs/removal/rorem_tiny.yaml", 2 if run.tiny else 16, {"train": 16, "inputs": 8, "eval": 4}
    )


def discriminator_case(run: Run) -> Case:
    """RORem's discriminator D_phi: LoRA on the down and mid blocks' attention plus the head, MSE to the label."""
    config = "configs/removal/discriminator_tiny.yaml"
    return removal_case(run, config, 4 if run.tiny else 32, {"train": 16, "inputs": 8, "eval": 8})


# -- DMPEL -----------------------------------------------------------------------------------------
def write_clip_folder(path: str, tiny: bool) -> str:
    """A transformers CLIP folder with random weights (ViT-B/16, or a tiny one) and CLIP's tokenizer: what
    `image_encoder: clip` and a CLIP `language_encoder` load."""
    from transformers import CLIPConfig, CLIPModel

    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB, clip_tokenizer

    if tiny:
        text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
        vision |= dict(image_size=32, patch_size=8)
        projection = 32
    else:
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        vision |= dict(image_size=224, patch_size=16)
        projection = 512
    torch.manual_seed(0)
    text |= dict(CLIP_TEXT_VOCAB, projection_dim=projection)
    vision["projection_dim"] = projection
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    CLIPModel(config).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    return path


def dmpel_case(run: Run) -> Case:
    """Task 1 of DMPEL (router 1 mixing experts 0 and 1) on LIBERO-Goal-shaped windows."""
    import yaml

    from datamodules.robot.envs import ACTION_DIM
    from datamodules.robot.stream import EnvSpec, RobotTaskStream, is_image_key
    from datamodules.robot.suites import resolve_suite
    from lightning_modules.nn.robot.policy import PolicyConfig
    from lightning_modules.robot.dmpel import DMPEL

    config = yaml.safe_load((ROOT / "configs/robot/dmpel_libero_goal.yaml").read_text())
    args, data = config["model"]["init_args"], config["data"]["init_args"]
    clip = write_clip_folder(os.path.join(run.tmp, "clip"), run.tiny)
    policy = {**args["policy"], "image_encoder_path": clip}
    if run.tiny:
        small = dict(embed_size=32, num_layers=2, num_heads=2, mlp_dim=64, film_hidden=32, gmm_hidden=32)
        policy |= small
        batch, window, image = 4, 4, 32
    else:
        batch, window, image = data["batch_size"], data["window"], data["image_size"]
    batch = run.batch_size(batch)
    suite = resolve_suite(data["suite"])
    lowdim = {"joint_states": (7,), "gripper_states": (2,)}
    keys = tuple(data["obs_keys"])
    shapes = tuple((k, (3, image, image) if is_image_key(k) else lowdim[k]) for k in keys)
    stream = RobotTaskStream(
        task_names=suite.env_names,
        instructions=suite.instructions,
        obs_shapes=shapes,
        action_dim=ACTION_DIM[suite.kind],
        window=window,
        env=EnvSpec(suite=suite.kind, env_names=suite.env_names, obs_keys=keys, image_size=image),
    )
    torch.manual_seed(0)
    model = DMPEL(
        stream=stream,
        policy=PolicyConfig(**policy),
        language_encoder=clip,
        top_k=args["top_k"],
        coefficient_dropout=args["coefficient_dropout"],
        optimizer=lambda params: torch.optim.AdamW(params, **args["optimizer"]["init_args"]),
    ).to(run.device)
    start_task(model, 1)
    d = run.device
    obs = {k: torch.rand(batch, window, *s, device=d) for k, s in shapes}
    data_batch = {
        "obs": obs,
        "actions": torch.rand(batch, window, stream.action_dim, device=d) * 2 - 1,
        "task": torch.ones(batch, dtype=torch.long, device=d),
    }
    tower = "tiny CLIP" if run.tiny else "CLIP ViT-B/16"
    text = (
        f"{tower} policy (embed {policy['embed_size']}, {policy['num_layers']} layers), 2 cameras {image}x{image}, "
        f"window {window}, batch {batch}, {stream.num_tasks} tasks"
    )
    return Case(model, data_batch, batch, text)


# -- DeepSpeed ZeRO-2 ----------------------------------------------------------------------------------
class StepTimer:
    """Lightning callback: the time of each training step (synchronised) and its loss."""

    def __init__(self, device: torch.device):
        import lightning as L

        timer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync(device)
                timer._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync(device)
                timer.times.append(time.perf_counter() - timer._start)
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                timer.losses.append(float(loss.detach().float()))

        self.times: list[float] = []
        self.losses: list[float] = []
        self.callback = _Callback()


def fit_row(trainer_config: str, run: Run, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`lifelong fit` of LMSRR on Split-Digits with `trainer_config`: one task of `run.steps` + 1 steps."""
    from cli.main import QUIET, LifelongCLI

    preset, batch = ("tiny", 8) if run.tiny else ("base", 32)
    batch = run.batch_size(batch)
    sources = [{"name": "hf_vit", "args": {"preset": preset, "trainable_blocks": 3}}] * 2
    args = [  # run=False takes no subcommand; trainer.fit below is what `lifelong fit` runs
        "-c",
        str(ROOT / "configs/classification/lmsrr_splitdigits.yaml"),
        "-c",
        str(ROOT / trainer_config),
        *QUIET,
        f"--trainer.default_root_dir={os.path.join(run.tmp, 'fit')}",
        "--trainer.logger=false",
        f"--model.init_args.backbone_args={json.dumps({'sources': sources})}",
        f"--model.init_args.minibatch_size={batch}",
        f"--data.init_args.batch_size={batch}",
        f"--task_switch.steps_per_task={run.steps + 1}",
        "--task_switch.stop_after_task=1",
        *extra,
    ]
    timer = StepTimer(run.device)
    cli = LifelongCLI(args=args, run=False)
    cli.trainer.callbacks.append(timer.callback)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not timer.times:
        raise RuntimeError("the fit ran no training step")
    timed = timer.times[1:] or timer.times
    step_s = sum(timed) / len(timed)
    name = "ViT-B/16" if preset == "base" else "tiny ViT"
    size = cli.model.backbone.sources[0].image_size
    return {
        "shapes": f"lifelong fit, 2 x {name} at {size}x{size} (8x8 digits upsampled), batch {batch} + {batch} replayed",
        "batch": batch,
        "step_s": step_s,
        "warmup_s": timer.times[0],
        "samples_per_s": batch / step_s,
        "loss": timer.losses[-1],
        "losses": timer.losses,
        "loss_finite": all(math.isfinite(v) for v in timer.losses),
        "fit_s": time.perf_counter() - start,
        "strategy": type(cli.trainer.strategy).__name__,
    }


def zero2_row(run: Run) -> dict[str, Any]:
    reasons = []
    if run.device.type != "cuda":
        reasons.append("no CUDA device")
    if importlib.util.find_spec("deepspeed") is None:
        reasons.append("the deepspeed package is not installed (pip install -e .[deepspeed])")
    if reasons:
        return {"status": "skipped", "error": "; ".join(reasons)}
    return fit_row("configs/trainer/deepspeed_zero2.yaml", run, ("--trainer.devices=1",))


# -- the check -------------------------------------------------------------------------------------
CASES: dict[str, tuple[str, str, Callable[[Run], Case]]] = {
    "lmsrr": ("classification", "LMSRR", lmsrr_case),
    "r2moe": ("text-to-image", "R2MoE", r2moe_case),
    "rid": ("text-to-image", "RID", rid_case),
    "rorem": ("object removal", "RORem", rorem_case),
    "discriminator": ("object removal", "RORem discriminator", discriminator_case),
    "dmpel": ("robot", "DMPEL", dmpel_case),
}


def check_family(key: str, run: Run) -> dict[str, Any]:
    """One row; a failure is caught and recorded with its one-line error."""
    row: dict[str, Any] = {"key": key}
    if key == "zero2":
        row |= {"family": "classification", "method": "LMSRR, DeepSpeed ZeRO-2"}
    else:
        row |= {"family": CASES[key][0], "method": CASES[key][1]}
    start = time.perf_counter()
    case = None
    try:
        with peak_memory(run.device) as memory:
            if key == "zero2":
                row |= zero2_row(run)
            else:
                case = CASES[key][2](run)
                row |= {"shapes": case.shapes, "batch": case.batch_size}
                row["build_s"] = time.perf_counter() - start
                row |= train_steps(case, run)
        row.setdefault("status", "ok" if row.get("loss_finite") else "failed")
        if row["status"] == "failed" and "error" not in row:
            row["error"] = f"loss not finite: {row.get('losses')}"
        if row["status"] != "skipped":
            row |= memory
    except Exception as err:  # every failure becomes a row
        row |= {"status": "failed", "error": first_line(err)}
    finally:
        del case
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = time.perf_counter() - start
    return row


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    mode = "tiny shapes" if result["tiny"] else "paper shapes"
    title = f"GPU readiness check, {mode}, {result['device_name']}, {result['precision']}, {result['steps']} steps"
    table = Table(title=title)
    for name, justify in [
        ("family", "left"),
        ("method", "left"),
        ("shapes", "left"),
        ("step (s)", "right"),
        ("samples/s", "right"),
        ("peak mem (GiB)", "right"),
        ("loss finite", "center"),
        ("status", "left"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")
    for row in result["rows"]:
        ok = row["status"] == "ok"
        table.add_row(
            row["family"],
            row["method"],
            row.get("shapes", "-"),
            f"{row['step_s']:.3f}" if "step_s" in row else "-",
            f"{row['samples_per_s']:.1f}" if "samples_per_s" in row else "-",
            f"{row['peak_memory_gib']:.2f}" if "peak_memory_gib" in row else "-",
            ("yes" if row["loss_finite"] else "NO") if "loss_finite" in row else "-",
            escape(row["status"] if ok else f"{row['status']}: {row.get('error', '')}"),
        )
    Console(width=200).print(table)
    memory = "torch.cuda.max_memory_allocated" if result["device"] == "cuda" else "peak RSS of the process"
    print(f"peak memory: {memory}; wall time {result['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes, the same code (a CPU run)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps after a warm-up (3; tiny 2)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--batch", type=int, default=None, help="override every family's batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=["bf16", "32"], default=None, help="autocast dtype (bf16 on CUDA, 32 on a CPU)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/gpu_check.json"))
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    precision = opts.precision or ("bf16" if device.type == "cuda" else "32")
    steps = opts.steps if opts.steps is not None else (2 if opts.tiny else 3)
    if steps < 1 or (opts.batch is not None and opts.batch < 1):
        parser.error("--steps and --batch must be at least 1")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the CLIP towers load from a CLIPModel folder: a report of unused keys
    hf_logging.disable_progress_bar()
    if opts.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose much on a busy CPU
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # training_step outside a Trainer
        run = Run(device, torch.bfloat16 if precision == "bf16" else None, steps, opts.tiny, tmp, opts.batch)
        for key in FAMILIES:
            if key in opts.families:
                rows.append(check_family(key, run))
                print(f"{key}: {rows[-1]['status']} ({rows[-1]['wall_s']:.1f} s)", flush=True)
    result = {
        "tiny": opts.tiny,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": precision,
        "steps": steps,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    print_table(result)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    failed = [r["key"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
