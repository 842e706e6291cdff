"""What every image benchmark shares: a `root` folder, an optional torchvision download, and Mammoth's
training augmentation (random crop with 4 pixels of padding, horizontal flip) and per-dataset
normalisation, applied batch-wise on the device with kornia."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from torch import Tensor

from cli.errors import ConfigError
from datamodules.base import ClassIncrementalDataModule


class ImageClassIncremental(ClassIncrementalDataModule):
    """Base of the image benchmarks. Subclasses set `mean`, `std` and `input_shape` (C, H, W) and read
    their files in `setup` into uint8 tensors for `_split`; `prepare_data` downloads when asked to."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    crop_padding = 4
    _resize: tuple[int, int] | None = None  # (H, W) every image is resized to when decoded; None: keep

    def __init__(self, root: str = "data", num_tasks: int = 5, download: bool = False, **kwargs):
        super().__init__(num_tasks=num_tasks, **kwargs)
        self.root = Path(root)
        self.download = download
        if self.num_classes:  # a fixed benchmark: check the split now, before any model is built
            self._check_split(self.num_classes)
            self.build_transforms()

    def _set_geometry(self, image_size: Sequence[int] | None, mean: Sequence[float], std: Sequence[float]) -> None:
        """The user's `image_size` ([H, W] or None: keep each image's) and normalisation, checked."""
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ConfigError(f"data.image_size must be [height, width] of at least 1 pixel, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"data.mean and data.std need 3 values and std > 0 (it divides), got {mean}, {std}")
        self._resize = tuple(image_size) if image_size is not None else None
        self.mean, self.std = tuple(mean), tuple(std)

    def build_transforms(self) -> None:
        """Sets the kornia transforms (and the stream's `normalization`) from `input_shape`, `mean`, `std`."""
        size = tuple(self.input_shape[1:])
        self.normalization = (tuple(self.mean), tuple(self.std))
        normalize = K.Normalize(mean=torch.tensor(self.mean), std=torch.tensor(self.std))
        self.train_transform = K.AugmentationSequential(
            K.RandomCrop(size, padding=self.crop_padding), K.RandomHorizontalFlip(), normalize
        )
        self.eval_transform = normalize

    def _adopt_classes(self, num_classes: int, first_image: bytes | Path, first_name: str) -> None:
        """Completes the stream of a set known once its files are listed: checks the class split, takes the
        input size from `_resize` (the user's `image_size`) or else from the first image, builds the transforms."""
        self.num_classes = num_classes
        self._check_split(num_classes)
        size = self._resize or tuple(decode_images([first_image], None, [first_name]).shape[2:])
        self.input_shape = (3, *size)
        self.build_transforms()

    def _split_encoded(
        self,
        train: Sequence[bytes | Path],
        train_y: Sequence[int],
        test: Sequence[bytes | Path],
        test_y: Sequence[int],
        names: tuple[Sequence[str] | None, Sequence[str] | None] = (None, None),
    ) -> None:
        """Decodes both splits (resized to `_resize` if set; else all must share one size) and splits them
        into tasks."""
        self._split(
            decode_images(train, self._resize, names[0]),
            torch.tensor(train_y),
            decode_images(test, self._resize, names[1]),
            torch.tensor(test_y),
        )

    def prepare_data(self) -> None:
        if self.download and not self.is_present():
            self.fetch()

    def is_present(self) -> bool:
        """Whether the files `setup` reads are under `root`."""
        return True

    def fetch(self) -> None:
        """Downloads the files into `root` (torchvision's downloader)."""
        raise ConfigError(f"data.download: {type(self).__name__} cannot download; put the files under {self.root}")


def torchvision_datasets():
    """torchvision.datasets, or one line saying why it cannot download here."""
    try:
        from torchvision import datasets
    except Exception as err:  # missing, or a build that does not match this torch
        raise ConfigError(
            f"data.download: torchvision could not be imported ({type(err).__name__}); install a torchvision built "
            "for your torch, or put the extracted files under data.root yourself"
        ) from None
    return datasets


def decode_images(
    blobs: Sequence[bytes | Path], size: tuple[int, int] | None, names: Sequence[str] | None = None
) -> Tensor:
    """Encoded images (bytes or files) -> uint8 [N, 3, H, W]. With `size` (H, W) every image is resized
    to it (bilinear); without, all must already share one size. Errors name image i as `names[i]`
    (default: its path)."""
    from PIL import Image, UnidentifiedImageError

    out = None
    for i, blob in enumerate(blobs):
        where = names[i] if names is not None else str(blob)
        try:
            with Image.open(io.BytesIO(blob) if isinstance(blob, bytes) else blob) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.array(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise ConfigError(f"{where}: not a readable image ({err}); remove or replace it") from None
        if out is None:
            out = torch.empty((len(blobs), 3, *arr.shape[:2]), dtype=torch.uint8)
        if tuple(arr.shape[:2]) != tuple(out.shape[2:]):
            raise ConfigError(
                f"{where}: image is {arr.shape[1]}x{arr.shape[0]} but earlier ones are "
                f"{out.shape[3]}x{out.shape[2]}; set data.init_args.image_size to resize them all"
            )
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)
    if out is None:
        raise ValueError("decode_images: no images given")
    return out
