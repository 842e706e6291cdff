"""Concept streams for lifelong text-to-image personalisation (R2MoE, Custom Diffusion): task k teaches one
new concept, bound to the token `<new{k+1}>`.

Reads the CustomConcept101 / R2MoE layout::

    root/
      <concept>/              the concept's images (*.jpg, *.jpeg, *.png) and caption.txt: one caption per
                              image, in sorted file-name order, e.g. "<new1> cat, sitting on a table"; any
                              `<new>` or `<newK>` in a caption becomes this concept's token
      prompts/<concept>.txt   optional evaluation prompts, one per line: "{}" becomes "<token> <class>",
                              `<new>` / `<newK>` the token (default: "photo of a {}")
      reg/<class>/            regularisation images of the class word (prior preservation), made by the base
                              model with `lifelong make-reg`; concepts of one class (dog, dog1) share them

With no `root`, three embedded concepts are written to a temporary folder in that layout, so demos and tests
need no download: cut from scikit-image's bundled photos (`write_embedded_concepts`) or, for the small
pretrained bases, which draw digits well and photos poorly, three coloured handwritten digits
(`write_embedded_digit_concepts`).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules.base import ContinualDataModule, TaskStream

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_PROMPTS = ("photo of a {}",)
#: caption prefixes of Custom Diffusion's augmentation, put before the whole caption by the released code
#: ("a far away photo of a <new1> dog, ..."); `augment_caption: insert` puts them after "photo of a " instead,
#: "a far away " there read "far away " ("photo of a far away <new1> dog, ...")
SMALL_PREFIXES = ("a far away ", "very small ")
ZOOM_PREFIXES = ("zoomed in ", "close up ")
_INSERTED = {"a far away ": "far away "}
#: without prior preservation an epoch still holds at least this many target draws (R2MoE's 25
#: regularisation images per class give epochs of 50 items)
MIN_TARGET_EPOCH = 50
_TOKEN = re.compile(r"<new\d*>")


def concept_token(k: int) -> str:
    """The token of concept k (0-based): `<new1>`, `<new2>`, ..."""
    return f"<new{k + 1}>"


def default_class(concept: str) -> str:
    """The class word of a concept folder: trailing digits dropped, "_" read as a space (dog1 -> dog)."""
    return re.sub(r"\d+$", "", concept).replace("_", " ").strip() or concept


def token_class_gate(token: str, cls: str) -> str:
    """The gate prompt of the released sampling script: "photo of a <token> <class>"."""
    return f"photo of a {token} {cls}"


@dataclass(frozen=True)
class ConceptStream(TaskStream):
    """A concept stream: each task's token, class word, training-side gate prompt ("photo of a " + its first
    caption: what R2MoE's redundancy removal and routing distillation read), inference gate prompt (what
    evaluation and `lifelong sample` route by; when not given, "photo of a <token> <class>", as the released
    sampling script), and the training resolution."""

    tokens: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    gate_prompts: tuple[str, ...] = ()
    resolution: int = 512
    inference_gate_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.inference_gate_prompts and self.tokens and len(self.tokens) == len(self.classes):
            prompts = tuple(token_class_gate(t, c) for t, c in zip(self.tokens, self.classes, strict=True))
            object.__setattr__(self, "inference_gate_prompts", prompts)


@dataclass
class _Concept:
    """One concept as listed on disk (nothing decoded yet)."""

    name: str
    token: str
    cls: str
    images: list[Path]
    captions: list[str]
    prompts: list[str]
    reg: list[Path]
    reg_dir: Path  # where its class's regularisation images are (or `lifelong make-reg` writes them)


# -- reading --------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err}); write one line per caption or prompt") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"{path}: not a readable image ({err}); remove or replace it") from None


def _square(im, size: int) -> Tensor:
    """PIL image squashed to size x size (the `stretch` reading) -> uint8 [3, size, size]."""
    from PIL import Image

    return torch.from_numpy(np.array(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)).permute(2, 0, 1)


def _crop_square(im):
    """The centred square of a PIL image, its side the shorter one, cut at the released code's indices
    ((h - s) // 2 to (h + s) // 2), before any resize."""
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))


