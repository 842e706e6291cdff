"""IsCiL (incremental learning of retrievable skills, Lee et al., NeurIPS 2024) on the frozen foundation
policy, after the DMPEL code's baseline (spec section 2).

One adapter slot per task. Slot s is a LoRA expert (rank 8, alpha 8) on the temporal transformer's q/v
slices (and on a CLIP image tower's later q/v projections when there is one) plus its own full copy of
every linear layer of the low-dimensional encoders, the FiLM MLP and the GMM head (`SlotLinear`; all
copies start from the pretrained weights). A window's query q is DMPEL's router input (instruction
embedding, mean frozen camera features, mean low-dimensional state; experts off). Slots are found by
"multifacet prototypes": at the start of task t, K-means (`prototypes` centres, best of `kmeans_init`
seeded k-means++ starts) over the queries of all of t's training windows gives P_t. Retrieval, with no
task id, picks among the slots of the tasks seen so far (later slots masked):

    sim(q, s) = max_{p in P_s} (cos(q, p) + 1) / 2,     slot(q) = argmax_{s <= t} sim(q, s)

Before task t > 0 writes P_t, slot t becomes a copy of the slot most often retrieved for t's windows.
Task t then trains slot t alone on its own windows (no retrieval in training) by the NLL:

    L = -mean_{b,tau} log pi(a_{b,tau} | o_{b,<=tau}, l; W0, slot t)

At rollout time each episode is routed by the mean of its last `window` step queries (the training
query of its latest window), the same per-step scheme as DMPEL; queued tokens keep the slot they were
encoded with.

Deliberate differences from the released code: it freezes "slot -1" at task 0 (the last slot of the per-
slot encoder/FiLM/head weights, which can then not train when the last task arrives) and slot t-1 at
task t; here task t trains exactly slot t and every other slot is frozen (`task_parameters`, applied by
the ExpertFreezing callback), so finished slots stay bit-identical and the last task's slot trains. There
is no text-encoder LoRA (instructions are precomputed by a frozen encoder). K-means runs on the raw
queries (squared Euclidean), retrieval compares directions; with fewer windows than `prototypes`, every
window is a prototype (repeated to fill the slot's rows). All slots exist from the start, so DDP needs
`strategy: ddp_find_unused_parameters_true`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from callbacks.expert_freezing import ExpertFreezing
from cli.errors import ConfigError
from lightning_modules.nn.robot.experts import GROUPS, ExpertLibrary, check_groups, replace_linear
from lightning_modules.nn.robot.router import query_dim, routing_query
from lightning_modules.robot.base import RobotImitationModule, task_seed

COPY_GROUPS = ("extra", "fusion", "head")


# -- k-means ------------------------------------------------------------------------------------
def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """(N, K) squared Euclidean distances between rows of x (N, D) and centres (K, D)."""
    d = x.pow(2).sum(1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(1)[None]
    return d.clamp_(min=0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """(k, D) initial centres: the first uniformly, each next one with probability proportional to the
    squared distance to the nearest centre chosen so far."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    nearest = squared_distances(x, x[first][None])[:, 0]
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # every point already is a centre
            idx = int(torch.randint(len(x), (1,), generator=generator))
        else:
            idx = int(torch.multinomial((nearest / total).double().cpu(), 1, generator=generator))
        centres.append(x[idx])
        nearest = torch.minimum(nearest, squared_distances(x, x[idx][None])[:, 0])
    return torch.stack(centres)


