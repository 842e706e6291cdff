"""Learning without Forgetting (Li & Hoiem, 2017; Mammoth's `lwf`): a snapshot of the network taken at
each task start supplies soft targets on the past classes:
loss = CE(f(x)[:seen], y) + alpha * H(soft(old(x)[:past] / T), soft(f(x)[:past] / T))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.classification.base import ClassIncrementalModule
from lightning_modules.nn.frozen import FrozenCopy


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Cross-entropy between the teacher's and the student's temperature-softened distributions
    (Mammoth's `modified_kl_div` of `smooth`ed softmaxes; it differs from the KL by the teacher's entropy)."""
    target = (teacher_logits / temperature).softmax(dim=1)
    return -(target * (student_logits / temperature).log_softmax(dim=1)).sum(dim=1).mean()


class LwF(ClassIncrementalModule):
    """Args: alpha: distillation weight (Mammoth, S-CIFAR-10: 3); temperature: softening T (2).

    Mammoth also warms the classifier up on the new classes at each task start; this port does not.
    """

    def __init__(self, alpha: float = 3.0, temperature: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self.old = FrozenCopy(self.network())

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        self.old.load_from(self.network())

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