def _training_image(im, size: int, resize: str) -> Tensor:
    """A training (target or regularisation) image at size x size: `center_crop` (the released code: the
    centred square, then a bicubic resize) or `stretch` (the whole image squashed)."""
    return _square(_crop_square(im) if resize == "center_crop" else im, size)


def _centre_crop(im, size: int) -> Tensor:
    """PIL image with its shorter side resized to `size`, centre-cropped -> uint8 [3, size, size] (CLIP's view)."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


# -- augmentation ---------------------------------------------------------------------------------------
def _resize(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(
        -1, 1
    )


def _flip(x: Tensor) -> Tensor:
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def augment_target(image: Tensor, mask_downsample: int = 8, canvas: str = "grey") -> tuple[Tensor, Tensor, str]:
    """Custom Diffusion's target augmentation of one R x R image in [-1, 1], drawn from torch's global RNG.

    Flip; then with probability 2/3 a size in [170/512 R, R]: below 0.6 R the image shrinks onto a black
    canvas at a random place and the loss mask keeps only the latent pixels inside the pasted square, less
    one on each side (Custom Diffusion's indexing: the cell holding its first row / column is dropped,
    and the last fully covered one); otherwise (1/3) it is enlarged 1.2-1.4x and randomly cropped. Sizes
    are made even. The canvas is `grey` (0 in [-1, 1]: the released code's np.zeros after scaling the
    image) or `black` (-1, as the spec describes it). Returns (pixels, mask [1, R/d, R/d], caption prefix or "").
    """
    r, d = image.shape[-1], mask_downsample
    image = _flip(image)
    mask = torch.ones(1, r // d, r // d)
    if torch.randint(3, ()) < 2:
        size = int(torch.randint(round(170 / 512 * r), r + 1, ()))
    else:
        size = int(torch.randint(int(1.2 * r), int(1.4 * r) + 1, ()))
    size += size % 2
    if size < 0.6 * r:
        prefix = SMALL_PREFIXES[int(torch.randint(2, ()))]
        y, x = (int(v) for v in torch.randint(r - size + 1, (2,)))
        pasted = torch.full_like(image, -1.0 if canvas == "black" else 0.0)
        pasted[:, y : y + size, x : x + size] = _resize(image, size)
        mask.zero_()
        mask[:, y // d + 1 : (y + size) // d - 1, x // d + 1 : (x + size) // d - 1] = 1
        return pasted, mask, prefix
    if size > r:
        prefix = ZOOM_PREFIXES[int(torch.randint(2, ()))]
        y, x = (int(v) for v in torch.randint(size - r + 1, (2,)))
        return _resize(image, size)[:, y : y + r, x : x + r], mask, prefix
    return image, mask, ""  # a size in [0.6 R, R]: Custom Diffusion keeps the plain R x R image


def _to_unit(x: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


# -- datasets -------------------------------------------------------------------------------------------
class ConceptTrainDataset(Dataset):
    """Training items of one concept: with prior preservation, the first `len(reg)` indices are
    regularisation images ("photo of a <class>") and as many more draw the concept's images (wrapping);
    without it, only the concept's images, repeated to at least `MIN_TARGET_EPOCH` items."""

    def __init__(
        self,
        task: int,
        targets: Tensor,
        captions: list[str],
        reg: Tensor | None,
        class_word: str,
        augment: bool = True,
        mask_downsample: int = 8,
    ):
        self.task, self.targets, self.captions = task, targets, captions
        self.reg = reg if reg is not None else targets[:0]
        self.class_word = class_word
        self.augment, self.mask_downsample = augment, mask_downsample
        n = len(targets)
        self.length = 2 * len(self.reg) if reg is not None else n * -(-MIN_TARGET_EPOCH // n)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        """An un-augmented item; `augment_batch` augments it after the step's RNG is seeded."""
        r = self.targets.shape[-1]
        side = r // self.mask_downsample
        n_reg = len(self.reg)
        if i < n_reg:
            pixels, line, caption = _to_unit(self.reg[i]), "", f"photo of a {self.class_word}"
        else:
            j = (i - n_reg) % len(self.targets)
            pixels, line = _to_unit(self.targets[j]), self.captions[j]
            caption = "photo of a " + line
        return {
            "pixels": pixels.contiguous(),
            "mask": torch.ones(1, side, side),
            "caption": caption,
            "line": line,
            "is_reg": torch.tensor(i < n_reg),
            "task": torch.tensor(self.task, dtype=torch.long),
        }


def augmented_caption(line: str, prefix: str, augment_caption: str = "prefix") -> str:
    """A concept image's caption with its augmentation prefix: before the whole caption (`prefix`, the
    released code: "a far away photo of a <new1> dog") or after "photo of a " (`insert`: "photo of a far
    away <new1> dog")."""
    if augment_caption == "insert":
        return "photo of a " + _INSERTED.get(prefix, prefix) + line
    return prefix + "photo of a " + line


def augment_batch(batch: dict, mask_downsample: int, augment_caption: str = "prefix", canvas: str = "grey") -> dict:
    """Custom Diffusion's augmentation of a training batch, item by item: regularisation images are only
    flipped; concept images go through `augment_target` and their caption gets its prefix
    (`augmented_caption`)."""
    pixels, masks, captions = batch["pixels"].clone(), batch["mask"].clone(), list(batch["caption"])
    for i, is_reg in enumerate(batch["is_reg"].tolist()):
        if is_reg:
            pixels[i] = _flip(pixels[i])
            continue
        image, mask, prefix = augment_target(pixels[i], mask_downsample, canvas)
        pixels[i], masks[i] = image, mask.to(masks.device)
        captions[i] = augmented_caption(batch["line"][i], prefix, augment_caption)
    return {**batch, "pixels": pixels, "mask": masks, "caption": captions}


class ConceptEvalDataset(Dataset):
    """One item per evaluation prompt of a concept; each carries all of the concept's real images
    (`reference`, for CLIP-I / DINO alignment) and the prompt without its token (for CLIP-T)."""

    def __init__(self, task: int, prompts: list[str], token: str, reference: Tensor):
        self.task, self.prompts, self.reference = task, prompts, reference
        self.plain = [" ".join(re.sub(re.escape(token) + r" ?", "", p).split()) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {
            "prompt": self.prompts[i],
            "prompt_plain": self.plain[i],
            "task": torch.tensor(self.task, dtype=torch.long),
            "index": torch.tensor(i, dtype=torch.long),  # the prompt's position (the first batch logs a grid)
            "reference": self.reference,
        }


# -- the datamodule -------------------------------------------------------------------------------------
class ConceptDataModule(ContinualDataModule):
    """One concept per task, read from the layout in the module docstring; images are decoded once at
    setup and kept in memory (training images at `resolution`² as `resize` says, references centre-cropped).

    Args:
        root: the concepts folder; None writes the `embedded` concepts to a temporary folder.
        embedded: which embedded concepts a null root gives: `photos` (cat, cup, rocket cut from
            scikit-image photos) or `digits` (three held-out handwritten digits, each in its own colours).
        concepts: concept folder names in task order (default: sorted sub-folders holding a caption.txt).
        classes: concept -> class word, for the concepts whose folder name does not give it (the default
            drops trailing digits and reads "_" as a space: dog1 -> dog, duck_toy -> duck toy).
        reg_root: where the `<class>/` regularisation folders are (default root/reg); a class word with
            spaces may also use "_" in its folder name.
        prior_preservation: mix regularisation images of the class into every batch (half of each task's items).
        num_reg_images: use at most this many regularisation images per class (the first in file-name order).
        resolution: training image size R (square).
        mask_downsample: pixels per latent pixel; the loss mask is R/mask_downsample on a side.
        augment: Custom Diffusion's augmentation (flip, zoom out onto a canvas, zoom in); False: plain resize.
        augment_caption: where the augmentation's caption prefix goes: `prefix` (the released code: before the
            whole caption, "a far away photo of a <new1> dog, ...") or `insert` (the suite's earlier reading:
            after "photo of a ", "photo of a far away <new1> dog, ...").
        canvas: the zoom-out canvas around a shrunken concept image: `grey` (the released code, whose
            canvas is 0 after images are scaled to [-1, 1]) or `black` (the spec's description).
        resize: how a training image (concept or regularisation) becomes square: `center_crop` (the released
            code: its centred square, then resized) or `stretch` (the suite's earlier reading: the whole
            image squashed to `resolution`², changing its aspect ratio).
        inference_gate: the gate prompt evaluation and `lifelong sample` route by: `token_class` (the
            released sampling script: "photo of a <token> <class>") or `caption` (the suite's earlier
            reading: "photo of a " + the concept's first caption, the prompt redundancy removal and the
            routing distillation read in either case).
        clip_resolution: size of the reference images evaluation compares generations with.
        max_eval_prompts: keep only the first this many evaluation prompts of each concept.
    """

    def __init__(
        self,
        root: str | None = None,
        concepts: list[str] | None = None,
        classes: dict[str, str] | None = None,
        reg_root: str | None = None,
        prior_preservation: bool = True,
        num_reg_images: int | None = None,
        resolution: int = 512,
        mask_downsample: int = 8,
        augment: bool = True,
        augment_caption: Literal["prefix", "insert"] = "prefix",
        canvas: Literal["grey", "black"] = "grey",
        resize: Literal["center_crop", "stretch"] = "center_crop",
        inference_gate: Literal["token_class", "caption"] = "token_class",
        clip_resolution: int = 224,
        max_eval_prompts: int | None = None,
        embedded: Literal["photos", "digits"] = "photos",
        **kwargs,
    ):
        kwargs.setdefault("batch_size", 2)
        kwargs.setdefault("eval_batch_size", 4)
        super().__init__(**kwargs)
        if resolution < 1 or mask_downsample < 1 or resolution % mask_downsample:
            raise ConfigError(
                f"data.resolution: {resolution} must be a positive multiple of data.mask_downsample ({mask_downsample})"
            )
        if num_reg_images is not None and num_reg_images < 1:
            raise ConfigError(f"data.num_reg_images: {num_reg_images} must be at least 1 (or null for all)")
        if max_eval_prompts is not None and max_eval_prompts < 1:
            raise ConfigError(f"data.max_eval_prompts: {max_eval_prompts} must be at least 1 (or null for all)")
        for name, value, choices in (
            ("augment_caption", augment_caption, ("prefix", "insert")),
            ("canvas", canvas, ("grey", "black")),
            ("resize", resize, ("center_crop", "stretch")),
            ("inference_gate", inference_gate, ("token_class", "caption")),
            ("embedded", embedded, ("photos", "digits")),
        ):
            if value not in choices:
                raise ConfigError(f"data.{name}: {value!r} is not one of {', '.join(map(repr, choices))}")
        self.root = Path(root) if root is not None else None
        self.concepts = list(concepts) if concepts is not None else None
        self.classes = dict(classes or {})
        self.reg_root = Path(reg_root) if reg_root is not None else None
        self.prior_preservation = prior_preservation
        self.num_reg_images = num_reg_images
        self.resolution = resolution
        self.mask_downsample = mask_downsample
        self.augment = augment
        self.augment_caption = augment_caption
        self.canvas = canvas
        self.resize = resize
        self.inference_gate = inference_gate
        self.clip_resolution = clip_resolution
        self.max_eval_prompts = max_eval_prompts
        self.embedded = embedded
        self._embedded_dir: tempfile.TemporaryDirectory | None = None
        self._listed: list[_Concept] | None = None
        self._train: list[Dataset] = []
        self._eval: list[Dataset] = []
        if root is not None:  # a user's folder: check it now, before any model is built
            self._catalog()

    # -- listing ---------------------------------------------------------------------------------------
    def _catalog(self) -> list[_Concept]:
        """The concepts as listed on disk; with no root, writes the embedded ones first (per process)."""
        if self._listed is None:
            root = self.root
            if root is None:
                self._embedded_dir = tempfile.TemporaryDirectory(prefix="lifelong-concepts-")
                write = write_embedded_digit_concepts if self.embedded == "digits" else write_embedded_concepts
                root = write(self._embedded_dir.name)
            self._listed = self._list(root)
        return self._listed

    def _list(self, root: Path) -> list[_Concept]:
        if not root.is_dir():
            raise ConfigError(f"data.root: {root} not found; point it at a folder of <concept>/ image folders")
        names = self.concepts
        if names is None:
            names = sorted(p.name for p in root.iterdir() if (p / "caption.txt").is_file())
            # A folder of photos without captions is a concept the user meant to include, not one to skip.
            uncaptioned = sorted(
                p.name
                for p in root.iterdir()
                if p.is_dir()
                and p.name not in names
                and p.name not in ("prompts", "reg")
                and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
            )
            if uncaptioned:
                raise ConfigError(
                    f"{root / uncaptioned[0]}: images but no caption.txt; write one caption per image there (or "
                    "list the concepts to use in data.concepts)"
                )
            if not names:
                raise ConfigError(f"data.root: no concept folders (images + caption.txt) under {root}")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.concepts: {names} lists a concept twice; each concept is one task")
        if unknown := sorted(set(self.classes) - set(names)):
            raise ConfigError(f"data.classes: {unknown} are not concepts of this stream ({names}); remove them")
        reg_root = self.reg_root if self.reg_root is not None else root / "reg"
        return [self._concept(root, name, k, reg_root) for k, name in enumerate(names)]

    def _concept(self, root: Path, name: str, k: int, reg_root: Path) -> _Concept:
        folder, token = root / name, concept_token(k)
        if not folder.is_dir():
            raise ConfigError(f"data.concepts: {name!r} is not a folder under {root}; list the concept folders there")
        caption_file = folder / "caption.txt"
        if not caption_file.is_file():
            raise ConfigError(f"{caption_file}: not found; write one caption per image there, in file-name order")
        images = _images_in(folder)
        if not images:
            raise ConfigError(f"{folder}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}); add the photos")
        captions = [_TOKEN.sub(token, line) for line in _lines(caption_file)]
        if len(captions) != len(images):
            raise ConfigError(
                f"{caption_file}: {len(captions)} captions for {len(images)} images; "
                "write exactly one line per image, in sorted file-name order"
            )
        cls = self.classes.get(name, default_class(name))
        prompt_file = root / "prompts" / f"{name}.txt"
        prompts = _lines(prompt_file) if prompt_file.is_file() else list(DEFAULT_PROMPTS)
        if not prompts:
            raise ConfigError(f"{prompt_file}: no prompts; write one per line or remove the file")
        if lost := [i for i, p in enumerate(prompts, 1) if "{}" not in p and not _TOKEN.search(p)]:
            raise ConfigError(
                f"{prompt_file}:{lost[0]}: no {{}} where the concept goes, so it would never be evaluated; add it"
            )
        prompts = [_TOKEN.sub(token, p).replace("{}", f"{token} {cls}") for p in prompts]
        if self.max_eval_prompts is not None:
            prompts = prompts[: self.max_eval_prompts]
        found = [d for d in (reg_root / cls, reg_root / cls.replace(" ", "_")) if d.is_dir()]
        reg_dir = found[0] if found else reg_root / cls.replace(" ", "_")
        reg: list[Path] = []
        if self.prior_preservation:
            reg = _images_in(reg_dir) if found else []
            if not reg:
                raise ConfigError(
                    f"{reg_dir}: no regularisation images of class '{cls}'; generate them "
                    "with `lifelong make-reg -c <config>` or set data.prior_preservation false"
                )
            reg = reg[: self.num_reg_images]
        return _Concept(name, token, cls, images, captions, prompts, reg, reg_dir)

    def regularisation_folders(self) -> dict[str, Path]:
        """class word -> the folder its regularisation images go to (what `lifelong make-reg` fills)."""
        return {c.cls: c.reg_dir for c in self._catalog()}

    # -- the stream ------------------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [c.name for c in self._catalog()]

    @property
    def stream(self) -> ConceptStream:
        listed = self._catalog()
        r = self.resolution
        return ConceptStream(
            task_names=tuple(c.name for c in listed),
            input_shape=(3, r, r),
            tokens=tuple(c.token for c in listed),
            classes=tuple(c.cls for c in listed),
            gate_prompts=tuple("photo of a " + c.captions[0] for c in listed),
            resolution=r,
            inference_gate_prompts=tuple(
                token_class_gate(c.token, c.cls)
                if self.inference_gate == "token_class"
                else "photo of a " + c.captions[0]
                for c in listed
            ),
        )

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        r, c = self.resolution, self.clip_resolution
        reg_cache: dict[tuple[Path, ...], Tensor] = {}  # concepts of one class share their decoded images
        train, evaluation = [], []
        for t, concept in enumerate(self._catalog()):
            photos = [_open_rgb(p) for p in concept.images]
            targets = torch.stack([_training_image(im, r, self.resize) for im in photos])
            reference = torch.stack([_centre_crop(im, c) for im in photos])
            reg = None
            if self.prior_preservation:
                key = tuple(concept.reg)
                if key not in reg_cache:
                    reg_cache[key] = torch.stack([_training_image(_open_rgb(p), r, self.resize) for p in concept.reg])
                reg = reg_cache[key]
            train.append(
                ConceptTrainDataset(t, targets, concept.captions, reg, concept.cls, self.augment, self.mask_downsample)
            )
            evaluation.append(ConceptEvalDataset(t, concept.prompts, concept.token, reference))
        self._train, self._eval = train, evaluation

    def train_dataset(self, task_id: int) -> Dataset:
        return self._train[task_id]

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Seeds the step's RNG (base class), then augments: a resumed run draws what the uninterrupted one did."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training and "is_reg" in batch:
            batch = augment_batch(batch, self.mask_downsample, self.augment_caption, self.canvas)
        return batch

    def eval_dataset(self, task_id: int) -> Dataset:
        return self._eval[task_id]


# -- the embedded default -------------------------------------------------------------------------------
#: (concept folder, scikit-image photo, evaluation prompts,
#:  [(crop box as fractions left, top, right, bottom; mirrored; caption)])
_EMBEDDED = (
    (
        "cat",
        "chelsea",
        ("photo of a {}", "a {} sleeping on a sofa"),
        (
            ((0.0, 0.0, 1.0, 1.0), False, "<new1> cat, close-up of the face"),
            ((0.2, 0.15, 0.85, 0.75), False, "<new1> cat, green eyes and striped fur"),
            ((0.1, 0.0, 0.9, 1.0), True, "<new1> cat, head and whiskers, blurred background"),
            ((0.4, 0.55, 0.8, 1.0), False, "<new1> cat, pink nose and white chin"),
        ),
    ),
    (
        "cup",
        "coffee",
        ("photo of a {}", "a {} on a beach"),
        (
            ((0.0, 0.0, 1.0, 1.0), False, "<new1> cup, espresso on a saucer on a wooden table"),
            ((0.12, 0.15, 0.82, 1.0), False, "<new1> cup, red saucer with a spoon"),
            ((0.28, 0.0, 0.7, 0.55), False, "<new1> cup, seen from above, full of coffee"),
            ((0.0, 0.0, 1.0, 1.0), True, "<new1> cup, on a wooden table, mirrored"),
        ),
    ),
    (
        "rocket",
        "rocket",
        ("photo of a {}", "a {} in the snow"),
        (
            ((0.0, 0.0, 1.0, 1.0), False, "<new1> rocket, on the launch pad at dusk"),
            ((0.3, 0.15, 0.7, 1.0), False, "<new1> rocket, between two launch towers"),
            ((0.42, 0.25, 0.58, 0.75), False, "<new1> rocket, white body and nose cone"),
            ((0.0, 0.0, 1.0, 1.0), True, "<new1> rocket, lit by floodlights"),
        ),
    ),
)
#: photos the stand-in regularisation images are cut from (none of them shows a concept)
_REG_PHOTOS = ("astronaut", "stereo_motorcycle", "immunohistochemistry", "hubble_deep_field")
_EMBEDDED_SIZE = 128


def _sample_photo(name: str):
    """A photo shipped inside scikit-image (these load from the installed package, offline) as PIL RGB."""
    from PIL import Image
    from skimage import data

    arr = getattr(data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3])).convert("RGB")


