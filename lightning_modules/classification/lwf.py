"""Learning without Forgetting (Li & Hoiem, 2017; Mammoth's `lwf`): a snapshot of the network taken at
each task start supplies soft targets on the past classes:
loss = CE(f(x)[:seen], y) + alpha * H(soft(old(x)[:past] / T), soft(f(x)[:past] / T))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.errors import ConfigError
from cli.runtime import run_seed, step_seed
from lightning_modules.classification.base import ClassIncrementalModule
from lightning_modules.nn.frozen import FrozenCopy


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy between the teacher's and the student's temperature-softened distributions
    (Mammoth's `modified_kl_div` of `smooth`ed softmaxes; it differs from the KL by the teacher's entropy)."""
    target = (teacher_logits / temperature).softmax(dim=1)
    return -(target * (student_logits / temperature).log_softmax(dim=1)).sum(dim=1).mean()


class LwF(ClassIncrementalModule):
    """Args:
    alpha: distillation weight (Mammoth, S-CIFAR-10: 3).
    temperature: softening T (2).
    warmup_epochs: Mammoth's classifier warm-up: at the start of every task but the first, this many epochs
        over the task's training data (shuffled, augmented, the data's batch size) train the head alone, with
        the configured optimizer, on the new classes' logits, the backbone frozen and in eval mode; the old
        network is snapshotted after it. 0 (default) skips it, as this suite always has; Mammoth runs it for
        its `n_epochs` (set it to `task_switch.epochs_per_task` to reproduce Mammoth).
    """

    def __init__(self, alpha: float = 3.0, temperature: float = 2.0, warmup_epochs: int = 0, **kwargs):
        super().__init__(**kwargs)
        if warmup_epochs < 0:
            raise ConfigError(f"model.warmup_epochs must be 0 (no warm-up) or more, got {warmup_epochs}")
        if warmup_epochs and self.stream.setting == "domain":
            raise ConfigError("model.warmup_epochs: a domain-incremental stream has no new classes to warm up; use 0")
        self.alpha = alpha
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.old = FrozenCopy(self.network())

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        if task_id > 0 and self.warmup_epochs:
            self.warm_up_head(task_id)
        self.old.load_from(self.network())

    @torch.enable_grad()
    def warm_up_head(self, task_id: int) -> None:
        """Cross-entropy of the new classes' logits, training the head only (Mammoth's `begin_task` of `lwf`).

        The shuffle and the augmentation draws come from (run seed, task, epoch) alone, so every DDP rank
        ends with the same head."""
        past, seen = self.past_classes, self.seen_classes
        optimizer = self.build_optimizer(self.head.parameters())
        was_training = self.training
        self.eval()
        batch_size = self.trainer.datamodule.batch_size
        for epoch in range(self.warmup_epochs):
            seed = step_seed(run_seed(), task_id * 1_000 + epoch, 0)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                for batch in self.task_batches(task_id, augment=True, batch_size=batch_size, shuffle_seed=seed):
                    with torch.no_grad():
                        features = self.backbone(batch["x"])
                    loss = F.cross_entropy(self.head(features)[:, past:seen], batch["y"] - past)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.train(was_training)

    def distillation_target(self, x: Tensor) -> Tensor:
        """The old network's logits on the past classes."""
        return self.old(x)[:, : self.past_classes]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        logits = self(x)[:, : self.seen_classes]
        ce = F.cross_entropy(logits, y)
        self.log("train/ce", ce, prog_bar=True)
        if self.current_task == 0:
            return ce
        past = self.past_classes
        distill = soft_cross_entropy(logits[:, :past], self.distillation_target(x), self.temperature)
        self.log("train/distill", distill)
        return ce + self.alpha * distill
