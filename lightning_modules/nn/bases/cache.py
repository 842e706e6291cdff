"""Where the small pretrained bases live and how they are built: a cache folder (`LIFELONG_CACHE`, else
`$XDG_CACHE_HOME/lifelong`, else `~/.cache/lifelong`) holding one complete folder per model:

    <cache>/bases-v3-seed0/digit-classifier/   config.json + model.safetensors (huggingface_hub)
    <cache>/bases-v3-seed0/clip/               a transformers CLIPModel folder with its tokenizer
    <cache>/bases-v3-seed0/text-to-image/      a diffusers StableDiffusionPipeline folder
    <cache>/bases-v3-seed0/inpainting/         a diffusers StableDiffusionXLInpaintPipeline folder

A model is built into a temporary folder beside its final place and renamed there when complete (with
`lifelong_base.json` written last inside it), so a half-built model never counts as built; a lock on the
folder (`cli.files.folder_lock`) makes concurrent processes (DDP ranks, two jobs) wait for one builder.
The preset name `tiny-pretrained` (`pretrained_model_name_or_path`, `clip_model`) builds on first use and
reuses the cache afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cli.errors import ConfigError
from cli.files import folder_lock

PRESET = "tiny-pretrained"
VERSION = 3  # the recipe's version: a changed recipe builds into a new folder, never over an old build
MODELS = ("digit-classifier", "clip", "text-to-image", "inpainting")
MARKER = "lifelong_base.json"
#: what each model needs built first (the text towers and the VAE are reused, not trained twice)
NEEDS = {"digit-classifier": (), "clip": (), "text-to-image": ("clip",), "inpainting": ("clip", "text-to-image")}


def cache_root() -> Path:
    """`LIFELONG_CACHE`, else `$XDG_CACHE_HOME/lifelong`, else `~/.cache/lifelong`."""
    if os.environ.get("LIFELONG_CACHE"):
        return Path(os.environ["LIFELONG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lifelong"


def bases_dir(root: str | os.PathLike | None = None, seed: int = 0, scale: float = 1.0) -> Path:
    """The folder of one build: recipe version, seed and (if not 1) the step scale in its name."""
    name = f"bases-v{VERSION}-seed{seed}" + ("" if scale == 1.0 else f"-scale{scale:g}")
    return Path(root if root is not None else cache_root()) / name


def model_dir(name: str, root: str | os.PathLike | None = None, seed: int = 0, scale: float = 1.0) -> Path:
    if name not in MODELS:
        raise ConfigError(f"{name!r} is not one of the pretrained bases ({', '.join(MODELS)})")
    return bases_dir(root, seed, scale) / name


def is_built(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def _where(root: str | os.PathLike | None) -> str:
    return "LIFELONG_CACHE" if root is None and os.environ.get("LIFELONG_CACHE") else "the cache folder"


def _writable_folder(folder: Path, root: str | os.PathLike | None) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{_where(root)}: {folder} is not writable ({e.strerror or type(e).__name__}); set LIFELONG_CACHE "
            f"to a writable folder (or pass --cache) and run again"
        ) from e


def ensure(
    name: str,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """The folder of base `name`, built first (with what it needs) if the cache does not hold it."""
    path = model_dir(name, root, seed, scale)
    if is_built(path):
        return path
    build_bases([name], root=root, seed=seed, scale=scale, progress=progress, log=log)
    return path


def build_bases(
    names: list[str] | tuple[str, ...] = MODELS,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, dict]:
    """Builds the missing ones of `names` (and what they need) into the cache; returns, per model built
    or found, {"path", "seconds" (None if it was there), "parameters"}. A rich progress bar per model.
    `scale` multiplies every training phase's steps (below 1: a quick, poor build for trying things; it
    goes to its own folder, which the presets never read)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lightning_modules.nn.bases.build import Recipe

    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ConfigError(f"--models: {unknown} are not pretrained bases; choose from {', '.join(MODELS)}")
    if not 0 < scale <= 1:
        raise ConfigError(f"--scale: {scale} must be in (0, 1]")
    order = [m for m in MODELS if m in _with_needs(names)]
    recipe = Recipe() if scale == 1.0 else Recipe().scaled(scale)
    folder = bases_dir(root, seed, scale)
    report: dict[str, dict] = {}
    for name in order:  # what the cache holds must still load; nothing is written before this is known
        if is_built(folder / name):
            checked(folder / name, _LOADERS[name])
            report[name] = {"path": str(folder / name), "seconds": None, **_read_marker(folder / name)}
    if len(report) == len(order):
        return report
    _writable_folder(folder, root)
    columns = (TextColumn("{task.description:<17}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with folder_lock(folder), Progress(*columns, disable=not progress, transient=False) as bar:
        for name in order:
            final = folder / name
            if is_built(final):  # found above, or built by another process while this one waited
                report.setdefault(name, {"path": str(final), "seconds": None, **_read_marker(final)})
                continue
            row = bar.add_task(name, total=None)

            def advance(done: int, total: int, row=row) -> None:
                bar.update(row, completed=done, total=total)

            start = time.perf_counter()
            tmp = folder / f".{name}.building-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            parameters = _BUILDERS[name](tmp, folder, recipe, seed, advance)
            seconds = time.perf_counter() - start
            info = {"model": name, "seed": seed, "version": VERSION, "recipe": asdict(recipe), "seconds": seconds}
            info["parameters"] = parameters
            (tmp / MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
            if final.exists():  # an incomplete or foreign folder in the way: it never counted as built
                shutil.rmtree(final)
            os.replace(tmp, final)
            report[name] = {"path": str(final), "seconds": seconds, "parameters": parameters}
            if log is not None:
                log(f"{final}: built in {seconds:.0f} s ({sum(parameters.values()) / 1e6:.2f} M parameters)")
    return report


def _with_needs(names) -> set[str]:
    out: set[str] = set()
    for n in names:
        out |= {n} | _with_needs(NEEDS[n])
    return out


def _read_marker(path: Path) -> dict:
    try:
        return {"parameters": json.loads((path / MARKER).read_text(encoding="utf-8")).get("parameters", {})}
    except (OSError, ValueError):
        return {"parameters": {}}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- builders: each writes a complete folder at `tmp` and returns its parameter counts --------------------


def _build_classifier(tmp: Path, folder: Path, recipe, seed: int, progress) -> dict[str, int]:
    from lightning_modules.nn.bases.build import train_classifier

    model = train_classifier(recipe, seed, progress)
    model.save_pretrained(tmp)
    return {"classifier": _count(model)}


def _build_clip(tmp: Path, folder: Path, recipe, seed: int, progress) -> dict[str, int]:
    from lightning_modules.nn.bases.build import train_clip

    model, tokenizer = train_clip(recipe, seed, progress)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"clip": _count(model)}


def _build_text_to_image(tmp: Path, folder: Path, recipe, seed: int, progress) -> dict[str, int]:
    from lightning_modules.nn.bases.build import text_encoder_from_clip, train_text_to_image, train_vae
    from lightning_modules.nn.diffusion.components import write_model_index

    clip, tokenizer = load_clip_folder(folder / "clip")
    text_encoder = text_encoder_from_clip(clip)
    total = recipe.vae_steps + recipe.unet_steps
    vae = train_vae(recipe, seed, lambda d, t: progress(d, total))
    unet, scheduler = train_text_to_image(
        recipe, vae, text_encoder, tokenizer, seed, lambda d, t: progress(recipe.vae_steps + d, total)
    )
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    for sub, part in parts.items():
        part.save_pretrained(tmp / sub)
    write_model_index(tmp, "StableDiffusionPipeline", parts)
    return {"unet": _count(unet), "vae": _count(vae), "text_encoder": _count(text_encoder)}


def _build_inpainting(tmp: Path, folder: Path, recipe, seed: int, progress) -> dict[str, int]:
    from diffusers import AutoencoderKL

    from lightning_modules.nn.bases.build import text_encoder_from_clip, train_inpainting
    from lightning_modules.nn.diffusion.components import write_model_index

    clip, tokenizer = load_clip_folder(folder / "clip")
    text_encoder = text_encoder_from_clip(clip)
    text_encoder_2 = text_encoder_from_clip(clip, with_projection=True)
    vae = AutoencoderKL.from_pretrained(folder / "text-to-image" / "vae", local_files_only=True)
    vae.eval().requires_grad_(False)
    unet, scheduler = train_inpainting(recipe, vae, text_encoder, text_encoder_2, tokenizer, seed, progress)
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
    }
    for sub, part in parts.items():
        part.save_pretrained(tmp / sub)
    write_model_index(
        tmp,
        "StableDiffusionXLInpaintPipeline",
        parts,
        extra={"requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True},
    )
    return {"unet": _count(unet), "vae": 0, "text_encoders": _count(text_encoder) + _count(text_encoder_2)}


_BUILDERS = {
    "digit-classifier": _build_classifier,
    "clip": _build_clip,
    "text-to-image": _build_text_to_image,
    "inpainting": _build_inpainting,
}


# -- loading ---------------------------------------------------------------------------------------------


def _corrupt(path: Path, err: BaseException) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"{path}: the cached pretrained base does not load ({first[:200]}); delete that folder and run "
        f"`lifelong pretrain-bases` to build it again"
    )


def load_clip_folder(path: Path):
    """(CLIPModel, CLIPTokenizer) of a built `clip` folder; a broken folder is one line naming it."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        return (
            CLIPModel.from_pretrained(path, local_files_only=True).eval(),
            CLIPTokenizer.from_pretrained(path, local_files_only=True),
        )
    except Exception as e:  # noqa: BLE001 -- any failure to read the cached files means the same thing
        raise _corrupt(path, e) from e


def checked(path: Path, load: Callable[[Path], object]):
    """`load(path)`, with any failure to read a cached base turned into one line naming it."""
    if not is_built(path):
        raise ConfigError(f"{path}: not a complete pretrained base (no {MARKER}); run `lifelong pretrain-bases`")
    try:
        return load(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _corrupt(path, e) from e


def _load_pipeline(kind: str):
    def load(path: Path):
        import diffusers

        return getattr(diffusers, kind).from_pretrained(str(path), local_files_only=True)

    return load


def _load_classifier(path: Path):
    from lightning_modules.nn.bases.classifier import DigitClassifier

    return DigitClassifier.from_pretrained(path, local_files_only=True).eval()


_LOADERS = {
    "digit-classifier": _load_classifier,
    "clip": load_clip_folder,
    "text-to-image": _load_pipeline("StableDiffusionPipeline"),
    "inpainting": _load_pipeline("StableDiffusionXLInpaintPipeline"),
}


def load_digit_classifier(source: str = PRESET, root: str | os.PathLike | None = None):
    """The digit classifier: the `tiny-pretrained` preset (built on first use) or a folder it was saved to."""
    path = ensure("digit-classifier", root) if source == PRESET else Path(source)
    return checked(path, _load_classifier)