def kmeans(points: Tensor, k: int, n_init: int = 10, max_iter: int = 100, tol: float = 1e-4, seed: int = 0) -> Tensor:
    """(min(k, N), D) centres of `points` (N, D): Lloyd's algorithm from `n_init` k-means++ starts drawn
    from a generator seeded by `seed`, keeping the run of lowest inertia (sum of squared distances to the
    nearest centre). A run stops when the centres move less than `tol` x the mean per-feature variance;
    an emptied cluster takes the point farthest from its centre."""
    x = points.detach().float()
    k = min(k, len(x))
    generator = torch.Generator().manual_seed(seed)
    threshold = tol * x.var(0, unbiased=False).mean()
    best, best_inertia = x[:k], math.inf
    for _ in range(n_init):
        centres = kmeans_plus_plus(x, k, generator)
        for _ in range(max_iter):
            d = squared_distances(x, centres)
            assign = d.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(centres).index_add_(0, assign, x) / counts.clamp(min=1)[:, None].to(x)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = d.gather(1, assign[:, None])[:, 0].argsort(descending=True)[: len(empty)]
                new[empty] = x[far]
            shift = (new - centres).pow(2).sum()
            centres = new
            if shift <= threshold:
                break
        inertia = squared_distances(x, centres).min(1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best


# -- per-slot full layers -----------------------------------------------------------------------
class SlotLinear(nn.Module):
    """A linear layer with one full (weight, bias) per slot, each its own parameter; every sample uses the
    slot selected for it (`select`), so one batch can mix slots."""

    def __init__(self, base: nn.Linear, slots: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.ParameterList([nn.Parameter(base.weight.detach().clone()) for _ in range(slots)])
        self.bias = (
            nn.ParameterList([nn.Parameter(base.bias.detach().clone()) for _ in range(slots)])
            if base.bias is not None
            else None
        )
        self.rows: list[int] | None = None
        self.uniform: int | None = None

    def slot_parameters(self, k: int) -> list[nn.Parameter]:
        return [self.weight[k]] + ([self.bias[k]] if self.bias is not None else [])

    def select(self, rows: list[int] | None) -> None:
        """The slot of each sample of the next forwards (rows of one sample are contiguous); None clears."""
        self.rows = rows
        self.uniform = rows[0] if rows and all(r == rows[0] for r in rows) else None

    def _linear(self, x: Tensor, k: int) -> Tensor:
        return F.linear(x, self.weight[k], None if self.bias is None else self.bias[k])

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            raise RuntimeError("no slot is selected for this layer (IsCiL.select_slots)")
        if self.uniform is not None:
            return self._linear(x, self.uniform)
        batch = len(self.rows)
        if x.shape[0] % batch:
            raise RuntimeError(f"a batch of {x.shape[0]} rows does not fit slots for {batch} samples")
        flat = x.reshape(batch, -1, x.shape[-1])
        index = torch.tensor(self.rows, device=x.device)
        out = None
        for k in sorted(set(self.rows)):
            idx = (index == k).nonzero().flatten()
            y = self._linear(flat[idx], k)
            if out is None:
                out = y.new_empty(batch, flat.shape[1], self.out_features)
            out[idx] = y
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={len(self.weight)}"


class IsCiL(RobotImitationModule):
    """Args (the spec's values as defaults):
    rank / alpha: LoRA rank and scale numerator of each slot's expert (8 / 8).
    groups: the policy's layer groups that get a LoRA expert per slot (`img` skipped without a CLIP tower).
    copy_groups: groups whose linear layers get a full weight copy per slot (low-dim encoders, FiLM, head).
    prototypes: K-means centres per task (20); kmeans_init: seeded starts, the best is kept (10);
    kmeans_iters: Lloyd iterations per start at most (100).
    query_batch_size: batch size of the pass that computes a task's window queries.
    """

    def __init__(
        self,
        *args: Any,
        rank: int = 8,
        alpha: float = 8.0,
        groups: tuple[str, ...] = ("img", "tem"),
        copy_groups: tuple[str, ...] = COPY_GROUPS,
        prototypes: int = 20,
        kmeans_init: int = 10,
        kmeans_iters: int = 100,
        query_batch_size: int = 64,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        check_groups(groups)
        check_groups(copy_groups, "model.copy_groups", COPY_GROUPS)
        if set(groups) & set(copy_groups):
            raise ConfigError(
                f"model.copy_groups: {sorted(set(groups) & set(copy_groups))} also in model.groups; a layer gets "
                "either a LoRA expert or a full copy per slot"
            )
        if rank < 1:
            raise ConfigError(f"model.rank must be at least 1, got {rank}")
        if prototypes < 1 or kmeans_init < 1 or kmeans_iters < 1 or query_batch_size < 1:
            raise ConfigError("model.prototypes, kmeans_init, kmeans_iters and query_batch_size must be at least 1")
        self.policy.requires_grad_(False)
        targets = self.policy.lora_targets()
        chosen = {g: targets[g] for g in targets if g in groups}
        self.library = ExpertLibrary(
            self.policy, chosen, self.num_tasks, dict.fromkeys(GROUPS, rank), dict.fromkeys(GROUPS, float(alpha))
        )
        for k in range(self.num_tasks):  # standard LoRA: A kaiming-uniform, B = 0 (slot t > 0 is copied later)
            self.library.init_expert(k, "kaiming", task_seed(7_919, k, offset=9_337))
        self.slot_layers: list[SlotLinear] = [
            replace_linear(self.policy, name, partial(SlotLinear, slots=self.num_tasks))
            for group in copy_groups
            for name, _ in targets[group]
        ]
        self.lang_dim = self.lang_table.shape[1]
        self.query_dim = query_dim(self.policy, self.stream.shapes, self.lang_dim)
        self.num_prototypes = prototypes
        self.kmeans_init, self.kmeans_iters, self.query_batch_size = kmeans_init, kmeans_iters, query_batch_size
        self.register_buffer("prototypes", torch.zeros(self.num_tasks, prototypes, self.query_dim))
        self.register_buffer("prototype_ready", torch.zeros(self.num_tasks, dtype=torch.bool))
        # slot_source[t]: the slot task t's slot was copied from (-1: none, task 0 or not yet started).
        self.register_buffer("slot_source", torch.full((self.num_tasks,), -1, dtype=torch.long))
        # Every slot requires grad until the first task starts, so that DDP (which wraps the module before
        # that) registers them all; `on_task_start` then leaves only the current slot trainable.
        self.retrieved: Tensor | None = None  # the slots of the last rollout step's episodes

    # -- parameters ---------------------------------------------------------------------------
    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        """Slot `slot`'s LoRA expert in every wrapped layer and its full copies."""
        copies = [p for layer in self.slot_layers for p in layer.slot_parameters(slot)]
        return self.library.expert_parameters(slot) + copies

    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        return self.slot_parameters(task_id)

    def deepspeed_unsupported(self) -> str | None:
        return "IsCiL trains a new slot at each task"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.slot_parameters(self.current_task)

    def added_parameters(self, task_id: int) -> int:
        """One slot (LoRA expert and full copies) and the task's prototypes."""
        return sum(p.numel() for p in self.slot_parameters(task_id)) + self.prototypes[task_id].numel()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.require_find_unused_parameters("IsCiL trains one task's slot at a time")

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Slot `target` becomes a copy of slot `source` (LoRA expert and full copies)."""
        for a, b in zip(self.slot_parameters(source), self.slot_parameters(target), strict=True):
            b.copy_(a)

    # -- task boundaries ----------------------------------------------------------------------
    def on_task_start(self, task_id: int) -> None:
        """Prepares slot t from the task's training windows (once; see `prepare_task`) and trains slot t only.
        Without a trainer (direct use) call `prepare_task` yourself."""
        super().on_task_start(task_id)
        if not bool(self.prototype_ready[task_id]) and self._trainer is not None:
            self.prepare_task(task_id)
        ExpertFreezing.apply(self, task_id)

    @torch.no_grad()
    def prepare_task(self, task_id: int, dataset: Dataset | None = None, num_workers: int | None = None) -> Tensor:
        """Start of task t: for t > 0, slot t copies the slot retrieved most often (ties: the lowest) for
        t's windows among the slots of tasks 0..t-1; then t's prototypes are written. Returns the retrieval
        counts per slot (zeros at task 0)."""
        queries = self.window_queries(task_id, dataset, num_workers)
        counts = torch.zeros(self.num_tasks, dtype=torch.long)
        if task_id > 0 and bool(self.prototype_ready[:task_id].any()):
            counts = torch.bincount(self.retrieve(queries, upto=task_id - 1).cpu(), minlength=self.num_tasks)
            source = self._from_rank_zero(int(counts.argmax()))
            self.copy_slot(source, task_id)
            self.slot_source[task_id] = source
        seed = task_seed(15_485_863, task_id)
        centres = kmeans(queries, self.num_prototypes, self.kmeans_init, self.kmeans_iters, seed=seed)
        centres = self._from_rank_zero(centres.cpu()).to(queries.device)
        fill = torch.arange(self.num_prototypes, device=centres.device) % len(centres)
        self.prototypes[task_id] = centres[fill].to(self.prototypes)
        self.prototype_ready[task_id] = True
        return counts

    def _from_rank_zero(self, obj: Any) -> Any:
        """Rank 0's value under DDP (every rank computes the same, up to float non-determinism)."""
        return self.trainer.strategy.broadcast(obj) if self._trainer is not None else obj

    # -- retrieval ----------------------------------------------------------------------------
    def query(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(B, Q) query of each window (DMPEL's router input), computed with every expert off."""
        return routing_query(self.policy, obs, lang, self.library)

    @torch.no_grad()
    def window_queries(self, task_id: int, dataset: Dataset | None = None, num_workers: int | None = None) -> Tensor:
        """(N, Q) queries of all of a task's training windows (eval mode, no augmentation; `dataset`: the
        datamodule's by default), on the module's device."""
        queries = []
        for batch in self.ordered_windows(task_id, self.query_batch_size, dataset, num_workers):
            queries.append(self.query(batch["obs"], self.lang(batch["task"])).float())
        return torch.cat(queries)

    def slot_similarities(self, queries: Tensor, upto: int | None = None) -> Tensor:
        """(B, S): max over each slot's prototypes of (cos + 1) / 2; -inf for slots after `upto` (default:
        the current task) or without prototypes."""
        upto = self.current_task if upto is None else upto
        with torch.autocast(queries.device.type, enabled=False):
            q = F.normalize(queries.float(), dim=-1)
            p = F.normalize(self.prototypes.float(), dim=-1)
            sim = ((torch.einsum("bq,spq->bsp", q, p) + 1) / 2).amax(-1)
        allowed = self.prototype_ready & (torch.arange(self.num_tasks, device=sim.device) <= upto)
        return sim.masked_fill(~allowed, -math.inf)

    def retrieve(self, queries: Tensor, upto: int | None = None) -> Tensor:
        """(B,) the retrieved slot of each query (slot 0 while no slot has prototypes)."""
        return self.slot_similarities(queries, upto).argmax(-1)

    def select_slots(self, slots: Tensor) -> None:
        """Every following forward uses slot slots[b] for sample b (LoRA expert and full copies)."""
        slots = slots.long().to(self.device)
        n = int(slots.max()) + 1
        one_hot = F.one_hot(slots, n).float()[:, None, :].expand(-1, len(self.library.groups), -1)
        self.library.set_coefficients(one_hot)
        rows = slots.tolist()
        for layer in self.slot_layers:
            layer.select(rows)

    def clear_slots(self) -> None:
        self.library.clear()
        for layer in self.slot_layers:
            layer.select(None)

    @contextmanager
    def using_slots(self, slots: Tensor) -> Iterator[None]:
        self.select_slots(slots)
        try:
            yield
        finally:
            self.clear_slots()

    # -- training -----------------------------------------------------------------------------
    def bc_loss(self, batch: dict[str, Any]) -> Tensor:
        """The NLL with the current task's slot for every sample (the task's own data, no retrieval)."""
        slots = torch.full((len(batch["actions"]),), self.current_task, dtype=torch.long)
        with self.using_slots(slots):
            return self.policy.nll(batch["obs"], self.lang(batch["task"]), batch["actions"])

    # -- rollouts -----------------------------------------------------------------------------
    def prepare_step(self, obs: dict[str, Tensor], lang: Tensor, ids: Tensor, reset: Tensor, task_id: int) -> None:
        """Retrieves each episode's slot from the mean of its last `window` step queries (the task id is
        not used); the slots stay selected until `finish_step`."""
        self.retrieved = self.retrieve(self.episode_query_means(self.query(obs, lang), ids, reset))
        self.select_slots(self.retrieved)

    def finish_step(self) -> None:
        self.clear_slots()
