"""The small world the pretrained bases learn: captioned 32 x 32 images made from data that ships inside
packages. Digits are scikit-learn's 8 x 8 handwritten digits, upsampled, drawn in an ink colour on a
background colour ("a red handwritten digit seven on a white background", or the short "a handwritten
digit seven"); photos are random square crops of scikit-image's sample photos with a caption per photo.

The digits' train/test split is Split-Digits' (stratified, 20% held out, split seed 0): the bases learn
from the train split only, and the quality bars are measured on the held-out digits. The three photos the
embedded concepts are cut from (cat, coffee, rocket) are left out of the text-to-image and inpainting
bases, so a concept is new to them; the small CLIP, a measuring instrument, sees them with class captions.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RESOLUTION = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: ink and background colours (RGB in [0, 1]); a digit's pair always differs in brightness enough to read
COLOURS = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.55, 0.10),
    "purple": (0.55, 0.20, 0.70),
    "grey": (0.50, 0.50, 0.50),
}
MIN_CONTRAST = 0.3  # |luma(ink) - luma(background)|
#: scikit-image photo -> its caption (all load offline from the installed package)
PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "brick": "a photo of a brick wall",
    "camera": "a black and white photo of a man with a camera",
    "coins": "a black and white photo of old coins",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
    "horse": "a drawing of a horse",
    "hubble_deep_field": "a photo of galaxies in deep space",
    "immunohistochemistry": "a microscope image of stained tissue",
    "logo": "a logo on a white background",
    "moon": "a black and white photo of the moon",
    "stereo_motorcycle": "a photo of a motorcycle",
    "retina": "a photo of a retina",
    "text": "a black and white photo of handwritten text",
    "colorwheel": "a colour wheel",
}
#: the embedded concepts' photos: seen by the small CLIP only
CONCEPT_PHOTOS = {
    "chelsea": "a photo of a cat",
    "coffee": "a photo of a cup of coffee",
    "rocket": "a photo of a rocket",
}
DIGIT_PROMPT = "a handwritten digit {}"


def luma(rgb: tuple[float, float, float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@functools.lru_cache(maxsize=1)
def colour_pairs() -> tuple[tuple[str, str], ...]:
    """Every (ink, background) pair whose brightness differs by at least MIN_CONTRAST."""
    names = list(COLOURS)
    return tuple(
        (i, b) for i in names for b in names if i != b and abs(luma(COLOURS[i]) - luma(COLOURS[b])) >= MIN_CONTRAST
    )


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def digit_prompt(label: int) -> str:
    """The short prompt of a digit class, the one the quality bars use: "a handwritten digit seven"."""
    return DIGIT_PROMPT.format(DIGIT_WORDS[label])


@functools.lru_cache(maxsize=2)
def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Split-Digits' stratified split: (intensities N x 1 x 32 x 32 in [0, 1], labels N)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0
    )
    idx = idx_train if split == "train" else idx_test
    x = torch.tensor(digits.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target[idx], dtype=torch.long)


def paint(intensity: Tensor, ink: str, background: str) -> Tensor:
    """A 1 x H x W ink intensity -> a 3 x H x W image in [0, 1]."""
    i = torch.tensor(COLOURS[ink]).view(3, 1, 1)
    b = torch.tensor(COLOURS[background]).view(3, 1, 1)
    return b + (i - b) * intensity


PHOTO_SHORT_SIDE = 256  # photos are kept at this shorter side, so a crop is cheap


@functools.cache
def photo(name: str) -> Tensor:
    """A scikit-image sample photo as a float 3 x H x W tensor in [0, 1], its shorter side at 256 px."""
    from skimage import data

    arr = getattr(data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:  # immunohistochemistry and friends are uint8 already; be safe
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float() / 255.0
    h, w = x.shape[1:]
    scale = PHOTO_SHORT_SIDE / min(h, w)
    size = (round(h * scale), round(w * scale))
    x = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return x.clamp(0, 1)


def crop(image: Tensor, generator: torch.Generator, min_scale: float = 0.3) -> Tensor:
    """A random square crop (side a random fraction in [min_scale, 1] of the shorter side), maybe mirrored,
    resized (antialiased) to RESOLUTION."""
    _, h, w = image.shape
    short = min(h, w)
    u = torch.rand(4, generator=generator).tolist()
    side = max(8, int(short * (min_scale + (1 - min_scale) * u[0])))
    top, left = int((h - side) * u[1]), int((w - side) * u[2])
    x = image[:, top : top + side, left : left + side].unsqueeze(0)
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=True)
    x = x[0].clamp(0, 1)
    return x.flip(-1) if u[3] < 0.5 else x


class CaptionedImages(torch.utils.data.IterableDataset):
    """An endless, seeded stream of {"pixel_values": 3 x 32 x 32 in [-1, 1], "caption", "label"} samples:
    a fraction `digit_fraction` of coloured train digits (label 0-9), the rest photo crops (label -1).
    `photos` names the scikit-image photos used (default: PHOTOS, without the concepts' photos). A digit's
    caption names its colours with probability `colour_caption_p`."""

    def __init__(
        self,
        seed: int = 0,
        digit_fraction: float = 0.75,
        photos: dict[str, str] | None = None,
        colour_caption_p: float = 0.5,
        split: str = "train",
    ):
        super().__init__()
        self.seed = seed
        self.digit_fraction = digit_fraction
        self.photos = dict(PHOTOS if photos is None else photos)
        self.colour_caption_p = colour_caption_p
        self.split = split

    def sample(self, generator: torch.Generator) -> dict:
        if torch.rand(1, generator=generator).item() < self.digit_fraction or not self.photos:
            return self.digit(generator)
        names = list(self.photos)
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        return {"pixel_values": crop(photo(name), generator) * 2 - 1, "caption": self.photos[name], "label": -1}

    def digit(self, generator: torch.Generator) -> dict:
        x, y = digits_split(self.split)
        k = int(torch.randint(len(y), (1,), generator=generator))
        pairs = colour_pairs()
        ink, bg = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
        label = int(y[k])
        caption = digit_prompt(label)
        if torch.rand(1, generator=generator).item() < self.colour_caption_p:
            caption = f"{_a(ink)} handwritten digit {DIGIT_WORDS[label]} on {_a(bg)} background"
        return {"pixel_values": paint(x[k], ink, bg) * 2 - 1, "caption": caption, "label": label}

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(generator)

    def pool(self, count: int) -> dict:
        """The first `count` samples, stacked: pixel_values N x 3 x 32 x 32, captions (list), labels N."""
        stream = iter(self)
        return _stacked([next(stream) for _ in range(count)])

    def batches(self, batch_size: int):
        """Endless batches: pixel_values B x 3 x 32 x 32, captions (list), labels B (single process)."""
        stream = iter(self)
        while True:
            yield _stacked([next(stream) for _ in range(batch_size)])


def _stacked(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
        "caption": [i["caption"] for i in items],
        "label": torch.tensor([i["label"] for i in items]),
    }


def held_out_digits(seed: int = 0) -> dict:
    """The held-out digits, each painted in a seeded colour pair: pixel_values N x 3 x 32 x 32 in [-1, 1],
    labels N. The same images every call for a seed."""
    x, y = digits_split("test")
    generator = torch.Generator().manual_seed(seed)
    pairs = colour_pairs()
    picks = torch.randint(len(pairs), (len(y),), generator=generator).tolist()
    images = torch.stack([paint(x[k], *pairs[p]) for k, p in enumerate(picks)])
    return {"pixel_values": images * 2 - 1, "label": y}


def held_out_photos(count: int = 64, seed: int = 0, photos: dict[str, str] | None = None) -> Tensor:
    """`count` seeded crops of the photos (seen photos, other crops): N x 3 x 32 x 32 in [-1, 1]."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    names = list(PHOTOS if photos is None else photos)
    return torch.stack([crop(photo(names[k % len(names)]), generator) for k in range(count)]) * 2 - 1
