"""L2M (Learning to Modulate pre-trained models, Schmied et al. 2023) on the frozen foundation policy, after
the DMPEL code's baseline (spec section 2).

A pool of `pool_size` LoRA experts (rank 8, alpha 8) on the temporal transformer's q/v slices (and on a
CLIP image tower's later q/v projections when there is one), each with a learnable key k_i in R^E
(U(-1, 1)). A window's query q is the frozen policy's readout (experts off), averaged over time; the
window uses the single expert whose key is closest, with no task id:

    cos_i = <q, k_i> / (|q| |k_i|),   i* = argmax_i cos_i        (evaluation, and training once the
                                                                   count penalty has stopped)
    i* = argmax_i (cos_i + 1) / 2 * w_i                          (training, first `count_penalty_steps`
                                                                   forward passes)

where w are normalised inverse usage frequencies from a running count n of training selections,
f_i = (n_i + 1) / sum_j (n_j + 1), w_i = f_i^-1 / sum_j f_j^-1 (the +1 keeps unused experts finite). The
loss pulls the selected keys towards their queries (the query is a constant; keys learn from this term
only, experts from the NLL):

    L = nll - pull_weight * mean_b cos(q_b, k_{i*_b})           (logged as train/nll and train/pull)

Every expert and key trains in every task; nothing is frozen or added after task 0.

Choices where the reference leaves room: the query pass runs with dropout off (the frozen policy as a
fixed function, so training and rollout queries agree); the usage weights are defined as above. At
rollout time each episode keeps a second queue of its last `window` steps' tokens encoded with the
experts off; the query is the frozen transformer's readout over that queue, averaged over time - the
training query of the episode's latest window (shorter at the episode start). The adapted token queue is
the base module's, so with an `img` group a queued step keeps the expert it was encoded with.

Plain `ddp` works: the one-hot weight merge keeps every expert in the graph (unselected ones get zero
gradients, which AdamW's decoupled weight decay still acts on, as in the reference, whose optimizer holds
the whole pool), and the usage counts are summed over the ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.robot.experts import GROUPS, ExpertLibrary, check_groups
from lightning_modules.robot.base import RobotImitationModule, module_mode, push_history, task_seed


class L2M(RobotImitationModule):
    """Args (the spec's values as defaults):
    pool_size: LoRA experts in the pool (30), all allocated and trained from task 0.
    rank / alpha: LoRA rank and scale numerator of every expert (8 / 8).
    groups: the policy's layer groups that get experts (`img` is skipped without a CLIP tower). The reference's
        (img, tem) adapt attention q/v only; on a state-only policy that is too little to learn a task (CW3's
        window-close alone: 0% after 6 epochs, 95% with every group), so the CW tables add an all-groups row.
    pull_weight: weight of the key-query pull term (0.5).
    count_penalty_steps: training forward passes during which usage counts spread the selection (50,000).
    """

    def __init__(
        self,
        *args: Any,
        pool_size: int = 30,
        rank: int = 8,
        alpha: float = 8.0,
        groups: tuple[str, ...] = ("img", "tem"),
        pull_weight: float = 0.5,
        count_penalty_steps: int = 50_000,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        check_groups(groups)
        if pool_size < 1:
            raise ConfigError(f"model.pool_size must be at least 1, got {pool_size}")
        if rank < 1:
            raise ConfigError(f"model.rank must be at least 1, got {rank}")
        if count_penalty_steps < 0:
            raise ConfigError(f"model.count_penalty_steps must be >= 0, got {count_penalty_steps}")
        self.policy.requires_grad_(False)
        targets = self.policy.lora_targets()
        self.library = ExpertLibrary(
            self.policy,
            {g: targets[g] for g in targets if g in groups},
            pool_size,
            dict.fromkeys(GROUPS, rank),
            dict.fromkeys(GROUPS, float(alpha)),
            merge="weight",
        )
        self.pool_size, self.pull_weight, self.count_penalty_steps = pool_size, pull_weight, count_penalty_steps
        for k in range(pool_size):  # standard LoRA: A kaiming-uniform, B = 0
            self.library.init_expert(k, "kaiming", task_seed(7_919, k, offset=3_571))
        g = torch.Generator().manual_seed(task_seed(0, 0, offset=3_571))
        self.keys = nn.Parameter(torch.rand(pool_size, self.policy_config.embed_size, generator=g) * 2 - 1)
        self.register_buffer("usage", torch.zeros(pool_size))  # training selections per expert
        self.register_buffer("forward_passes", torch.zeros((), dtype=torch.long))
        self._frozen_queue: dict[int, Tensor] = {}
        self.selected: Tensor | None = None  # the experts of the last rollout step's episodes

    # -- parameters ---------------------------------------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for k in range(self.pool_size) for p in self.library.expert_parameters(k)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every expert of the pool and every key, in every task."""
        return self.expert_parameters() + [self.keys]

    def on_task_start(self, task_id: int) -> None:
        super().on_task_start(task_id)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        self._frozen_queue = {}

    def added_parameters(self, task_id: int) -> int:
        """The whole pool and its keys at task 0; nothing later."""
        return sum(p.numel() for p in self.trainable_parameters()) if task_id == 0 else 0

    # -- selection ----------------------------------------------------------------------------
    def query(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(B, E): the frozen policy's readout of each window (experts and dropout off), mean over time."""
        with torch.no_grad(), self.library.disabled(), module_mode(self.policy, False):
            return self.policy.temporal(self.policy.encode(obs, lang)).mean(1)

    def similarities(self, query: Tensor) -> Tensor:
        """(B, N) cosine between each query and each key (differentiable in the keys), in float32."""
        with torch.autocast(query.device.type, enabled=False):
            return F.normalize(query.float(), dim=-1) @ F.normalize(self.keys.float(), dim=-1).T

    @property
    def penalty_active(self) -> bool:
        return int(self.forward_passes) < self.count_penalty_steps

    def usage_weights(self) -> Tensor:
        """(N,) normalised inverse usage frequencies of the experts (uniform before any selection)."""
        freq = (self.usage + 1) / (self.usage + 1).sum()
        inverse = 1.0 / freq
        return inverse / inverse.sum()

    def select(self, similarities: Tensor) -> Tensor:
        """(B,) the expert of each sample: the closest key; in training, while the count penalty lasts,
        the best (cos + 1) / 2 scaled by the usage weights."""
        scores = similarities.detach()
        if self.training and self.penalty_active:
            scores = (scores + 1) / 2 * self.usage_weights()
        return scores.argmax(-1)

    def coefficients(self, selected: Tensor) -> Tensor:
        """(B, G, N) one-hot coefficients of the selected experts, the same in every group."""
        one_hot = F.one_hot(selected, self.pool_size).float()
        return one_hot[:, None, :].expand(-1, len(self.library.groups), -1)

    def count(self, selected: Tensor) -> None:
        """Adds a training batch's selections to the usage counts (summed over DDP ranks) and counts the pass."""
        hist = torch.bincount(selected, minlength=self.pool_size).to(self.usage)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hist)
        self.usage += hist
        self.forward_passes += 1

    # -- training -----------------------------------------------------------------------------
    def terms(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """NLL with each sample's selected expert, mean cosine of the selected keys, and the selection;
        in training the selection is counted."""
        lang = self.lang(batch["task"])
        similarities = self.similarities(self.query(batch["obs"], lang))
        selected = self.select(similarities)
        if self.training:
            self.count(selected)
        with self.library.routing(self.coefficients(selected)):
            nll = self.policy.nll(batch["obs"], lang, batch["actions"])
        return nll, similarities.gather(1, selected[:, None]).mean(), selected

    def bc_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.terms(batch)[0]

    def training_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        nll, pull, _ = self.terms(batch)
        return {"nll": nll, "pull": -self.pull_weight * pull}

    # -- rollouts -----------------------------------------------------------------------------
    def prepare_step(self, obs: dict[str, Tensor], lang: Tensor, ids: Tensor, reset: Tensor, task_id: int) -> None:
        """Selects each episode's expert from the frozen readout over its last `window` frozen-token steps
        (mean over time; the task id is not used); the coefficients stay set until `finish_step`."""
        with self.library.disabled(), module_mode(self.policy, False):
            tokens = self.policy.encode(obs, lang)[:, 0]
            push_history(self._frozen_queue, ids, reset, tokens, self.policy.window)
            query = tokens.new_empty(len(tokens), tokens.shape[-1])
            lengths = torch.tensor([len(self._frozen_queue[i]) for i in ids.tolist()])
            for n in lengths.unique().tolist():
                rows = (lengths == n).nonzero().flatten()
                seq = torch.stack([self._frozen_queue[i] for i in ids[rows.to(ids.device)].tolist()])
                query[rows.to(query.device)] = self.policy.temporal(seq).mean(1)
        self.selected = self.select(self.similarities(query))
        self.library.set_coefficients(self.coefficients(self.selected))

    def finish_step(self) -> None:
        self.library.clear()

    def eval_step(self, batch: dict[str, Tensor], task_id: int) -> dict[str, Tensor]:
        self._frozen_queue = {}
        try:
            return super().eval_step(batch, task_id)
        finally:
            self._frozen_queue = {}
