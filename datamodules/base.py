"""The task stream contract every datamodule keeps (`num_tasks`, `task_names`, `set_task`, a train
loader for the current task, one evaluation loader per task) and the class-incremental split."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from cli.errors import ConfigError
from cli.runtime import run_seed, seed_torch, step_seed


@dataclass(frozen=True)
class TaskStream:
    """What a model must know about the stream before it is built (the CLI links it from the data).

    `train_transform` / `eval_transform` map a batch of raw images (float in [0, 1]) to model inputs,
    with and without augmentation; methods apply them to what they replay from memory.

    `setting` says what a task brings. `"class"` (class-incremental, the default): task t brings
    `classes_per_task[t]` new classes, labelled with the next contiguous range. `"domain"` (domain-incremental,
    Mammoth's domain-IL, e.g. rotated digits): every task holds the same `classes_per_task[0]` classes,
    labelled 0..K-1, under a new input distribution; a task id then tells a classifier nothing, so there is
    no task-IL score.
    """

    task_names: tuple[str, ...]
    classes_per_task: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = ()
    train_transform: Callable[[Tensor], Tensor] | None = None
    eval_transform: Callable[[Tensor], Tensor] | None = None
    #: per-channel (mean, std) the transforms normalise with; None when inputs are not normalised
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    setting: Literal["class", "domain"] = "class"

    def __post_init__(self) -> None:
        if self.setting not in ("class", "domain"):
            raise ValueError(f"TaskStream.setting: {self.setting!r} is not one of 'class', 'domain'")
        if self.setting == "domain" and len(set(self.classes_per_task)) > 1:
            raise ValueError(f"a domain-incremental stream has the same classes in every task: {self.classes_per_task}")

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_classes(self) -> int:
        """Distinct classes over the whole stream (0 when it has no classes)."""
        if self.setting == "domain":
            return self.classes_per_task[0] if self.classes_per_task else 0
        return sum(self.classes_per_task)

    @property
    def class_offsets(self) -> tuple[int, ...]:
        """Classes known before task t, for t = 0..num_tasks: the running sum of `classes_per_task` in class-IL;
        0, then all of them, in domain-IL. Task t's classes are [class_offsets[t], class_offsets[t + 1]) in
        class-IL and all classes in domain-IL."""
        offsets = [0]
        for k in self.classes_per_task:
            offsets.append(k if self.setting == "domain" else offsets[-1] + k)
        return tuple(offsets)


def as_float_image(x: Tensor) -> Tensor:
    """uint8 images to float in [0, 1]; float images unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def apply_transform(transform: Callable[[Tensor], Tensor] | None, x: Tensor) -> Tensor:
    """`transform(x)` on x's device (a module transform is moved there first); identity for None."""
    if transform is None:
        return x
    if isinstance(transform, torch.nn.Module):
        transform.to(x.device)
    return transform(x)


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts (batches are dicts with named fields).
    `transform`, if given, maps one item's `x` (a single image, no batch dimension)."""

    def __init__(self, transform: Callable[[Tensor], Tensor] | None = None, **tensors: Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields have different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors
        self.transform = transform

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {k: v[i] for k, v in self.tensors.items()}
        if self.transform is not None:
            item["x"] = self.transform(item["x"])
        return item


class EpochShuffleSampler(DistributedSampler):
    """Training sampler: a permutation drawn from (seed, epoch) alone, sharded over ranks.

    Owning the shuffle (instead of the global RNG) makes a resumed run see the same batches as an
    uninterrupted one. With `num_samples_per_epoch` set, an epoch is that many draws (permutations
    are chained), which is how `steps_per_task` makes one epoch equal one task. `start` skips this
    rank's first `start` indices of the epoch (a run resumed mid-epoch); the length stays the whole
    epoch's, so the batch count Lightning expects is unchanged.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, total: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.total_size = math.ceil((total or n) / num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas
        self.start = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        chunks = [torch.randperm(n, generator=g) for _ in range(math.ceil(self.total_size / n))]
        indices = torch.cat(chunks)[: self.total_size]
        return iter(indices[self.rank :: self.num_replicas][self.start :].tolist())


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch through Lightning's loader `state_dict` protocol.

    Its state is where the epoch stands: `position()` gives the batches the fit loop has trained in the
    current epoch (Lightning's own count, so batches prefetched but not trained do not count) and whether
    the epoch is over. Loading a mid-epoch state makes the sampler skip those batches, so the resumed run
    trains on exactly the batches the uninterrupted one would have.
    """

    def __init__(self, *args, position: Callable[[], dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict:
        return {**self.position(), "batch_size": self.batch_size, "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch_done", True) or not state.get("batches"):
            return
        here = {"batch_size": self.batch_size, "world_size": self.sampler.num_replicas}
        changed = {k: (state[k], v) for k, v in here.items() if state.get(k) != v}
        if changed:
            saved = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items())
            raise ConfigError(
                f"--ckpt_path: the checkpoint stopped mid-epoch with {saved}; resume it with the same "
                "data.batch_size and devices, or from a checkpoint written at an epoch end"
            )
        self.sampler.start = int(state["batches"]) * self.batch_size


class UnpaddedShardSampler(DistributedSampler):
    """Evaluation sampler: rank r takes items r, r+W, r+2W, ... in order; no item repeated, none missed,
    so counts summed over ranks are exactly the counts of the whole set."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


class ContinualDataModule(L.LightningDataModule):
    """A stream of tasks. Subclasses provide `task_names`, `train_dataset(t)` and `eval_dataset(t)`.

    The task-switch callback calls `set_task(t)` at each boundary; `train_dataloader()` then serves
    task t (or tasks 0..t with `train_on: seen`, the cumulative joint upper bound; or every task with
    `train_on: all`, multitask training, e.g. a robot policy's pretraining with `stop_after_task: 1`), while
    `eval_dataloaders()` always serves every task.

    Evaluation datasets yield model-ready inputs. Training datasets may yield raw images instead:
    with a `train_transform`, each training batch is augmented on its device after transfer
    (`x`), and the raw images are kept as `x_raw` for the replay memories (as Mammoth does).

    Loader options: `num_workers` loader processes; `pin_memory` page-locks host batches for faster copies
    to a GPU (default: on when training on CUDA). Loaders are rebuilt every epoch (the task may change), so
    persistent workers would not outlive one epoch and are not offered.
    """

    #: batch of raw float images in [0, 1] -> augmented model inputs (None: train items are ready)
    train_transform: Callable[[Tensor], Tensor] | None = None
    #: batch of raw float images in [0, 1] -> model inputs without augmentation
    eval_transform: Callable[[Tensor], Tensor] | None = None

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        train_on: Literal["current", "seen", "all"] = "current",
        seed: int | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        for option, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1)):
            if value < least:
                raise ConfigError(f"data.{option} must be at least {least}, got {value}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be 0 (load in the main process) or more, got {num_workers}")
        if train_on not in ("current", "seen", "all"):
            raise ConfigError(f"data.train_on: {train_on!r} is not one of 'current', 'seen', 'all'")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_on = train_on
        self.seed = seed
        self.current_task = 0
        # Set by the task-switch callback in `steps_per_task` mode: an epoch is exactly this many batches.
        self.train_batches_per_epoch: int | None = None

    # -- the stream ---------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def stream(self) -> TaskStream:
        return TaskStream(task_names=tuple(self.task_names))

    def train_dataset(self, task_id: int) -> Dataset:
        raise NotImplementedError

    def eval_dataset(self, task_id: int) -> Dataset:
        raise NotImplementedError

    def held_out_dataset(self, task_id: int) -> Dataset | None:
        """Evaluation items of task `task_id` disjoint from `eval_dataset`'s, to choose among a task's curve
        points without looking at what the matrix reports (`continual_metrics.curve_on: held_out`); None
        where the data has none."""
        return None

    def no_held_out(self) -> str:
        """The line that refuses held-out curve points on data without `held_out_dataset`."""
        return (
            "continual_metrics.curve_on: held_out needs evaluation items apart from the reported ones, which "
            f"{type(self).__name__} does not have; use curve_on: eval"
        )

    def set_task(self, task_id: int) -> None:
        if not 0 <= task_id < self.num_tasks:
            raise ConfigError(f"task {task_id} does not exist: this stream has tasks 0..{self.num_tasks - 1}")
        self.current_task = task_id

    # -- loaders ------------------------------------------------------------------------------
    def _pin(self) -> bool:
        """Page-locked host batches (faster copies to a GPU): `pin_memory`, or by default when training on CUDA."""
        if self.pin_memory is not None:
            return self.pin_memory
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        t = self.current_task
        tasks = {"current": [t], "seen": range(t + 1), "all": range(self.num_tasks)}[self.train_on]
        dataset = ConcatDataset([self.train_dataset(i) for i in tasks])
        rank, world = self._world()
        total = None
        if self.train_batches_per_epoch is not None:
            total = self.train_batches_per_epoch * self.batch_size * world
        sampler = EpochShuffleSampler(
            dataset, world, rank, seed=run_seed() if self.seed is None else self.seed, total=total
        )
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self._pin(),
            position=self._train_position,
        )

    def _train_position(self) -> dict:
        """Where the fit loop stands in the current epoch: batches trained so far, and whether the epoch is
        over (a checkpoint written in `on_train_epoch_end`), for `ResumableLoader.state_dict`."""
        trainer = self.trainer
        if trainer is None:
            return {"epoch": 0, "batches": 0, "epoch_done": True}
        loop = trainer.fit_loop
        return {
            "epoch": trainer.current_epoch,
            "batches": loop.epoch_loop.batch_progress.current.processed,
            "epoch_done": loop.epoch_progress.current.processed > loop.epoch_progress.current.completed,
        }

    def eval_dataloaders(self, held_out: bool = False) -> list[DataLoader]:
        """One loader per task, sharded over ranks without padding; `held_out`: of `held_out_dataset`."""
        rank, world = self._world()
        loaders = []
        for j in range(self.num_tasks):
            ds = self.held_out_dataset(j) if held_out else self.eval_dataset(j)
            if ds is None:
                raise ConfigError(self.no_held_out())
            loaders.append(
                DataLoader(
                    ds,
                    batch_size=self.eval_batch_size,
                    sampler=UnpaddedShardSampler(ds, world, rank),
                    num_workers=self.num_workers,
                    pin_memory=self._pin(),
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_dataloaders()

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """Seeds the global RNG for this training step, then augments the batch on its device;
        evaluation batches pass unchanged.

        The random draws of a step (augmentation here, noise in the method's step) thus depend on the
        run seed, the step and the rank only, not on how many loaders were built before: a resumed
        run draws exactly what the uninterrupted one did.
        """
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        seed = run_seed() if self.seed is None else self.seed
        seed_torch(step_seed(seed, trainer.global_step, trainer.global_rank))
        if self.train_transform is None:
            return batch
        raw = as_float_image(batch["x"])
        return {**batch, "x_raw": raw, "x": apply_transform(self.train_transform, raw)}

    def state_dict(self) -> dict:
        return {"task": self.current_task}

    def load_state_dict(self, state_dict: dict) -> None:
        self.set_task(int(state_dict["task"]))


class ClassIncrementalDataModule(ContinualDataModule):
    """Splits a labelled set into tasks of consecutive classes of `class_order`.

    Labels are renumbered to their position in `class_order`, so task t owns the contiguous label
    range [sum(classes_per_task[:t]), sum(classes_per_task[:t+1])); the model masks by that range
    for task-IL predictions and by the classes seen so far for class-IL ones (Mammoth's convention).
    Subclasses call `_split(train_x, train_y, test_x, test_y)` once their arrays are loaded.
    """

    def __init__(self, num_tasks: int, class_order: Sequence[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._requested_tasks = num_tasks
        self.class_order = list(class_order) if class_order is not None else None
        self._train: list[Dataset] = []
        self._eval: list[Dataset] = []

    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _check_split(self, num_classes: int) -> list[int]:
        order = self.class_order if self.class_order is not None else list(range(num_classes))
        if sorted(order) != list(range(num_classes)):
            raise ConfigError(f"data.class_order must be a permutation of 0..{num_classes - 1}, got {self.class_order}")
        t = self._requested_tasks
        if t < 1 or num_classes % t:
            divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
            raise ConfigError(
                f"data.num_tasks={t}: {num_classes} classes do not split into {t} tasks of equal size; "
                f"choose one of {divisors}"
            )
        return order

    @property
    def task_names(self) -> list[str]:
        order = self._check_split(self.num_classes)
        k = self.num_classes // self._requested_tasks
        return ["classes " + ",".join(str(c) for c in order[i * k : (i + 1) * k]) for i in range(self._requested_tasks)]

    @property
    def classes_per_task(self) -> tuple[int, ...]:
        return (self.num_classes // self._requested_tasks,) * self._requested_tasks

    @property
    def stream(self) -> TaskStream:
        return TaskStream(
            tuple(self.task_names),
            self.classes_per_task,
            tuple(self.input_shape),
            self.train_transform,
            self.eval_transform,
            self.normalization,
        )

    def _eval_item(self, x: Tensor) -> Tensor:
        """One raw evaluation image -> model input (the eval transform, applied per item)."""
        return apply_transform(self.eval_transform, as_float_image(x).unsqueeze(0)).squeeze(0)

    def _split(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
        order = self._check_split(self.num_classes)
        position = torch.empty(self.num_classes, dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(self.num_classes)
        k = self.num_classes // self._requested_tasks
        self._train, self._eval = [], []
        for x, y, out, transform in (
            (train_x, train_y, self._train, None),
            (test_x, test_y, self._eval, self._eval_item if self.eval_transform is not None else None),
        ):
            label = position[y]
            for t in range(self._requested_tasks):
                keep = (label >= t * k) & (label < (t + 1) * k)
                n = int(keep.sum())
                out.append(TensorDictDataset(transform, x=x[keep], y=label[keep], task=torch.full((n,), t)))

    def train_dataset(self, task_id: int) -> Dataset:
        return self._train[task_id]

    def eval_dataset(self, task_id: int) -> Dataset:
        return self._eval[task_id]
