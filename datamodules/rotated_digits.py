"""Rotated-Digits: scikit-learn's 8x8 digits, domain-incremental (the small sibling of Mammoth's rot-mnist).

Every task holds all 10 classes and all the images; task t shows them, train and test alike, rotated by one
angle of its own, drawn uniformly in [0, 180) degrees (counter-clockwise) as rot-mnist draws one rotation per
task. As in rot-mnist, each task trains on the whole training set (rotated), not on a disjoint share, and is
scored on the whole test set under the same rotation. The rotated images are computed once at setup
(bilinear, zeros outside; rot-mnist rotates PIL images with torchvision's default, nearest), so training reads
plain tensors. 20 tasks as in rot-mnist: an 8x8 digit keeps 98.7% of its ink at 45 degrees (the corners
are cut), and a linear classifier trained and tested at one angle scores 95.5% there against 96.7% at 0.
"""

from __future__ import annotations

import math

import kornia
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cli.errors import ConfigError
from datamodules.base import ContinualDataModule, TaskStream, TensorDictDataset
from datamodules.split_digits import digits_split


def rotation_angles(num_tasks: int, seed: int) -> list[float]:
    """One angle per task, uniform in [0, 180) degrees, from a generator seeded by `seed` alone; drawn one
    at a time, so task t's angle does not depend on how many tasks the stream has."""
    g = torch.Generator().manual_seed(seed)
    return [180.0 * float(torch.rand((), generator=g, dtype=torch.float64)) for _ in range(num_tasks)]


def rotate(images: Tensor, degrees: float) -> Tensor:
    """A batch of (N, C, H, W) images rotated counter-clockwise by `degrees` about their centre (bilinear,
    zeros where the rotated image has no source pixel); an angle of 0 returns the images unchanged."""
    if degrees % 360 == 0:
        return images
    angle = torch.full((len(images),), float(degrees), dtype=images.dtype)
    return kornia.geometry.transform.rotate(images, angle, mode="bilinear", padding_mode="zeros", align_corners=True)


class RotatedDigits(ContinualDataModule):
    """Digits scaled to [0, 1] with SplitDigits' stratified train/test split fixed by `split_seed`; task t
    rotates every image by `angles[t]` degrees.

    Args:
        num_tasks: rotations in the stream (rot-mnist: 20).
        angles: one angle in degrees per task (null: drawn from `rotation_seed`, uniform in [0, 180)).
        rotation_seed: seeds the angles (not the run seed), so every run and method sees the same tasks.
        test_fraction, split_seed: as SplitDigits.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        num_tasks: int = 20,
        angles: list[float] | None = None,
        rotation_seed: int = 0,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_tasks < 1:
            raise ConfigError(f"data.num_tasks must be at least 1 (one rotation per task), got {num_tasks}")
        if angles is not None:
            if len(angles) != num_tasks:
                raise ConfigError(
                    f"data.angles has {len(angles)} angles for data.num_tasks={num_tasks}: give one angle per task, "
                    "or null to draw them from data.rotation_seed"
                )
            if not all(math.isfinite(a) for a in angles):
                raise ConfigError(f"data.angles must be finite numbers of degrees, got {list(angles)}")
        if not 0 < test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
        self.angles = [float(a) for a in angles] if angles is not None else rotation_angles(num_tasks, rotation_seed)
        self.rotation_seed = rotation_seed
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._train: list[Dataset] = []
        self._eval: list[Dataset] = []

    @property
    def task_names(self) -> list[str]:
        return [f"rotation {a:.1f} deg" for a in self.angles]

    @property
    def stream(self) -> TaskStream:
        k = self.num_classes
        return TaskStream(tuple(self.task_names), (k,) * self.num_tasks, tuple(self.input_shape), setting="domain")

    def setup(self, stage: str | None = None) -> None:
        if self._train:
            return
        train_x, train_y, test_x, test_y = digits_split(self.test_fraction, self.split_seed)
        for t, angle in enumerate(self.angles):
            for x, y, out in ((train_x, train_y, self._train), (test_x, test_y, self._eval)):
                images = rotate(x, angle).contiguous()
                out.append(TensorDictDataset(x=images, y=y, task=torch.full((len(y),), t)))

    def train_dataset(self, task_id: int) -> Dataset:
        return self._train[task_id]

    def eval_dataset(self, task_id: int) -> Dataset:
        return self._eval[task_id]
