"""`RemovalDataModule`: object-removal data for RORem, one task per round of its data engine (spec 1.1, 1.7).

    data:
      class_path: datamodules.RemovalDataModule
      init_args:
        rounds:
          - name: initialization
            train: [embedded:digits-on-photos]   # triplets with GT (meta.json paths, .tar shards or embedded:<domain>)
            eval: [embedded:digits-on-photos]    # held-out triplets this round is evaluated on
          - name: round-1
            inputs: [embedded:patches-on-photos] # new inputs the engine removes objects on at the END of this round
            eval: [embedded:patches-on-photos]
        resolution: 32
        counts: {train: 256, inputs: 64, eval: 32}   # sizes of each embedded source

A source is one of:
- `embedded:<domain>`: a set built from the small world (`datamodules.small_world`), no files needed;
  `digits-on-photos` (a coloured handwritten digit on a photo crop), `patches-on-photos` (an ellipse cut
  from another photo), and their `-judged` variants (labelled removals for the discriminator);
- a RORem `meta.json` (or the folder holding it): a JSON array of {"source", "mask", "GT"[, "score"]}
  objects, paths relative to the file's folder; for discriminator data GT is the removal being judged and
  `score` its label (read with float(), soft labels allowed);
- preference pairs for Diffusion-DPO: a meta.json whose objects are {"source", "mask", "preferred", "rejected"}
  (items then carry `rejected`; `target` is the preferred removal);
- a `.tar` webdataset shard pattern (brace notation allowed, relative to the current folder) whose samples
  hold `<key>.source.png`, `<key>.mask.png`, `<key>.gt.png` (png or jpg) and optionally `<key>.score.txt`.

Only the `inputs` slot accepts entries without GT (the data engine's new inputs); their target is a copy of
the source and `has_target` False. Items and batches are dicts {source 3xRxR in [-1, 1], mask 1xRxR in
[0, 1], target 3xRxR in [-1, 1], score (nan when none), has_target, index}. Pre-processing is RORem's
(spec 1.2): each image resized directly to R x R (PIL bicubic, non-square images squashed), the mask
channel 0 / 255 kept soft unless `binarize_mask`, and a joint random horizontal flip of training batches.
`lifelong check-data META ...` lists every problem of a meta.json at once.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules import small_world as world
from datamodules.base import ContinualDataModule, TaskStream

#: the PSNR inside the mask (dB, images in [0, 1]) from which the ground-truth stand-in for a human judgement
#: calls a removal good. A documented choice, not RORem's (its annotators judged by eye): 20 dB is an RMS error
#: of 0.1 inside the mask, which on the embedded set separates a plausible fill from a visibly wrong one.
HUMAN_THRESHOLD_DB = 20.0
META_KEYS = ("source", "mask", "GT")
ROUND_KEYS = ("name", "train", "inputs", "eval")
SLOTS = ("train", "inputs", "eval")
EMBEDDED = "embedded:"
JUDGED = "-judged"
BASE_DOMAINS = ("digits-on-photos", "patches-on-photos")
DOMAINS = BASE_DOMAINS + tuple(d + JUDGED for d in BASE_DOMAINS)
DEFAULT_COUNTS = {"train": 256, "inputs": 64, "eval": 32}
SHARD_IMAGES = ("png", "jpg", "jpeg")
#: the batch fields the joint flip mirrors
FLIPPED = ("source", "mask", "target", "rejected")


# -- the ground-truth judge ------------------------------------------------------------------------------
def psnr_inside(result: Tensor, gt: Tensor, mask: Tensor) -> Tensor:
    """Per-sample PSNR (dB) of `result` against `gt` over the pixels where mask >= 0.5 (all channels): images in
    [-1, 1] mapped to [0, 1] (and clipped there), PSNR = 10 log10(1 / MSE), inf where they agree exactly or the
    mask is empty. B x C x H x W images with a B x 1 x H x W mask give B values; one C x H x W image a scalar."""
    single = result.dim() == 3
    if single:
        result, gt, mask = result[None], gt[None], mask[None]
    r = ((result.float() + 1) / 2).clamp(0, 1)
    g = ((gt.float().to(r.device) + 1) / 2).clamp(0, 1)
    hard = torch.broadcast_to((mask.to(r.device) >= 0.5).float(), r.shape)
    mse = (((r - g) ** 2) * hard).flatten(1).sum(1) / hard.flatten(1).sum(1).clamp(min=1)
    psnr = 10 * torch.log10(1 / mse)
    return psnr[0] if single else psnr


def human_label(result: Tensor, gt: Tensor, mask: Tensor, threshold_db: float = HUMAN_THRESHOLD_DB) -> Tensor:
    """The ground-truth stand-in for a human judgement, per sample: 1.0 where the PSNR inside the mask
    (`psnr_inside`) is at least `threshold_db`, else 0.0."""
    return (psnr_inside(result, gt, mask) >= threshold_db).float()


# -- pre-processing (spec 1.2) ---------------------------------------------------------------------------
def load_rgb(data: Path | bytes):
    """A file or encoded bytes as an RGB PIL image (loaded, the file closed)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return im.convert("RGB")


