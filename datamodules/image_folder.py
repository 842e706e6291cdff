"""Any labelled image collection in the ImageFolder layout (`root/<split>/<class>/<image>`), split
into tasks of consecutive classes: a user's own dataset needs no code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cli.errors import ConfigError
from datamodules.images import ImageClassIncremental

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_image_folder(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted subfolders, or the given ones), image paths and their labels."""
    if not folder.is_dir():
        raise ConfigError(f"data.root: {folder} not found; put one subfolder of images per class there")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    elif unknown := sorted(set(found) - set(classes)):
        raise ConfigError(f"{folder}: classes {unknown[:5]} are not in the training split; rename or remove them")
    if not found:
        raise ConfigError(f"{folder}: no class subfolders; put one subfolder of images per class there")
    files, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        images = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if sub.is_dir() else []
        if not images:  # a class without images would silently shrink (or empty) its task
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ConfigError(f"{sub}: no images ({kinds}) of class {name!r}; add them or remove the class everywhere")
        files += images
        labels += [label] * len(images)
    return list(classes), files, labels


class SplitImageFolder(ImageClassIncremental):
    """`root/<train_split>/<class>/*.png|jpg|...` and `root/<test_split>/<class>/...`; labels follow the
    sorted class folder names of the training split. Images are decoded into memory at setup; with
    `image_size` [H, W] each is resized to it, otherwise all must share one size.

    Args:
        mean, std: the normalisation (default ImageNet's).
    """

    def __init__(
        self,
        root: str = "data",
        num_tasks: int = 5,
        class_order: Sequence[int] | None = None,
        train_split: str = "train",
        test_split: str = "test",
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(root=root, num_tasks=num_tasks, class_order=class_order, **kwargs)
        self.train_split, self.test_split = train_split, test_split
        self._set_geometry(image_size, mean, std)
        # The stream (classes, input size) is known once the folder is listed: list it now, decode later.
        self.classes, self._train_files, self._train_labels = list_image_folder(self.root / train_split)
        self._adopt_classes(len(self.classes), self._train_files[0], str(self._train_files[0]))

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        _, test_files, test_labels = list_image_folder(self.root / self.test_split, self.classes)
        self._split_encoded(self._train_files, self._train_labels, test_files, test_labels)
