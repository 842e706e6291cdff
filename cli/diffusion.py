"""The text-to-image subcommands, each driven by the experiment's YAML (model and data as for `fit`):

    lifelong sample   -c CONFIG (--ckpt_path CKPT | --delta DELTA) --prompt "a {} on a beach" --concept cat --out DIR
    lifelong export   -c CONFIG --ckpt_path CKPT --out delta.safetensors
    lifelong export   -c CONFIG --ckpt_path CKPT --format diffusers --out FOLDER   (a stock diffusers pipeline loads it)
    lifelong make-reg -c CONFIG [--num_images 25]

`sample` also composes several concepts: `--concept cat --concept cup --mask cat.png --mask cup.png
--prompt "..." --prompt "..." --background "..."` (one region prompt and one mask file per concept).
Every file is written to a temporary name and renamed when complete (`cli.files`); `export --out` must be a
new file or a regular file to replace, never a folder or a device (with `--format diffusers`: a folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse.typing import PositiveInt

from cli.errors import ConfigError, fail, parse_args
from cli.files import atomic_write, atomic_write_text, check_output_file, check_output_folder, load_torch_file


def _parser(prog: str, description: str):
    from cli.main import config_parser

    return config_parser(prog, description)


def build(
    configs: list[str], extra: list[str] = (), family: type | None = None, what: str = "a text-to-image method"
) -> tuple[Any, Any, dict[str, Any]]:
    """`cli.main.build_model` for this family: the model must be a `family` (default: `TextToImageModule`)."""
    from cli.main import build_model

    if family is None:
        from lightning_modules.diffusion.base import TextToImageModule as family
    return build_model(configs, extra, family, what)


#: the settings a concept checkpoint is checked against before loading: its method and its base model
WEIGHT_SETTINGS = ("model.class_path", "model.init_args.pretrained_model_name_or_path")


def load_weights(model, ckpt_path: str | None, delta: str | None, settings: dict[str, Any] | None = None) -> None:
    """Loads a fit checkpoint (`last.ckpt`) or an exported delta into a freshly built model. A checkpoint must
    have been trained with `settings` (those that shape the weights) and a delta exported by the same method;
    otherwise one line names the file and what differs."""
    if (ckpt_path is None) == (delta is None):
        raise ConfigError("pass exactly one of --ckpt_path (a fit checkpoint) or --delta (an exported .safetensors)")
    if delta is not None:
        if not os.path.isfile(delta):
            raise ConfigError(f"--delta {delta}: not found (or not a file); pass an exported .safetensors")
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(delta)
            with safe_open(delta, "pt") as f:
                method = (f.metadata() or {}).get("method")
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ConfigError(f"--delta {delta}: not a safetensors file ({err})") from None
        if method is not None and method != type(model).__name__:
            raise ConfigError(
                f"--delta {delta}: exported by {method}, but the config's method is {type(model).__name__}"
            )
        with _naming("--delta", delta):
            model.load_delta(state)
        return
    checkpoint = load_torch_file(ckpt_path, "--ckpt_path")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "continual" not in checkpoint:
        raise ConfigError(f"--ckpt_path {ckpt_path}: not a checkpoint written by lifelong fit")
    saved = (checkpoint.get("lifelong") or {}).get("settings") or {}
    for key in WEIGHT_SETTINGS:  # other differences (a LoRA rank, say) surface as tensors that do not fit
        if settings is not None and key in saved and saved[key] != settings.get(key):
            raise ConfigError(
                f"--ckpt_path {ckpt_path} was trained with other settings: {key} (checkpoint {saved[key]!r}, "
                f"config {settings.get(key)!r}); use the config it was trained with"
            )
    with _naming("--ckpt_path", ckpt_path):
        model.on_load_checkpoint(checkpoint)
        model.load_delta(checkpoint["state_dict"])


@contextmanager
def _naming(option: str, path: str) -> Iterator[None]:
    """Prefixes a ConfigError raised inside with the option and file it is about."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{option} {path}: {err}") from None