def _resized(image, resolution: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC), np.uint8)


def preprocess_image(image, resolution: int) -> Tensor:
    """RORem's image pre-processing: RGB, resized directly to resolution x resolution (PIL bicubic, no crop),
    scaled to [-1, 1]: 3 x R x R."""
    x = torch.from_numpy(_resized(image, resolution).copy()).permute(2, 0, 1).float() / 255
    return x * 2 - 1


def preprocess_mask(image, resolution: int, binarize: bool = False) -> Tensor:
    """RORem's mask pre-processing: RGB, resized like the images, channel 0 / 255 in [0, 1] (soft at the
    bicubic edges, as RORem trains): 1 x R x R. `binarize` thresholds it at 0.5 (the spec's advice for new code)."""
    m = torch.from_numpy(_resized(image, resolution)[..., 0].copy()).float()[None] / 255
    return (m >= 0.5).float() if binarize else m


def joint_flip(batch: dict[str, Tensor], p: float = 0.5) -> dict[str, Tensor]:
    """Mirrors each sample's source, mask and target (and a pair's rejected removal) together (left-right) with
    probability `p`, drawn by `torch.rand` on the batch's device (the global RNG, seeded per training step)."""
    source = batch["source"]
    flip = torch.rand(source.shape[0], device=source.device) < p
    out = dict(batch)
    for key in FLIPPED:
        if key not in batch:
            continue
        x = batch[key]
        out[key] = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    return out


def _resize_tensors(images: Tensor, resolution: int) -> Tensor:
    """N x C x H x W -> N x C x R x R (bicubic, antialiased), for the embedded sets at another resolution."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)


# -- meta.json (spec 1.1) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Triplet:
    """One meta.json entry, paths resolved against its folder: `target` is the GT (for discriminator data the
    removal being judged; None for an input without one), `score` the label (None when absent)."""

    source: Path
    mask: Path
    target: Path | None
    score: float | None = None
    rejected: Path | None = None  # preference pairs: the dispreferred removal (`target` is the preferred one)


def image_problem(data: Path | bytes) -> str | None:
    """Why PIL cannot read this image (opened, verified, then decoded in full), or None when it can."""
    from PIL import Image

    try:
        for check in ("verify", "load"):  # verify() leaves the image unusable: open it again to decode it
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                getattr(im, check)()
    except Exception as err:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, DecompressionBombError)
        text = " ".join(str(err).split())[:120]
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return None


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _scan_meta(path: str | Path, need_score: bool, allow_missing_gt: bool) -> tuple[list[Triplet], list[str]]:
    """(the entries that are fine, every problem found) of one meta.json."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [f"{p}: not found"]
    except IsADirectoryError:
        return [], [f"{p}: a folder; pass the meta.json inside it"]
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"{p}: cannot be read as UTF-8 text ({type(err).__name__})"]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg == "Extra data":
            hint = "; one object per line is JSON Lines: RORem reads a JSON array, wrap the entries in [ ] with commas"
        return [], [f"{p}: not JSON (line {err.lineno}, column {err.colno}: {err.msg}){hint}"]
    if not isinstance(entries, list):
        return [], [f"{p}: holds a JSON {_json_kind(entries)}, not an array of {{source, mask, GT}} objects"]
    if not entries:
        return [], [f"{p}: an empty array; list one {{source, mask, GT}} object per triplet"]
    root = p.parent
    triplets, problems = [], []
    for i, entry in enumerate(entries):
        where = f"{p}: entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: a JSON {_json_kind(entry)}, not an object with the keys source, mask, GT")
            continue
        files: dict[str, Path] = {}
        bad = False
        pair = "preferred" in entry or "rejected" in entry
        if pair:  # a preference pair (Diffusion-DPO): {source, mask, preferred, rejected}; preferred plays GT
            entry = {k: v for k, v in entry.items() if k != "GT"} | {"GT": entry.get("preferred")}
            if entry["GT"] is None:
                problems.append(f"{where}: a preference pair (it has 'rejected') without a 'preferred' key")
                continue
        for key in META_KEYS + (("rejected",) if pair else ()):
            if key not in entry:
                if not (key == "GT" and allow_missing_gt):
                    problems.append(f"{where}: no {key!r} key")
                    bad = True
                continue
            value = entry[key]
            if not isinstance(value, str) or not value:
                problems.append(f"{where}: {key} {value!r} is not a path (a string relative to the file's folder)")
                bad = True
                continue
            file = root / value
            if not file.is_file():
                problems.append(f"{where}: {key} {value!r} {'is not a file' if file.exists() else 'not found'}")
                bad = True
                continue
            reason = image_problem(file)
            if reason is not None:
                problems.append(f"{where}: {key} {value!r} is not an image PIL can read ({reason})")
                bad = True
                continue
            files[key] = file
        score = None
        if "score" in entry:
            try:
                score = float(entry["score"])
            except (TypeError, ValueError):
                problems.append(f"{where}: score {entry['score']!r} is not a number")
                bad = True
            else:
                if not math.isfinite(score):
                    problems.append(f"{where}: score {entry['score']!r} is not finite")
                    bad = True
        elif need_score:
            problems.append(f"{where}: no 'score' key (discriminator data labels every entry: 1 good, 0 failed)")
            bad = True
        if not bad:
            triplets.append(Triplet(files["source"], files["mask"], files.get("GT"), score, files.get("rejected")))
    return triplets, problems


