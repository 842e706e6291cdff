"""A backbone with one linear head over all classes of the stream, scored class-IL and task-IL."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.base import ContinualModule
from lightning_modules.nn.backbones import build_backbone


class ClassIncrementalModule(ContinualModule):
    """Base of the classification methods: `self(x)` gives logits over every class of the stream.

    Class-IL prediction: arg-max over the classes of tasks 0..current. Task-IL prediction for task j:
    arg-max over task j's classes only. The head is allocated for all classes up front, so nothing
    grows during the stream (DDP keeps one gradient reducer for the whole run).
    """

    def __init__(self, backbone: str = "mlp", backbone_args: dict[str, Any] | None = None, **kwargs):
        super().__init__(**kwargs)
        if not self.stream.classes_per_task:
            raise ConfigError(f"{type(self).__name__} needs a class-incremental datamodule (one with classes_per_task)")
        self.backbone = build_backbone(backbone, self.stream.input_shape, **(backbone_args or {}))
        self.head = nn.Linear(self.backbone.out_features, sum(self.stream.classes_per_task))
        self.class_offsets = [0]
        for k in self.stream.classes_per_task:
            self.class_offsets.append(self.class_offsets[-1] + k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def task_classes(self, task_id: int) -> tuple[int, int]:
        """[start, end) label range of task `task_id`."""
        return self.class_offsets[task_id], self.class_offsets[task_id + 1]

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        logits = self(batch["x"])
        seen = self.class_offsets[self.current_task + 1]
        start, end = self.task_classes(task_id)
        class_il = logits[:, :seen].argmax(dim=1)
        task_il = logits[:, start:end].argmax(dim=1) + start
        y = batch["y"]
        return {"accuracy": (class_il == y).float(), "task_il_accuracy": (task_il == y).float()}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch["x"])[:, : self.class_offsets[self.current_task + 1]].argmax(dim=1)