def _concept_index(datamodule, concept: str) -> int:
    names = list(datamodule.task_names)
    if concept in names:
        return names.index(concept)
    if concept.isdigit() and int(concept) < len(names):
        return int(concept)
    raise ConfigError(f"--concept {concept!r} is not one of {names}")


def _save_png(image: torch.Tensor, path: Path, option: str) -> None:
    """Writes `image` ([3, H, W] in [0, 1]) as a PNG, through a temporary file renamed when complete."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), option)


def sample(argv: list[str]) -> None:
    """`lifelong sample`: images for prompts, routed to a concept (or composed from several), as PNGs."""
    parser = _parser("lifelong sample", "Sample images from a trained text-to-image model (concepts or rewards).")
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser.add_argument("--delta", type=str | None, default=None)
    parser.add_argument("--prompt", action="append", required=True, help='"{}" becomes "<token> <class>"')
    parser.add_argument("--concept", action="append", default=[], help="concept name or index (repeat to compose)")
    parser.add_argument(
        "--gate_prompt", type=str | None, default=None, help="route by this text instead of data.inference_gate's"
    )
    parser.add_argument("--mask", action="append", default=[], help="one mask image per concept (composition)")
    parser.add_argument("--background", type=str, default="", help="background prompt (composition)")
    parser.add_argument("--out", type=str, required=True, help="folder the PNGs go to")
    parser.add_argument("--num_images", type=PositiveInt, default=4)
    parser.add_argument("--steps", type=PositiveInt, default=50)
    parser.add_argument("--guidance_scale", type=float, default=6.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    try:
        cfg = parse_args(parser, argv)
        out = check_output_folder(cfg.out, "--out")
        model, datamodule, settings = build(cfg.config, cfg.set)
        load_weights(model, cfg.ckpt_path, cfg.delta, settings)
        model.eval()
        stream = model.stream
        from lightning_modules.diffusion.base import ConceptDiffusionModule

        if (cfg.concept or cfg.mask) and not isinstance(model, ConceptDiffusionModule):
            raise ConfigError(f"--concept / --mask: {type(model).__name__} learns no concepts; leave them off")
        indices = [_concept_index(datamodule, c) for c in cfg.concept]
        settings = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta)
        if cfg.mask:
            images = _compose(model, stream, indices, cfg, settings)
            names = [f"composition_{i:02d}.png" for i in range(len(images))]
        else:
            if len(indices) > 1:
                raise ConfigError("--concept given twice without --mask: composing concepts needs one mask each")
            k = indices[0] if indices else None
            fill = f"{stream.tokens[k]} {stream.classes[k]}" if k is not None else ""
            gate = cfg.gate_prompt or (stream.inference_gate_prompts[k] if k is not None else None)
            images, names = [], []
            for p, prompt in enumerate(cfg.prompt):
                text = prompt.replace("{}", fill)
                gates = [gate] * cfg.num_images if gate else None
                images.append(model.generate([text] * cfg.num_images, gates, seed=cfg.seed + p, **settings))
                names += [f"prompt{p:02d}_{i:02d}.png" for i in range(cfg.num_images)]
            images = torch.cat(images)
        for image, name in zip(images, names, strict=True):
            _save_png(image, out / name, "--out")
    except ConfigError as err:
        fail(str(err))
    print(f"wrote {len(names)} images to {out}")


def _compose(model, stream, indices: list[int], cfg, settings: dict) -> torch.Tensor:
    from lightning_modules.nn.diffusion.composition import read_masks

    if len(cfg.mask) != len(indices) or len(cfg.prompt) != len(indices):
        raise ConfigError("composition: give one --concept, one --mask and one --prompt per concept, in the same order")
    latent = stream.resolution // model.parts.vae_scale_factor
    masks = read_masks(cfg.mask, latent)
    regions = [cfg.prompt[i].replace("{}", f"{stream.tokens[k]} {stream.classes[k]}") for i, k in enumerate(indices)]
    gates = [stream.inference_gate_prompts[k] for k in indices]  # data.inference_gate
    return model.compose(regions, gates, masks, cfg.background, cfg.num_images, seed=cfg.seed, **settings)


def write_export(model, out: str, dtype: str = "float32", option: str = "--out") -> dict[str, torch.Tensor]:
    """Writes `model.export_state_dict` (floating tensors as `dtype`) to the safetensors file `out`, with the
    method, its `export_metadata` (concepts and tokens, or rewards) and base model as metadata; returns the
    tensors written."""
    from safetensors.torch import save_file

    delta = model.export_state_dict(getattr(torch, dtype))
    metadata = {
        "method": type(model).__name__,
        **model.export_metadata(),
        "base": str(model.hparams.pretrained_model_name_or_path),
        "dtype": dtype,
    }
    atomic_write(out, lambda tmp: save_file(delta, tmp, metadata=metadata), option)
    return delta


def write_diffusers_export(model, out: str, dtype: str = "float32", option: str = "--out") -> dict[str, Any]:
    """Writes `model.save_diffusers` (files a stock diffusers StableDiffusionPipeline loads) into the folder
    `out`, each file staged and then renamed into place, and `export.json` last (what each file is, how to load
    it); returns that manifest."""
    import shutil
    import tempfile

    from lightning_modules.nn.diffusion.diffusers_export import MANIFEST, loading_snippet

    folder = check_output_folder(out, option)
    with tempfile.TemporaryDirectory(prefix="lifelong-export-") as staging:
        manifest = model.save_diffusers(staging, getattr(torch, dtype))
        files = sorted(os.listdir(staging))
        for name in files:
            atomic_write(
                folder / name, lambda tmp, name=name: shutil.copyfile(os.path.join(staging, name), tmp), option
            )
    base = str(model.hparams.pretrained_model_name_or_path)
    manifest = {"format": "diffusers", "method": type(model).__name__, "base": base, "dtype": dtype, **manifest}
    manifest["files"] = files
    own = getattr(model, "loading_snippet", None)  # a family whose pipeline is not StableDiffusionPipeline
    manifest["load"] = own(manifest, str(folder)) if callable(own) else loading_snippet(manifest, str(folder))
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n", option)
    return manifest


def write_merged_unet(model, out: str, manifest: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """Writes `out`/unet (the UNet with its adapters folded in, staged and renamed into place) and adds it to
    the manifest in export.json; returns the manifest."""
    import shutil
    import tempfile

    from lightning_modules.nn.diffusion.diffusers_export import MANIFEST

    target = Path(out) / "unet"
    staging = Path(tempfile.mkdtemp(prefix=".unet-", dir=out))
    try:
        model.save_merged_unet(str(staging), getattr(torch, dtype))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {**manifest, "merged_unet": "unet", "files": sorted({*manifest["files"], "unet"})}
    atomic_write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=2) + "\n", "--out")
    return manifest


def export(argv: list[str]) -> None:
    """`lifelong export`: the method's delta (experts, routers, token rows, ...) as safetensors (`--format delta`),
    or a folder of files a stock diffusers pipeline loads (`--format diffusers`)."""
    parser = _parser("lifelong export", "Export what a concept model learned (its delta) to a safetensors file.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="the fit checkpoint (checkpoints/last.ckpt)")
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="delta: the .safetensors file (new, or one to replace); diffusers: a folder",
    )
    parser.add_argument(
        "--format",
        type=Literal["delta", "diffusers"],
        default="delta",
        help="delta: the suite's own file (`lifelong sample --delta`); diffusers: LoRA / K/V and token files a stock "
        "StableDiffusionPipeline loads, with export.json",
    )
    parser.add_argument(
        "--dtype", type=Literal["float32", "float16", "bfloat16"], default="float32", help="floating tensors' type"
    )
    parser.add_argument(
        "--merged_unet",
        type=bool,
        default=False,
        help="diffusers: also write unet/, the UNet with the adapters folded in (methods with save_merged_unet)",
    )
    try:
        cfg = parse_args(parser, argv)
        if cfg.format == "diffusers":
            check_output_folder(cfg.out, "--out")  # before the model is built
        else:
            check_output_file(cfg.out, "--out")
        if cfg.merged_unet and cfg.format != "diffusers":
            raise ConfigError("--merged_unet writes a diffusers UNet folder: add --format diffusers, or leave it off")
        from lightning_modules.diffusion.base import TextToImageModule
        from lightning_modules.removal.stages import RemovalStages

        families = (TextToImageModule, RemovalStages)
        model, _, settings = build(cfg.config, cfg.set, families, "a text-to-image method or a removal-stages one")
        if cfg.merged_unet and not callable(getattr(model, "save_merged_unet", None)):
            raise ConfigError(f"--merged_unet: {type(model).__name__} has no merged UNet to write; leave it off")
        load_weights(model, cfg.ckpt_path, None, settings)
        if cfg.format == "diffusers":
            manifest = write_diffusers_export(model, cfg.out, cfg.dtype)
            if cfg.merged_unet:
                manifest = write_merged_unet(model, cfg.out, manifest, cfg.dtype)
        else:
            delta = write_export(model, cfg.out, cfg.dtype)
    except ConfigError as err:
        fail(str(err))
    if cfg.format == "diffusers":
        print(f"wrote {cfg.out}: {', '.join(manifest['files'])} and export.json (how to load them)")
        return
    params = sum(v.numel() for v in delta.values())
    print(f"wrote {cfg.out}: {len(delta)} tensors, {params:,} values, {os.path.getsize(cfg.out):,} bytes")


def make_reg(argv: list[str]) -> None:
    """`lifelong make-reg`: regularisation images of every concept's class, from the base model
    ("<token> <class>" with the untrained token, 50 DDIM steps, eta 1, CFG 6, as the released script)."""
    parser = _parser("lifelong make-reg", "Generate regularisation images with the base model.")
    parser.add_argument("--num_images", type=PositiveInt, default=25)
    parser.add_argument("--batch_size", type=PositiveInt, default=4)
    parser.add_argument("--steps", type=PositiveInt, default=50)
    parser.add_argument("--guidance_scale", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    try:
        cfg = parse_args(parser, argv)
        model, datamodule, _ = build(cfg.config, [*cfg.set, "--data.init_args.prior_preservation", "false"])
    except ConfigError as err:
        fail(str(err))
    if datamodule.root is None:
        fail("data.root is not set: make-reg writes next to a concepts folder (the embedded concepts ship theirs)")
    model.eval()
    stream = model.stream
    folders = datamodule.regularisation_folders()
    try:
        for cls, folder in folders.items():
            k = stream.classes.index(cls)  # the first concept of the class: its untrained token
            check_output_folder(folder, "data.reg_root").mkdir(parents=True, exist_ok=True)
            start = len(list(folder.glob("*.png")))
            prompt = f"{stream.tokens[k]} {cls}"
            for first in range(start, cfg.num_images, cfg.batch_size):
                n = min(cfg.batch_size, cfg.num_images - first)
                images = model.generate(
                    [prompt] * n,
                    None,
                    seed=cfg.seed + first,
                    num_inference_steps=cfg.steps,
                    guidance_scale=cfg.guidance_scale,
                    eta=1.0,
                )
                for i, image in enumerate(images):
                    _save_png(image, folder / f"{first + i:04d}.png", "data.reg_root")
            print(f"{folder}: {max(cfg.num_images, start)} images of '{cls}'")
    except ConfigError as err:
        fail(str(err))