def check_meta(path: str | Path, need_score: bool = False, allow_missing_gt: bool = False) -> list[str]:
    """Every problem of one meta.json, one line each naming the file and the entry: the file missing,
    unreadable, not JSON or not an array; an entry not an object, a key missing, a path missing, an image PIL
    cannot decode, a score that is not a finite number, and with `need_score` a missing score. [] when fine."""
    return _scan_meta(path, need_score, allow_missing_gt)[1]


def _problems_error(subject: str, problems: list[str], option: str | None, flags: str) -> ConfigError:
    first = problems[0].removeprefix(f"{subject}: ")
    where = f"{option}: " if option else ""
    return ConfigError(
        f"{where}{subject}: {len(problems)} problem(s), first: {first}; "
        f"run `lifelong check-data {subject}{flags}` to list them all"
    )


def _flags(need_score: bool, allow_missing_gt: bool) -> str:
    return (" --need_score" if need_score else "") + (" --inputs" if allow_missing_gt else "")


def read_meta(
    path: str | Path, need_score: bool = False, allow_missing_gt: bool = False, option: str | None = None
) -> list[Triplet]:
    """The triplets of one meta.json (paths relative to its folder). Any problem raises one ConfigError line
    (prefixed by `option` when given) that counts them, shows the first and points to `lifelong check-data`."""
    triplets, problems = _scan_meta(path, need_score, allow_missing_gt)
    if problems:
        raise _problems_error(str(Path(path)), problems, option, _flags(need_score, allow_missing_gt))
    return triplets


def read_metas(paths: Sequence[str | Path], need_score: bool = False, allow_missing_gt: bool = False) -> list[Triplet]:
    """The triplets of several meta.json files in order, each path's root its own folder."""
    return [t for p in paths for t in read_meta(p, need_score, allow_missing_gt)]


# -- webdataset shards -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSample:
    """One sample of a removal shard: its encoded images and label; `name` is `<shard>:<key>`."""

    source: bytes
    mask: bytes
    target: bytes | None
    score: float | None
    name: str


def check_shards(
    pattern: str, need_score: bool = False, allow_missing_gt: bool = False
) -> tuple[list[ShardSample], list[str]]:
    """(the samples that are fine, every problem) of the shards `pattern` (brace notation, relative to the
    current folder): a shard missing or truncated, a sample without one of its images, an image PIL cannot
    decode, a score that is not a finite number (or missing, with `need_score`)."""
    try:
        import webdataset as wds
    except ImportError:
        return [], [f"{pattern}: reading .tar shards needs webdataset: pip install -e '.[diffusion]'"]
    urls = list(wds.shardlists.expand_urls(pattern))
    problems: list[str] = []
    readable = []
    for url in urls:
        if not Path(url).is_file():
            problems.append(f"{url}: shard not found")
            continue
        try:  # webdataset stops quietly at a truncated shard; tarfile reads every header to the end
            with tarfile.open(url) as archive:
                archive.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            problems.append(f"{url}: not a complete tar shard ({err}); re-create it")
            continue
        readable.append(url)
    samples: list[ShardSample] = []
    if readable:
        try:
            for sample in wds.WebDataset(readable, shardshuffle=False, empty_check=False):
                sample_problems, found = _shard_sample(sample, need_score, allow_missing_gt)
                problems += sample_problems
                if found is not None:
                    samples.append(found)
        except (OSError, ValueError, tarfile.TarError) as err:
            problems.append(f"{pattern}: cannot read the shards ({err}); re-create them")
    if not samples and not problems:
        problems.append(f"{pattern}: the shards hold no samples")
    return samples, problems


