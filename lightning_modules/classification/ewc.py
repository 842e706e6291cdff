"""Online EWC (Schwarz et al., 2018; Mammoth's `ewc_on`): after each task a diagonal Fisher is estimated
and folded into a running one, F <- gamma * F + F_t, and training pays
loss = CE + e_lambda * sum_i F_i (theta_i - theta*_i)^2, theta* being the weights at the last task end."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector

from cli.errors import ConfigError
from lightning_modules.classification.base import ClassIncrementalModule


def fisher_diagonal(model: nn.Module, loader: Iterable[dict[str, Tensor]]) -> Tensor:
    """Mammoth's estimator: per-example squared gradients of log p(y|x) for the true label y, each
    weighted by p(y|x), averaged over the examples. Returns one value per parameter, in
    `model.parameters()` order."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def nll(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    total, count = torch.zeros(sum(p.numel() for p in params.values()), device=next(model.parameters()).device), 0
    for batch in loader:
        x, y = batch["x"].to(total.device), batch["y"].to(total.device)
        grads = per_example(params, x, y)
        flat = torch.cat([grads[n].flatten(1) for n in params], dim=1)
        with torch.no_grad():
            p_true = model(x).softmax(dim=1).gather(1, y[:, None])
        total += (p_true * flat.pow(2)).sum(dim=0)
        count += len(y)
    return total / count


def ewc_penalty(fisher: Tensor, theta: Tensor, anchor: Tensor) -> Tensor:
    """sum_i F_i (theta_i - anchor_i)^2."""
    return (fisher * (theta - anchor).pow(2)).sum()


class EWC(ClassIncrementalModule):
    """Args:
    e_lambda: penalty weight (Mammoth, S-CIFAR-10: 10).
    gamma: decay of the old Fisher at each task end (1 keeps it all).
    fisher_batch_size: examples per vectorised per-example-gradient batch when estimating the Fisher.
    fisher_normalisation: what the summed per-example terms are divided by: `samples` (default), the task's
        number of training examples N, an unbiased mean; `batches`: Mammoth's `ewc_on`, the training loader's
        batches times the data's batch size, ceil(N / B) * B, which is larger than N when the last batch is
        short (the Fisher, and so the penalty, shrink by N / (ceil(N / B) * B)).
    """

    def __init__(
        self,
        e_lambda: float = 10.0,
        gamma: float = 1.0,
        fisher_batch_size: int = 64,
        fisher_normalisation: Literal["samples", "batches"] = "samples",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fisher_normalisation not in ("samples", "batches"):
            raise ConfigError(
                f"model.fisher_normalisation: {fisher_normalisation!r} is not one of 'samples', 'batches' (Mammoth)"
            )
        self.e_lambda = e_lambda
        self.gamma = gamma
        self.fisher_batch_size = fisher_batch_size
        self.fisher_normalisation = fisher_normalisation
        n = sum(p.numel() for p in self.parameters())
        # Identical on every rank (each computes them from the whole task), so plain buffers.
        self.register_buffer("fisher", torch.zeros(n))
        self.register_buffer("anchor", torch.zeros(n))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ce = F.cross_entropy(self(batch["x"]), batch["y"])
        penalty = ewc_penalty(self.fisher, parameters_to_vector(self.parameters()), self.anchor)
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/ewc_penalty", penalty)
        return ce + self.e_lambda * penalty

    def on_task_end(self, task_id: int) -> None:
        # Over the task's training set, augmented as in training (Mammoth uses the train loader).
        fisher = fisher_diagonal(self, self.task_batches(task_id, augment=True, batch_size=self.fisher_batch_size))
        if self.fisher_normalisation == "batches":
            n, b = len(self.trainer.datamodule.train_dataset(task_id)), self.trainer.datamodule.batch_size
            fisher = fisher * (n / (math.ceil(n / b) * b))
        self.fisher.mul_(self.gamma).add_(fisher)
        self.anchor.copy_(parameters_to_vector(self.parameters()).detach())
