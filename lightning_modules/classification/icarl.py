"""iCaRL (Rebuffi et al., 2017; Mammoth's `icarl`): a fixed memory of exemplars chosen by herding,
sigmoid binary cross-entropy whose past-class targets are the old network's sigmoid outputs, and a
nearest-mean-of-exemplars classifier on L2-normalised features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.errors import ConfigError
from cli.runtime import run_seed
from lightning_modules.classification.base import ClassIncrementalModule
from lightning_modules.nn.frozen import FrozenCopy


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of m rows chosen greedily so that the running mean of the chosen rows stays closest
    to the mean of all rows (Welling, 2009; iCaRL's exemplar selection). Rows should be L2-normalised."""
    target = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for k in range(1, min(m, len(features)) + 1):
        candidate_means = (running + features) / k
        dist = (candidate_means - target).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


class ICaRL(ClassIncrementalModule):
    """Args:
    memory_size: total exemplars; after task t each of the seen classes keeps memory_size // seen.
    minibatch_size: exemplars replayed per step (default: the batch size); Mammoth instead merges the
        whole memory into the next task's training set.
    weight_decay: L2 penalty added to the loss (Mammoth: 1e-5).
    """

    def __init__(self, memory_size: int = 200, minibatch_size: int | None = None, weight_decay: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if self.domain_incremental:
            raise ConfigError(
                "model: ICaRL is class-incremental only (exemplars and targets per new class), but data is a "
                "domain-incremental stream; use ER, DER, DER++, EWC, LwF, Finetune or Joint "
                "(configs/classification/*_rotdigits.yaml)"
            )
        self.memory_size = memory_size
        self.minibatch_size = minibatch_size
        self.weight_decay = weight_decay
        self.old = FrozenCopy(self.network())
        num_classes = self.class_offsets[-1]
        # Identical on every rank (herding runs on the whole task on each), so plain buffers.
        self.register_buffer("memory_x", torch.zeros(memory_size, *self.stream.input_shape))
        self.register_buffer("memory_y", torch.full((memory_size,), -1, dtype=torch.long))
        self.register_buffer("class_means", torch.zeros(num_classes, self.backbone.out_features))
        self.generator = torch.Generator().manual_seed(0)

    def setup(self, stage: str) -> None:
        self.generator.manual_seed(run_seed() + self.global_rank)

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        self.old.load_from(self.network())

    def features(self, x: Tensor) -> Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"]
        stored = (self.memory_y >= 0).nonzero().squeeze(1)
        if len(stored):
            pick = stored[torch.randperm(len(stored), generator=self.generator)[: self.minibatch_size or len(x)]]
            x, y = torch.cat([x, self.augment(self.memory_x[pick])]), torch.cat([y, self.memory_y[pick]])
        logits = self(x)[:, : self.seen_classes]
        targets = F.one_hot(y, self.seen_classes).float()
        if self.current_task > 0:
            targets[:, : self.past_classes] = torch.sigmoid(self.old(x)[:, : self.past_classes])
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        l2 = sum(p.pow(2).sum() for p in self.trainable_parameters())
        self.log("train/bce", bce, prog_bar=True)
        return bce + self.weight_decay * l2

    @torch.no_grad()
    def on_task_end(self, task_id: int) -> None:
        was_training = self.training
        self.eval()
        seen = self.seen_classes
        per_class = self.memory_size // seen
        xs, ys = [], []
        for c in range(self.past_classes):  # old classes keep their first exemplars (herding order)
            keep = (self.memory_y == c).nonzero().squeeze(1)[:per_class]
            xs.append(self.memory_x[keep])
            ys.append(self.memory_y[keep])
        task_x, task_y, task_f = [], [], []
        for batch in self.task_batches(task_id, augment=False):
            task_x.append(batch["x_raw"])
            task_y.append(batch["y"])
            task_f.append(self.features(batch["x"]))
        task_x, task_y, task_f = torch.cat(task_x), torch.cat(task_y), torch.cat(task_f)
        for c in range(self.past_classes, seen):
            in_class = (task_y == c).nonzero().squeeze(1)
            chosen = in_class[herding(task_f[in_class], per_class)]
            xs.append(task_x[chosen])
            ys.append(torch.full((len(chosen),), c, device=self.device))
        x, y = torch.cat(xs), torch.cat(ys)  # raw images: the memory stores them unaugmented
        self.memory_y.fill_(-1)
        self.memory_x[: len(x)] = x
        self.memory_y[: len(y)] = y
        feats = self.features(self.model_input(x))
        for c in range(seen):
            self.class_means[c] = F.normalize(feats[y == c].mean(dim=0), dim=0)
        self.train(was_training)

    def class_scores(self, x: Tensor) -> Tensor:
        """Nearest mean of exemplars: minus the distance to each class mean (logits before the first task ends)."""
        if not (self.memory_y >= 0).any():
            return super().class_scores(x)
        return -torch.cdist(self.features(x), self.class_means)

    def rank_local_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_rank_local_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