def _shard_sample(sample: dict, need_score: bool, allow_missing_gt: bool) -> tuple[list[str], ShardSample | None]:
    where = f"{sample['__url__']}: sample {sample['__key__']!r}"
    fields = sorted(k for k in sample if not k.startswith("__"))
    problems, blobs = [], {}
    for part in ("source", "mask", "gt"):
        blob = next((sample[f"{part}.{ext}"] for ext in SHARD_IMAGES if f"{part}.{ext}" in sample), None)
        if blob is None:
            if not (part == "gt" and allow_missing_gt):
                problems.append(
                    f"{where}: no {part} image (it has {fields}); a sample holds <key>.source.png, <key>.mask.png, "
                    "<key>.gt.png (png or jpg) and optionally <key>.score.txt"
                )
            continue
        reason = image_problem(blob)
        if reason is not None:
            problems.append(f"{where}: its {part} image is not one PIL can read ({reason})")
            continue
        blobs[part] = blob
    score = None
    if "score.txt" in sample:
        text = sample["score.txt"].decode("utf-8", "replace").strip()
        try:
            score = float(text)
        except ValueError:
            problems.append(f"{where}: its score.txt {text[:40]!r} is not a number")
        else:
            if not math.isfinite(score):
                problems.append(f"{where}: its score.txt {text!r} is not finite")
    elif need_score:
        problems.append(f"{where}: no score.txt (discriminator data labels every sample: 1 good, 0 failed)")
    if problems:
        return problems, None
    name = f"{sample['__url__']}:{sample['__key__']}"
    return [], ShardSample(blobs["source"], blobs["mask"], blobs.get("gt"), score, name)


def read_shards(
    pattern: str, need_score: bool = False, allow_missing_gt: bool = False, option: str | None = None
) -> list[ShardSample]:
    """The samples of the shards `pattern`, decoded-checked into memory; any problem raises one ConfigError line."""
    samples, problems = check_shards(pattern, need_score, allow_missing_gt)
    if problems:
        raise _problems_error(pattern, problems, option, _flags(need_score, allow_missing_gt))
    return samples


def check_source(value: str, need_score: bool = False, allow_missing_gt: bool = False) -> tuple[int, list[str]]:
    """(entries, problems) of a meta.json, the folder holding one, or a `.tar` shard pattern (`lifelong check-data`)."""
    if value.endswith(".tar"):
        samples, problems = check_shards(value, need_score, allow_missing_gt)
        return len(samples), problems
    path = Path(value)
    triplets, problems = _scan_meta(path / "meta.json" if path.is_dir() else path, need_score, allow_missing_gt)
    return len(triplets), problems


# -- the embedded sets -----------------------------------------------------------------------------------
def _generator(base: str, split: str, seed: int) -> torch.Generator:
    """Its own seed stream per (domain, split, seed): evaluation crops differ from training ones."""
    code = BASE_DOMAINS.index(base) * 101 + (0 if split == "train" else 50_021)
    return torch.Generator().manual_seed((seed * 1_000_003 + code) % (2**63 - 1))


def _pick(n: int, g: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=g))


