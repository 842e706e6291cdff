"""Online EWC as in LIBERO / the DMPEL code: after task t a diagonal Fisher of the policy is estimated from
the task's minibatches (squared gradient of the mean log-likelihood per minibatch, averaged over them),
folded into a running one, F <- gamma F + F_t, and the weights are anchored, theta* <- theta. Later tasks pay

    loss = nll + ewc,   ewc = e_lambda * sum_i F_i (theta_i - theta*_i)^2
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from cli.errors import ConfigError
from lightning_modules.robot.base import RobotImitationModule, end_of_task_seed, module_mode


def minibatch_fisher(params: list[nn.Parameter], batches: Iterable[Any], mean_nll: Any) -> tuple[list[Tensor], int]:
    """The LIBERO estimator: for each minibatch the squared gradient of its mean log-likelihood (= of its
    mean NLL), averaged over the minibatches. Returns one tensor per parameter and the number of batches."""
    total = [torch.zeros_like(p) for p in params]
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    count = 0
    for batch in batches:
        with torch.enable_grad():
            grads = torch.autograd.grad(mean_nll(batch), [params[i] for i in trainable], allow_unused=True)
        for i, g in zip(trainable, grads, strict=True):
            if g is not None:
                total[i] += g.detach().pow(2)
        count += 1
    return [f / max(count, 1) for f in total], count


def ewc_penalty(fisher: list[Tensor], params: list[Tensor], anchor: list[Tensor]) -> Tensor:
    """sum_i F_i (theta_i - theta*_i)^2 over every tensor (one tensor per parameter, no flat copy)."""
    return sum((f * (p - a).pow(2)).sum() for f, p, a in zip(fisher, params, anchor, strict=True))


class RobotEWC(RobotImitationModule):
    """Args:
    e_lambda: weight of the penalty (the DMPEL scripts: 50,000).
    gamma: decay of the running Fisher at each task end (online EWC: 0.9).
    fisher_batches: use at most this many minibatches of the task (None: all of them, as the reference).
    fisher_batch_size: minibatch size of the estimate (None: the datamodule's batch size).
    """

    def __init__(
        self,
        *args: Any,
        e_lambda: float = 50_000.0,
        gamma: float = 0.9,
        fisher_batches: int | None = None,
        fisher_batch_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if fisher_batches is not None and fisher_batches < 1:
            raise ConfigError(f"model.fisher_batches={fisher_batches}: must be at least 1 (or null for all)")
        self.e_lambda = e_lambda
        self.gamma = gamma
        self.fisher_batches = fisher_batches
        self.fisher_batch_size = fisher_batch_size
        n = sum(p.numel() for p in self.policy.parameters())
        # Identical on every rank (each computes them from the whole task), so plain buffers.
        self.register_buffer("fisher", torch.zeros(n))
        self.register_buffer("anchor", torch.zeros(n))

    def _split(self, flat: Tensor) -> list[Tensor]:
        """A flat buffer as views shaped like the policy's parameters."""
        params = list(self.policy.parameters())
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]

    def penalty(self) -> Tensor:
        """sum_i F_i (theta_i - theta*_i)^2 for the current weights."""
        return ewc_penalty(self._split(self.fisher), list(self.policy.parameters()), self._split(self.anchor))

    def training_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        terms = super().training_terms(batch)
        if self.current_task > 0:
            terms["ewc"] = self.e_lambda * self.penalty()
        return terms

    def on_task_end(self, task_id: int) -> None:
        super().on_task_end(task_id)
        batch_size = self.fisher_batch_size or self.trainer.datamodule.batch_size
        batches = self.task_batches(
            task_id, batch_size, seed=end_of_task_seed(task_id), max_batches=self.fisher_batches
        )
        params = list(self.policy.parameters())
        # The reference estimates in train mode (dropout on, augmentation on).
        with module_mode(self.policy, True), torch.random.fork_rng(devices=[]):
            torch.manual_seed(end_of_task_seed(task_id))
            fisher, _ = minibatch_fisher(params, batches, self.bc_loss)
        self.fisher.mul_(self.gamma).add_(parameters_to_vector(fisher))
        self.anchor.copy_(parameters_to_vector(params).detach())

    def added_memory(self, task_id: int) -> dict[str, int]:
        """Numbers stored for task `task_id`: the running Fisher and the anchor, created once (task 0)."""
        n = self.fisher.numel() if task_id == 0 else 0
        return {"fisher": n, "anchor": n}


EWC = RobotEWC
