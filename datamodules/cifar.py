"""Split-CIFAR-10 (5 tasks x 2 classes) and Split-CIFAR-100 (10 x 10), read from the CIFAR "python
version" files under `root`, with Mammoth's augmentation (random 32x32 crop with 4 pixels of
padding, horizontal flip) and per-dataset normalisation, applied batch-wise with kornia."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cli.errors import ConfigError
from datamodules.images import ImageClassIncremental, torchvision_datasets
from datamodules.restricted_pickle import load_restricted


def read_cifar_batch(path: Path, label_key: str, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """One pickled CIFAR batch: uint8 images [N, 3, 32, 32] and int64 labels. Read without running code:
    a file that names any class or function beyond numpy's arrays is refused (`load_restricted`)."""
    try:
        raw = load_restricted(path, encoding="bytes")
        raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        data = np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(raw[label_key], dtype=np.int64)
    except KeyError as err:
        raise ConfigError(
            f"{path}: not a CIFAR python batch (no {err} entry); re-extract the dataset archive"
        ) from None
    except (OSError, pickle.UnpicklingError, ValueError, EOFError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a CIFAR python batch ({err}); re-extract the dataset archive") from None
    if len(data) != len(labels):
        raise ConfigError(f"{path}: {len(data)} images but {len(labels)} labels; re-extract the dataset archive")
    if num_classes is not None and len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ConfigError(f"{path}: label {bad} is outside 0..{num_classes - 1}; re-extract the dataset archive")
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


class _SplitCIFAR(ImageClassIncremental):
    input_shape = (3, 32, 32)
    folder = ""
    archive = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key = ""
    torchvision_class = ""  # the torchvision dataset class that can download these files

    def is_present(self) -> bool:
        return (self.root / self.folder).is_dir()

    def fetch(self) -> None:
        getattr(torchvision_datasets(), self.torchvision_class)(str(self.root), train=True, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        folder = self.root / self.folder
        for name in self.train_files + self.test_files:
            if not (folder / name).is_file():
                raise ConfigError(
                    f"data.root: {folder / name} not found; extract {self.archive} into {self.root} "
                    f"(it creates {self.folder}/), or set data.init_args.download: true"
                )
        train = [read_cifar_batch(folder / n, self.label_key, self.num_classes) for n in self.train_files]
        test = [read_cifar_batch(folder / n, self.label_key, self.num_classes) for n in self.test_files]
        self._split(
            torch.cat([x for x, _ in train]),
            torch.cat([y for _, y in train]),
            torch.cat([x for x, _ in test]),
            torch.cat([y for _, y in test]),
        )


class SplitCIFAR10(_SplitCIFAR):
    """`root/cifar-10-batches-py/{data_batch_1..5, test_batch}`; 5 tasks of 2 classes by default."""

    num_classes = 10
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2615)
    torchvision_class = "CIFAR10"


class SplitCIFAR100(_SplitCIFAR):
    """`root/cifar-100-python/{train, test}` with the 100 fine labels; 10 tasks of 10 classes by default."""

    num_classes = 100
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
    torchvision_class = "CIFAR100"

    def __init__(self, root: str = "data", num_tasks: int = 10, **kwargs):
        super().__init__(root=root, num_tasks=num_tasks, **kwargs)
