"""A backbone with one linear head over all classes of the stream, scored class-IL and task-IL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cli.errors import ConfigError
from cli.runtime import run_seed
from datamodules.base import apply_transform, as_float_image
from lightning_modules.base import ContinualModule
from lightning_modules.nn.backbones import build_backbone
from lightning_modules.nn.buffer import ReservoirBuffer
from lightning_modules.nn.init import check_init, initialise


class ClassIncrementalModule(ContinualModule):
    """Base of the classification methods: `self(x)` gives logits over every class of the stream.

    Class-IL prediction: arg-max over the classes of tasks 0..current. Task-IL prediction for task j:
    arg-max over task j's classes only. The head is allocated for all classes up front, so nothing
    grows during the stream (DDP keeps one gradient reducer for the whole run).

    A domain-incremental stream (`stream.setting == "domain"`) has the same K classes in every task: the head
    has K outputs, every task's label range is all of them, every class is seen from task 0 and past from
    task 1 (so LwF distils all of them), and `eval_step` scores `accuracy` only (arg-max over the K classes;
    a task-IL score would be the same number).

    `head_init` (a scheme of `lightning_modules.nn.init`): null takes the backbone's own `init` (the MLP's
    `xavier_uniform`, Mammoth's classifier included), or PyTorch's default `kaiming_uniform` for backbones
    without one (the ViTs).
    """

    def __init__(
        self,
        backbone: str = "mlp",
        backbone_args: dict[str, Any] | None = None,
        head_init: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not self.stream.classes_per_task:
            raise ConfigError(f"{type(self).__name__} needs a class-incremental datamodule (one with classes_per_task)")
        self.backbone = build_backbone(
            backbone, self.stream.input_shape, input_stats=self.stream.normalization, **(backbone_args or {})
        )
        self.head = nn.Linear(self.backbone.out_features, self.stream.num_classes)
        if head_init is None:
            head_init = getattr(self.backbone, "init", "kaiming_uniform")
        if check_init(head_init, "model.head_init") != "kaiming_uniform":  # nn.Linear was built with that one
            initialise(self.head, head_init)
        self.class_offsets = list(self.stream.class_offsets)  # classes known before task t
        self.domain_incremental = self.stream.setting == "domain"

    cheap_evaluation = True

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def compute_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def network(self) -> nn.Module:
        """The live network (backbone then head) as one module, e.g. for snapshots."""
        return nn.Sequential(self.backbone, self.head)

    @property
    def seen_classes(self) -> int:
        """Number of classes of tasks 0..current (0..t inside `evaluating_ahead(t)`; all of them in domain-IL)."""
        return self.class_offsets[max(self.current_task, getattr(self, "_ahead", -1)) + 1]

    @contextmanager
    def evaluating_ahead(self, task_id: int) -> Iterator[None]:
        self._ahead = task_id
        try:
            yield
        finally:
            self._ahead = -1

    @property
    def past_classes(self) -> int:
        """Number of classes of tasks before the current one (domain-IL: none in task 0, all from task 1)."""
        return self.class_offsets[self.current_task]

    def augment(self, x_raw: Tensor) -> Tensor:
        """Raw images (as stored in memories) -> augmented model inputs, as the data augments them."""
        return apply_transform(self.stream.train_transform, x_raw)

    def model_input(self, x_raw: Tensor) -> Tensor:
        """Raw images -> model inputs without augmentation."""
        return apply_transform(self.stream.eval_transform, x_raw)

    def task_batches(
        self, task_id: int, augment: bool, batch_size: int = 256, shuffle_seed: int | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """Task `task_id`'s training set on this module's device, as model inputs (`x`, augmented or not) plus
        the raw images (`x_raw`): for passes at task boundaries (Fisher, herding, LwF's warm-up). In order, or
        shuffled by `shuffle_seed` (the same order on every rank)."""
        dataset = self.trainer.datamodule.train_dataset(task_id)
        generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator):
            raw = as_float_image(batch["x"].to(self.device))
            yield {
                **batch,
                "y": batch["y"].to(self.device),
                "x_raw": raw,
                "x": (self.augment if augment else self.model_input)(raw),
            }

    def task_classes(self, task_id: int) -> tuple[int, int]:
        """[start, end) label range of task `task_id` (all classes in domain-IL)."""
        if self.domain_incremental:
            return 0, self.stream.num_classes
        return self.class_offsets[task_id], self.class_offsets[task_id + 1]

    def class_scores(self, x: Tensor) -> Tensor:
        """One score per class, higher meaning more likely: the logits (iCaRL uses class-mean distances)."""
        return self(x)

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        scores = self.class_scores(batch["x"])
        start, end = self.task_classes(task_id)
        class_il = scores[:, : self.seen_classes].argmax(dim=1)
        y = batch["y"]
        if self.domain_incremental:  # domain-IL accuracy; task-IL would mask nothing
            return {"accuracy": (class_il == y).float()}
        task_il = scores[:, start:end].argmax(dim=1) + start
        return {"accuracy": (class_il == y).float(), "task_il_accuracy": (task_il == y).float()}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.class_scores(batch["x"])[:, : self.seen_classes].argmax(dim=1)


class ReplayModule(ClassIncrementalModule):
    """A classifier with a reservoir memory (ER, DER, DER++).

    Args:
        buffer_size: the memory budget of the whole run; under DDP each of W ranks keeps
            ceil(buffer_size / W) examples of its own data shard, so the budget does not grow with
            the number of processes.
        minibatch_size: examples replayed per step and per device (default: the batch size).
    """

    def __init__(self, buffer_size: int = 200, minibatch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if minibatch_size is not None and minibatch_size < 1:
            raise ConfigError(
                f"model.minibatch_size must be at least 1 (or null for the batch size), got {minibatch_size}"
            )
        self.buffer_size = buffer_size
        self.minibatch_size = minibatch_size
        self.buffer = ReservoirBuffer(buffer_size)

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        self.buffer = ReservoirBuffer(-(-self.buffer_size // world), seed=run_seed() + self.global_rank)

    def replay(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A memory batch drawn uniformly (minibatch_size, or the current batch size, examples);
        the stored raw images are augmented afresh, like the current batch."""
        memory = self.buffer.sample(self.minibatch_size or len(batch["x"]), device=batch["x"].device)
        return {**memory, "x": self.augment(memory["x"])}

    def remember(self, batch: dict[str, Tensor], **extra: Tensor) -> None:
        """Offers the current batch's raw images (and `extra` fields) to the memory."""
        self.buffer.add(x=batch.get("x_raw", batch["x"]), y=batch["y"], task=batch["task"], **extra)

    def rank_local_state(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_rank_local_state(self, state: dict) -> None:
        # Evaluation never replays, and may run on another number of devices than training did.
        trainer = getattr(self, "_trainer", None)
        if "buffer" in state and (trainer is None or trainer.state.fn == "fit"):
            self.buffer.load_state_dict(state["buffer"], device=self.device)