def _cut(photo, box: tuple[float, float, float, float], mirror: bool, square: bool = False):
    """Crop `box` (fractions) of a photo, optionally mirrored, with its shorter side (or both) at 128 px."""
    from PIL import Image

    w, h = photo.size
    im = photo.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    im = im.transpose(Image.FLIP_LEFT_RIGHT) if mirror else im
    scale = _EMBEDDED_SIZE / min(im.size)
    size = (_EMBEDDED_SIZE,) * 2 if square else (round(im.size[0] * scale), round(im.size[1] * scale))
    return im.resize(size, Image.BICUBIC)


def write_embedded_concepts(path: str | Path) -> Path:
    """Writes the embedded concepts (cat, cup, rocket: four views each of a scikit-image photo, with
    captions and two evaluation prompts) in the on-disk layout under `path`, and returns it.

    Their `reg/<class>/` folders hold four stand-ins cut from other bundled photos, so the pipeline runs
    end to end offline; real runs generate regularisation images with `lifelong make-reg`. Deterministic:
    the same files every call.
    """
    path = Path(path)
    reg_photos = [_sample_photo(name) for name in _REG_PHOTOS]
    quarters = ((0.0, 0.0, 0.6, 0.6), (0.4, 0.0, 1.0, 0.6), (0.0, 0.4, 0.6, 1.0), (0.4, 0.4, 1.0, 1.0))
    for k, (concept, photo_name, prompts, views) in enumerate(_EMBEDDED):
        folder = path / concept
        folder.mkdir(parents=True, exist_ok=True)
        photo = _sample_photo(photo_name)
        for i, (box, mirror, _) in enumerate(views):
            _cut(photo, box, mirror).save(folder / f"{i:02d}.png")
        (folder / "caption.txt").write_text("".join(caption + "\n" for *_, caption in views), encoding="utf-8")
        (path / "prompts").mkdir(exist_ok=True)
        (path / "prompts" / f"{concept}.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
        reg = path / "reg" / default_class(concept)
        reg.mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(reg_photos):
            _cut(photo, quarters[(i + k) % 4], False, square=True).save(reg / f"{i:02d}.png")
    return path


#: (concept folder, digit, ink, background): each concept is one digit class in one colour pair, four of
#: its held-out handwritten instances as views; the folder names give all three the class "handwritten digit"
_EMBEDDED_DIGITS = (
    ("handwritten_digit1", 3, "yellow", "blue"),
    ("handwritten_digit2", 7, "white", "red"),
    ("handwritten_digit3", 4, "black", "green"),
)
_DIGIT_VIEWS = 4
_DIGIT_PROMPTS = ("photo of a {}",)  # the training captions and the gate prompt start so, too
_DIGIT_REG_IMAGES = 8


def write_embedded_digit_concepts(path: str | Path) -> Path:
    """Writes three digit concepts (`_EMBEDDED_DIGITS`: four held-out instances of a digit in its colour
    pair, 32 x 32, captioned "<new1> handwritten digit") in the on-disk layout under `path`, and returns it.

    Made for the small pretrained bases (`lifelong pretrain-bases`): they learnt coloured digits from the
    train split, so each concept is a new instance of something they can draw, and their small CLIP tells
    digits and colours apart. `reg/handwritten digit/` holds train digits in random colour pairs.
    Deterministic: the same files every call.
    """
    from PIL import Image

    from datamodules import small_world as world

    def save(image: Tensor, file: Path) -> None:
        Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(file)

    path = Path(path)
    intensities, labels = world.digits_split("test")
    for concept, digit, ink, background in _EMBEDDED_DIGITS:
        folder = path / concept
        folder.mkdir(parents=True, exist_ok=True)
        instances = (labels == digit).nonzero().flatten()[:_DIGIT_VIEWS].tolist()
        for i, k in enumerate(instances):
            save(world.paint(intensities[k], ink, background), folder / f"{i:02d}.png")
        (folder / "caption.txt").write_text("<new1> handwritten digit\n" * len(instances), encoding="utf-8")
        (path / "prompts").mkdir(exist_ok=True)
        (path / "prompts" / f"{concept}.txt").write_text("".join(p + "\n" for p in _DIGIT_PROMPTS), encoding="utf-8")
    reg = path / "reg" / default_class(_EMBEDDED_DIGITS[0][0])
    reg.mkdir(parents=True, exist_ok=True)
    stream = iter(world.CaptionedImages(seed=0, digit_fraction=1.0))
    for i in range(_DIGIT_REG_IMAGES):
        save((next(stream)["pixel_values"] + 1) / 2, reg / f"{i:02d}.png")
    return path
