"""Split-Digits: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package),
class-incremental, 5 tasks of 2 classes by default. Needs no download, so it is the embedded
default for demos and tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from cli.errors import ConfigError
from datamodules.base import ClassIncrementalDataModule


def digits_split(test_fraction: float, split_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as (1, 8, 8) floats in [0, 1] with labels, split stratified by class into train and test by
    `split_seed`: (train_x, train_y, test_x, test_y), the same for every run and every method."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, stratify=y.numpy(), random_state=split_seed
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class SplitDigits(ClassIncrementalDataModule):
    """Digits scaled to [0, 1]; a stratified train/test split fixed by `split_seed` (not the run seed),
    so every run and every method is scored on the same test images."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        num_tasks: int = 5,
        class_order: Sequence[int] | None = None,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(num_tasks=num_tasks, class_order=class_order, **kwargs)
        if not 0 < test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._check_split(self.num_classes)  # fail at construction, before any training

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        self._split(*digits_split(self.test_fraction, self.split_seed))