def _digit_triplet(split: str, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(source, mask, background) in [0, 1]: a digit's ink, 50-90% of the side, painted on a photo crop."""
    r = world.RESOLUTION
    names = list(world.PHOTOS)
    background = world.crop(world.photo(names[_pick(len(names), g)]), g)
    digits, _ = world.digits_split(split)
    ink = digits[_pick(len(digits), g)]
    side = round(r * (0.5 + 0.4 * torch.rand(1, generator=g).item()))
    small = F.interpolate(ink[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = _pick(r - side + 1, g), _pick(r - side + 1, g)
    a = torch.zeros(1, r, r)
    a[:, top : top + side, left : left + side] = small.clamp(0, 1)
    a = torch.where(a > 0.05, a, torch.zeros(()))  # faint ink is dropped, so the object lies inside its mask
    colours = list(world.COLOURS)
    colour = torch.tensor(world.COLOURS[colours[_pick(len(colours), g)]]).view(3, 1, 1)
    source = background * (1 - a) + colour * a
    mask = F.max_pool2d((a > 0).float()[None], 3, stride=1, padding=1)[0]  # dilated by one pixel
    return source, mask, background


def _patch_triplet(split: str, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(source, mask, background) in [0, 1]: an ellipse (30-70% of the side) cut from another photo's crop."""
    r = world.RESOLUTION
    names = list(world.PHOTOS)
    k = _pick(len(names), g)
    other = (k + 1 + _pick(len(names) - 1, g)) % len(names)
    background = world.crop(world.photo(names[k]), g)
    patch = world.crop(world.photo(names[other]), g)
    u = torch.rand(4, generator=g).tolist()
    w, h = r * (0.3 + 0.4 * u[0]), r * (0.3 + 0.4 * u[1])
    cx, cy = w / 2 + (r - w) * u[2], h / 2 + (r - h) * u[3]
    ys, xs = torch.meshgrid(torch.arange(r) + 0.5, torch.arange(r) + 0.5, indexing="ij")
    mask = ((((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2) <= 1).float()[None]
    return torch.where(mask > 0, patch, background), mask, background


def _judged(source: Tensor, mask: Tensor, gt: Tensor, g: torch.Generator, threshold_db: float) -> tuple[Tensor, Tensor]:
    """(removal results, 0/1 labels) in [-1, 1]: per triplet one of the GT, the source (object left), a
    mean-colour fill, a blend of GT and source with a random alpha, or the GT plus Gaussian noise (random
    std), each inside the mask; labelled by `human_label` (about half come out good)."""
    n = source.shape[0]
    kind = torch.randint(5, (n,), generator=g)
    alpha = torch.rand(n, generator=g).view(-1, 1, 1, 1)
    std = (0.02 + 0.38 * torch.rand(n, generator=g)).view(-1, 1, 1, 1)
    noise = torch.randn(source.shape, generator=g)
    outside = 1 - mask
    mean = (source * outside).sum((2, 3), keepdim=True) / outside.sum((2, 3), keepdim=True).clamp(min=1)
    candidates = torch.stack(
        [
            gt,
            source,
            mean.expand_as(source),
            alpha * gt + (1 - alpha) * source,
            (gt + std * noise).clamp(-1, 1),
        ]
    )  # 5 x N x 3 x R x R
    fill = candidates[kind, torch.arange(n)]
    result = torch.where(mask >= 0.5, fill, gt)
    return result, human_label(result, gt, mask, threshold_db)


def embedded_triplets(
    domain: str, split: Literal["train", "test"] = "train", count: int = 64, seed: int = 0
) -> dict[str, Tensor]:
    """`count` triplets of an embedded domain (see DOMAINS), the same for a (domain, split, seed): source,
    mask (the object's footprint, {0, 1}) and target (the background) stacked at 32 x 32, images in [-1, 1],
    and score (nan; for a `-judged` domain the target is a removal result to judge, `gt` the background and
    score its 0/1 `human_label`). The train split uses the train digits, `test` the held-out ones."""
    if domain not in DOMAINS:
        raise ConfigError(f"embedded domain {domain!r} does not exist; choose one of {', '.join(DOMAINS)}")
    if split not in ("train", "test"):
        raise ConfigError(f"embedded split {split!r} is not 'train' or 'test'")
    base = domain.removesuffix(JUDGED)
    g = _generator(base, split, seed)
    make = _digit_triplet if base == "digits-on-photos" else _patch_triplet
    parts = [make(split, g) for _ in range(count)]
    r = world.RESOLUTION
    if not parts:
        empty = torch.zeros(0, 3, r, r)
        return {"source": empty, "mask": torch.zeros(0, 1, r, r), "target": empty.clone(), "score": torch.zeros(0)}
    source, mask, target = (torch.stack([p[i] for p in parts]) for i in range(3))
    out = {"source": source * 2 - 1, "mask": mask, "target": target * 2 - 1, "score": torch.full((count,), math.nan)}
    if domain.endswith(JUDGED):
        g_judged = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        result, label = _judged(out["source"], mask, out["target"], g_judged, HUMAN_THRESHOLD_DB)
        out.update(gt=out["target"], target=result, score=label)
    return out


def write_embedded_removal(
    folder: str | Path,
    domain: str = "digits-on-photos",
    split: Literal["train", "test"] = "train",
    count: int = 16,
    seed: int = 0,
    with_score: bool = False,
) -> Path:
    """Writes an embedded set in RORem's layout (source/, mask/ (white = object), GT/ PNGs and meta.json, each
    file written atomically) and returns the meta.json path. With `with_score`, every entry gets its score
    (a `-judged` domain's label; 1.0 for a plain domain, whose GT is a perfect removal)."""
    from PIL import Image

    from cli.files import atomic_write, atomic_write_text, check_output_folder

    root = check_output_folder(folder, "folder")
    data = embedded_triplets(domain, split, count, seed)

    def save(array: np.ndarray, name: str) -> str:
        image = Image.fromarray(array)
        atomic_write(root / name, lambda tmp: image.save(tmp, format="PNG"), "folder")
        return name

    def as_uint8(x: Tensor) -> np.ndarray:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    entries = []
    for i in range(count):
        entry = {
            "source": save(as_uint8((data["source"][i] + 1) / 2).transpose(1, 2, 0), f"source/{i:05d}.png"),
            "mask": save(as_uint8(data["mask"][i, 0]), f"mask/{i:05d}.png"),
            "GT": save(as_uint8((data["target"][i] + 1) / 2).transpose(1, 2, 0), f"GT/{i:05d}.png"),
        }
        if with_score:
            score = float(data["score"][i])
            entry["score"] = 1.0 if math.isnan(score) else score
        entries.append(entry)
    meta = root / "meta.json"
    atomic_write_text(meta, json.dumps(entries, indent=1) + "\n", "folder")
    return meta


# -- datasets --------------------------------------------------------------------------------------------
class TripletTensors(Dataset):
    """Stacked triplets (an embedded set, accepted removals) as items; `has_target` defaults to all True."""

    def __init__(
        self,
        source: Tensor,
        mask: Tensor,
        target: Tensor,
        score: Tensor | None = None,
        has_target: Tensor | None = None,
    ):
        n = len(source)
        self.source, self.mask, self.target = source, mask, target
        self.score = torch.full((n,), math.nan) if score is None else score.float()
        self.has_target = torch.ones(n, dtype=torch.bool) if has_target is None else has_target.bool()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "source": self.source[i],
            "mask": self.mask[i],
            "target": self.target[i],
            "score": self.score[i],
            "has_target": self.has_target[i],
            "index": i,
        }


class EncodedTriplets(Dataset):
    """Triplets read from files (`Triplet`) or encoded bytes (`ShardSample`), pre-processed per item as RORem
    does (spec 1.2); without a target, the target is a copy of the source and `has_target` False."""

    def __init__(self, records: Sequence[Triplet | ShardSample], resolution: int, binarize_mask: bool = False):
        self.records = list(records)
        self.resolution = resolution
        self.binarize_mask = binarize_mask

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record, r = self.records[i], self.resolution
        source = preprocess_image(load_rgb(record.source), r)
        has_target = record.target is not None
        return {
            "source": source,
            "mask": preprocess_mask(load_rgb(record.mask), r, self.binarize_mask),
            "target": preprocess_image(load_rgb(record.target), r) if has_target else source.clone(),
            "score": torch.tensor(math.nan if record.score is None else record.score, dtype=torch.float32),
            "has_target": torch.tensor(has_target),
            "index": i,
        } | ({"rejected": preprocess_image(load_rgb(record.rejected), r)} if getattr(record, "rejected", None) else {})


class RoundDataset(Dataset):
    """Several sources as one set; an item's `index` is its position in the whole set (seeds, ordering)."""

    def __init__(self, parts: Sequence[Dataset]):
        self.parts = [p for p in parts if len(p)]  # type: ignore[arg-type]
        self.ends = np.cumsum([len(p) for p in self.parts]).tolist()  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a set of {len(self)}")
        k = bisect.bisect_right(self.ends, i)
        item = dict(self.parts[k][i - (self.ends[k - 1] if k else 0)])
        item["index"] = i
        return item


# -- the datamodule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemovalStream(TaskStream):
    """The object-removal stream a model is built from: the round names and the image side."""

    resolution: int = 32


@dataclass(frozen=True)
class _Source:
    kind: Literal["embedded", "meta", "shards"]
    value: str
    option: str


class RemovalDataModule(ContinualDataModule):
    """Tasks are data-engine rounds: round k trains on its own triplets plus the removals accepted at the end
    of round k-1 (`accept`), and is evaluated on its held-out triplets; `round_inputs(k)` are the new inputs
    the engine removes objects on at its end. Files are read (every image decoded once, as check-data does)
    at `setup` or the first dataset asked for.

    Args:
    rounds: the stream, one mapping per round with the keys name (default `round-<k>`), train, inputs and eval,
        each a source or a list of them (see the module docstring); every round needs eval data, the first
        train data (with `train_on: all`, some round).
    resolution: the side images are resized to (RORem: 512; the small world: 32).
    counts: the size of each embedded source per slot (train, inputs, eval).
    binarize_mask: threshold masks at 0.5 after resizing (the spec's advice for new code); False keeps RORem's
        soft bicubic-resized masks.
    random_flip: mirror training batches left-right, source, mask and target together (RORem's `--random_flip`).
    need_score: every train and eval entry must carry a score (discriminator data); embedded `-judged`
        domains have one.
    train_on: `seen` (default) retrains on every round's data so far, as RORem fine-tunes on the accumulated set.
    shared_eval: every round's embedded eval sources draw the first round's images (so a stream of methods,
        `RemovalStages`, compares its samplers on the same held-out items); False: each round its own.
    train_needs_target: False lets train entries lack GT, as inputs do (the online methods read only source and
        mask: DPO with online pairs, PPO); their target is a copy of the source.
    """

    def __init__(
        self,
        rounds: list[dict[str, Any]],
        resolution: int = 32,
        counts: dict[str, int] | None = None,
        binarize_mask: bool = False,
        random_flip: bool = True,
        need_score: bool = False,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        train_on: Literal["current", "seen", "all"] = "seen",
        shared_eval: bool = False,
        train_needs_target: bool = True,
        **kwargs: Any,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, train_on=train_on, **kwargs)
        if resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8, got {resolution}")
        self.resolution = resolution
        self.binarize_mask = binarize_mask
        self.random_flip = random_flip
        self.need_score = need_score
        self.shared_eval = shared_eval
        self.train_needs_target = train_needs_target
        self.counts = self._check_counts(counts)
        if not rounds:
            raise ConfigError("data.rounds is empty: list at least one round ({name, train, eval})")
        self._names: list[str] = []
        self._sources: list[dict[str, list[_Source]]] = []
        for k, spec in enumerate(rounds):
            self._add_round(k, spec)
        first = next((k for k, s in enumerate(self._sources) if s["train"]), None)
        if first is None:
            raise ConfigError(
                "data.rounds: no round has train data; give the first one train: [embedded:<domain> | ...]"
            )
        if first > 0 and train_on != "all":
            raise ConfigError(
                f"data.rounds[0] ({self._names[0]}): the first round has no train data and nothing is accepted "
                "before it; give it train: [embedded:<domain> | meta.json | shards.tar]"
            )
        self._data: list[dict[str, list[Dataset]]] | None = None
        #: round -> the removals accepted at its end (CPU tensors), joining the next round's training set
        self._accepted: dict[int, dict[str, Tensor]] = {}

    @staticmethod
    def _check_counts(counts: dict[str, int] | None) -> dict[str, int]:
        given = dict(counts or {})
        if unknown := sorted(set(given) - set(SLOTS)):
            raise ConfigError(f"data.counts: unknown key {unknown[0]!r}; the keys are {', '.join(SLOTS)}")
        merged = {**DEFAULT_COUNTS, **given}
        for slot, n in merged.items():
            least = 0 if slot == "inputs" else 1
            if not isinstance(n, int) or isinstance(n, bool) or n < least:
                raise ConfigError(f"data.counts.{slot} must be an integer of at least {least}, got {n!r}")
        return merged

    def _add_round(self, k: int, spec: Any) -> None:
        where = f"data.rounds[{k}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: {spec!r} is not a mapping; a round has the keys {', '.join(ROUND_KEYS)}")
        if unknown := sorted(set(spec) - set(ROUND_KEYS)):
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a round has the keys {', '.join(ROUND_KEYS)}")
        name = spec.get("name")
        name = f"round-{k}" if name is None else name
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
        if name in self._names:
            raise ConfigError(f"{where}.name: {name!r} names an earlier round too; give each round its own name")
        sources = {}
        for slot in SLOTS:
            value = spec.get(slot)
            values = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(values, list):
                raise ConfigError(f"{where}.{slot} must be a source or a list of sources, got {value!r}")
            sources[slot] = [self._parse_source(v, f"{where}.{slot}", slot) for v in values]
        if not sources["eval"]:
            raise ConfigError(
                f"{where} ({name}): no eval data; every round is evaluated, give it "
                "eval: [embedded:<domain> | meta.json | shards.tar]"
            )
        self._names.append(name)
        self._sources.append(sources)

    def _parse_source(self, value: Any, option: str, slot: str) -> _Source:
        """Checks what can be checked without reading: the domain exists, the file or shards are there."""
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{option}: {value!r} is not a source (embedded:<domain>, a meta.json or shards.tar)")
        scored = self.need_score and slot != "inputs"
        if value.startswith(EMBEDDED):
            domain = value.removeprefix(EMBEDDED)
            if domain not in DOMAINS:
                raise ConfigError(
                    f"{option}: embedded domain {domain!r} does not exist; choose one of {', '.join(DOMAINS)}"
                )
            if scored and not domain.endswith(JUDGED):
                raise ConfigError(
                    f"{option}: {value} has no scores and data.need_score is set; use {value}{JUDGED} "
                    "(judged removals) or a meta.json whose entries carry a score"
                )
            return _Source("embedded", domain, option)
        if value.endswith(".tar"):
            try:
                import webdataset as wds
            except ImportError:
                raise ConfigError(
                    f"{option}: {value}: .tar shards need webdataset: pip install -e '.[diffusion]'"
                ) from None
            urls = list(wds.shardlists.expand_urls(value))
            if missing := [u for u in urls if not Path(u).is_file()]:
                raise ConfigError(
                    f"{option}: shard {missing[0]} not found ({len(missing)} of {len(urls)} missing); "
                    "check the shard pattern (relative to the current folder)"
                )
            return _Source("shards", value, option)
        path = Path(value)
        if path.is_dir():
            path = path / "meta.json"
        if not path.is_file():
            raise ConfigError(
                f"{option}: {path} not found; pass a meta.json (RORem's layout), a .tar shard pattern or "
                f"embedded:<domain> ({', '.join(DOMAINS)})"
            )
        return _Source("meta", str(path), option)

    # -- reading -----------------------------------------------------------------------------------
    def slot_seed(self, round_id: int, slot: str) -> int:
        """The embedded seed of a (round, slot): rounds and slots see different images (with `shared_eval`,
        every round's eval slot the first round's)."""
        if slot == "eval" and self.shared_eval:
            round_id = 0
        return 1000 * round_id + SLOTS.index(slot)

    def _read(self, source: _Source, round_id: int, slot: str) -> Dataset:
        scored = self.need_score and slot != "inputs"
        inputs = slot == "inputs" or (slot == "train" and not self.train_needs_target)
        if source.kind == "meta":
            records = read_meta(source.value, scored, inputs, source.option)
        elif source.kind == "shards":
            records = read_shards(source.value, scored, inputs, source.option)
        else:
            split = "test" if slot == "eval" else "train"
            data = embedded_triplets(source.value, split, self.counts[slot], self.slot_seed(round_id, slot))
            r = self.resolution
            mask = _resize_tensors(data["mask"], r).clamp(0, 1)
            mask = (mask >= 0.5).float() if self.binarize_mask else mask
            return TripletTensors(
                _resize_tensors(data["source"], r).clamp(-1, 1),
                mask,
                _resize_tensors(data["target"], r).clamp(-1, 1),
                data["score"],
            )
        return EncodedTriplets(records, self.resolution, self.binarize_mask)

    def _datasets(self) -> list[dict[str, list[Dataset]]]:
        if self._data is None:
            self._data = [
                {slot: [self._read(s, k, slot) for s in sources[slot]] for slot in SLOTS}
                for k, sources in enumerate(self._sources)
            ]
        return self._data

    def setup(self, stage: str | None = None) -> None:
        self._datasets()

    # -- the stream --------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    @property
    def stream(self) -> RemovalStream:
        r = self.resolution
        return RemovalStream(task_names=tuple(self._names), input_shape=(3, r, r), resolution=r)

    def train_dataset(self, task_id: int) -> Dataset:
        """Round k's train triplets plus the removals accepted at the end of round k-1."""
        parts = list(self._datasets()[task_id]["train"])
        accepted = self._accepted.get(task_id - 1)
        if task_id > 0 and accepted is not None:
            parts.append(TripletTensors(accepted["source"], accepted["mask"], accepted["target"], accepted["score"]))
        return RoundDataset(parts)

    def eval_dataset(self, task_id: int) -> Dataset:
        return RoundDataset(self._datasets()[task_id]["eval"])

    def round_inputs(self, round_id: int) -> Dataset:
        """The new inputs of round k, which the data engine removes objects on at its end (empty when none)."""
        return RoundDataset(self._datasets()[round_id]["inputs"])

    def train_dataloader(self):
        t = self.current_task
        tasks = {"current": [t], "seen": range(t + 1), "all": range(self.num_tasks)}[self.train_on]
        if not any(len(self.train_dataset(i)) for i in tasks):
            raise ConfigError(
                f"data.rounds[{t}] ({self._names[t]}): nothing to train on (no train data, nothing accepted at the "
                "end of the round before); give it train data or use data.train_on: seen"
            )
        return super().train_dataloader()

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """The base class seeds the step's RNG; training batches are then flipped jointly (`random_flip`)."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = self.trainer
        if not self.random_flip or trainer is None or not trainer.training:
            return batch
        return joint_flip(batch)

    # -- the data engine's accepted removals ---------------------------------------------------------
    def accept(self, round_id: int, items: dict[str, Tensor]) -> None:
        """Stores the removals accepted at the end of round `round_id` (source, mask, target = the result,
        score; replacing any earlier call for that round); they join `train_dataset(round_id + 1)`."""
        if not 0 <= round_id < self.num_tasks:
            raise ValueError(f"accept: round {round_id} does not exist (rounds 0..{self.num_tasks - 1})")
        n, r = len(items["source"]), self.resolution
        shapes = {"source": (n, 3, r, r), "mask": (n, 1, r, r), "target": (n, 3, r, r)}
        for key, shape in shapes.items():
            if tuple(items[key].shape) != shape:
                raise ValueError(f"accept: {key} has shape {tuple(items[key].shape)}, expected {shape}")
        score = items.get("score")
        score = torch.full((n,), math.nan) if score is None else torch.as_tensor(score).reshape(n)
        self._accepted[round_id] = {
            **{key: items[key].detach().float().cpu().clone() for key in shapes},
            "score": score.detach().float().cpu().clone(),
        }

    def accepted_count(self, round_id: int) -> int:
        accepted = self._accepted.get(round_id)
        return 0 if accepted is None else len(accepted["source"])

    def state_dict(self) -> dict:
        """The round, and the accepted removals (a resumed run trains on the same data)."""
        return {**super().state_dict(), "accepted": {k: dict(v) for k, v in self._accepted.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        accepted = state_dict.get("accepted", {})
        self._accepted = {int(k): {name: t.clone() for name, t in v.items()} for k, v in accepted.items()}
