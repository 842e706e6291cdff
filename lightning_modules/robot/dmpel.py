"""DMPEL (Dynamic Mixture of Progressive Parameter-Efficient Expert Library, arXiv 2506.05985), after its
released code (spec section 1).

The foundation policy is frozen; its linear layers (groups img / extra / fusion / tem / head) get a pool
of LoRA experts, one new expert per task. While task t trains, a router created for it maps the window's
query q (instruction, mean frozen camera features, mean low-dim state; experts off) to per-group top-k
coefficients over experts 0..t, and only expert t and router t learn, by the NLL alone:

    L_BC = -mean_{b,tau} log pi(a_{b,tau} | o_{b,<=tau}, l; W0, {A_k, B_k}, R_t(q_b))

At the task's end every training window's (q, R_t(q)) is stored; for t > 0 router t alone is then fitted
to the stored coefficients of tasks 0..t (zero for experts added after a task), the coefficient replay

    L_CR = mean over stored windows and the G x (t+1) entries of (R_t(q) - C*)^2,

keeping the epoch of lowest mean loss. At rollout time there is no task id: the current router routes
the mean of the episode's last `window` step queries.

Deviations from the released code (deliberate): no `txt` group, since instruction embeddings are
precomputed by a frozen encoder; every expert is its own parameter and finished ones are out of the
optimizer, so AdamW's decay no longer shrinks them (the spec's quirk 2); all experts and routers are
allocated up front (router t has G x (t+1) outputs and its own random initialisation) so the parameter
set never changes under DDP, where the run needs `strategy: ddp_find_unused_parameters_true` (finished
and future experts get no gradient); the camera features of the query come from an extra frozen pass
of the image encoder (the released code caches the frozen ViT's first half); stored queries leave out the
instruction part (restored from the task's embedding, as the reference stores text once per task) and
targets are stored dense; one coefficient-dropout mask per wrapped layer, shared by its q and v slices.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from callbacks.expert_freezing import ExpertFreezing
from cli.errors import ConfigError
from lightning_modules.nn.robot.experts import GROUPS, INIT_MODES, ExpertLibrary, check_groups
from lightning_modules.nn.robot.router import FAVOUR_OLD, NEW_START, CoefficientRouter, query_dim, routing_query
from lightning_modules.robot.base import RobotImitationModule, task_seed

DEFAULT_RANKS = {"img": 8, "extra": 16, "fusion": 16, "tem": 16, "head": 16}
DEFAULT_ALPHAS = dict.fromkeys(GROUPS, 16.0)


class CoefficientMemory(nn.Module):
    """The replay sets of finished tasks: per task, each stored window's query without the instruction
    part (N, Q - D) and its target coefficients (N, G, t+1). Kept on the CPU and saved in the state dict."""

    def __init__(self):
        super().__init__()
        self.queries: list[Tensor] = []
        self.targets: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.queries)

    def store(self, task_id: int, queries: Tensor, targets: Tensor) -> None:
        if task_id > len(self.queries):
            raise RuntimeError(f"task {task_id} stored before tasks 0..{task_id - 1}")
        del self.queries[task_id:], self.targets[task_id:]
        self.queries.append(queries.detach().float().cpu())
        self.targets.append(targets.detach().float().cpu())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.queries + self.targets)

    def get_extra_state(self) -> dict[str, list[Tensor]]:
        return {"queries": list(self.queries), "targets": list(self.targets)}

    def set_extra_state(self, state: dict[str, list[Tensor]]) -> None:
        self.queries = [q.float().cpu() for q in state["queries"]]
        self.targets = [t.float().cpu() for t in state["targets"]]


class DMPEL(RobotImitationModule):
    """Args (the spec's values as defaults):
    top_k: experts kept per group (k = min(top_k, pool size)); router_hidden: width of its two hidden layers.
    groups: the policy's layer groups that get experts (empty ones, e.g. `img` without a CLIP tower, are skipped).
    ranks / alphas: per group, overriding {img: 8, others: 16} / 16 (scale alpha / rank).
    merge: "weight" (mix A and B separately, the released code) or "output" (mix expert outputs).
    coefficient_dropout: dropout on the coefficients in training (0.15).
    expert_init: "ortho" (later experts orthogonal to earlier ones, unit norm) or "kaiming".
    router_lr_scale: the router's learning rate relative to the optimizer's (1.0).
    router_init: each new router's initial coefficients: "released" (every expert near 1/k, the released
        code) or "favour_new" (the new expert near 1.0, old ones near 0.05: old experts, frozen and near 1/k,
        otherwise keep pulling a new task's actions their way) or "inherit" (router t starts as router t-1
        after its replay, the new expert near `router_new_start`: a task begins near the last task's policy).
        At each task's end the mean coefficient of every expert on the task's windows is logged
        (`task/coefficient/expert_j`) to show such interference.
    router_new_start: with `favour_new` or `inherit`, the new expert's initial coefficient (1.0; for inherit
        measured against 0.05). router_old_start: with `favour_new`, each old expert's initial coefficient
        (0.05). Both in (0, 2), a coefficient's range.
    replay_epochs / replay_batch_size / replay_lr / replay_weight_decay / replay_grad_clip: the coefficient
        replay's fit of the router (10 / 32 / AdamW's defaults 1e-3, 0.01 / 100).
    replay_sample_ratio: share of a task's training windows stored for replay (1.0).
    record_batch_size: batch size of the pass that records a task's coefficients.
    """

    def __init__(
        self,
        *args: Any,
        top_k: int = 3,
        router_hidden: int = 256,
        groups: tuple[str, ...] = GROUPS,
        ranks: dict[str, int] | None = None,
        alphas: dict[str, float] | None = None,
        merge: Literal["weight", "output"] = "weight",
        coefficient_dropout: float = 0.15,
        expert_init: Literal["ortho", "kaiming"] = "ortho",
        router_lr_scale: float = 1.0,
        router_init: Literal["released", "favour_new", "inherit"] = "released",
        router_new_start: float = NEW_START,
        router_old_start: float = FAVOUR_OLD,
        replay_epochs: int = 10,
        replay_batch_size: int = 32,
        replay_lr: float = 1e-3,
        replay_weight_decay: float = 0.01,
        replay_grad_clip: float = 100.0,
        replay_sample_ratio: float = 1.0,
        record_batch_size: int = 64,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        for option, given in (("groups", groups), ("ranks", ranks or {}), ("alphas", alphas or {})):
            check_groups(given, f"model.{option}")
        if expert_init not in INIT_MODES:
            raise ConfigError(f"model.expert_init: {expert_init!r} is not one of {', '.join(INIT_MODES)}")
        if not 0.0 < replay_sample_ratio <= 1.0:
            raise ConfigError(f"model.replay_sample_ratio must be in (0, 1], got {replay_sample_ratio}")
        for option, value in (("router_new_start", router_new_start), ("router_old_start", router_old_start)):
            if not 0.0 < value < 2.0:
                raise ConfigError(f"model.{option} must be in (0, 2), got {value}")
        if replay_epochs < 0 or replay_batch_size < 1 or record_batch_size < 1:
            raise ConfigError("model.replay_epochs must be >= 0 and the replay/record batch sizes >= 1")
        self.policy.requires_grad_(False)
        targets = self.policy.lora_targets()
        self.library = ExpertLibrary(
            self.policy,
            {g: targets[g] for g in targets if g in groups},
            self.num_tasks,
            {**DEFAULT_RANKS, **(ranks or {})},
            {**DEFAULT_ALPHAS, **(alphas or {})},
            merge,
            coefficient_dropout,
        )
        self.lang_dim = self.lang_table.shape[1]
        self.query_dim = query_dim(self.policy, self.stream.shapes, self.lang_dim)
        g = len(self.library.groups)
        # Router t routes over experts 0..t; each starts from its own random initialisation.
        self.routers = nn.ModuleList(
            [
                CoefficientRouter(
                    self.query_dim, g, t + 1, top_k, router_hidden, router_init, (router_old_start, router_new_start)
                )
                for t in range(self.num_tasks)
            ]
        )
        self.memory = CoefficientMemory()
        self.register_buffer("expert_ready", torch.zeros(self.num_tasks, dtype=torch.bool))
        self.expert_init = expert_init
        self.router_lr_scale = router_lr_scale
        self.router_init, self.router_new_start = router_init, router_new_start
        self.replay_epochs, self.replay_batch_size = replay_epochs, replay_batch_size
        self.replay_lr, self.replay_weight_decay = replay_lr, replay_weight_decay
        self.replay_grad_clip, self.replay_sample_ratio = replay_grad_clip, replay_sample_ratio
        self.record_batch_size = record_batch_size
        self.replay_history: list[float] = []  # mean replay loss per epoch of the last replay

    # -- parameters ---------------------------------------------------------------------------
    def task_parameters(self, task_id: int) -> list[nn.Parameter]:
        """Expert `task_id` in every wrapped layer and router `task_id`."""
        return self.library.expert_parameters(task_id) + list(self.routers[task_id].parameters())

    def deepspeed_unsupported(self) -> str | None:
        return "DMPEL trains a new expert and router at each task"

    def trainable_parameters(self) -> list[dict[str, Any]]:
        t = self.current_task
        return [
            {"params": self.library.expert_parameters(t), "name": "experts"},
            {"params": list(self.routers[t].parameters()), "name": "router"},
        ]

    def configure_optimizers(self) -> Any:
        optimizer = self.build_optimizer(self.trainable_parameters())
        for group in optimizer.param_groups:
            if group.get("name") == "router":
                group["lr"] = group["lr"] * self.router_lr_scale
        return self.with_scheduler(optimizer)

    def added_parameters(self, task_id: int) -> int:
        """Parameters a task adds: its expert in every wrapped layer plus its router."""
        return sum(self.library.expert_size(task_id).values()) + sum(
            p.numel() for p in self.routers[task_id].parameters()
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.require_find_unused_parameters("DMPEL trains one task's expert and router at a time")

    # -- task boundaries ----------------------------------------------------------------------
    def on_task_start(self, task_id: int) -> None:
        """Initialises experts 0..t not yet initialised (deterministically), with `inherit` starts router t from
        router t-1 when task t starts afresh (not on a resume within it), and trains expert t + router t only."""
        super().on_task_start(task_id)
        if self.router_init == "inherit" and task_id > 0 and not bool(self.expert_ready[task_id]):
            self.routers[task_id].inherit_from(self.routers[task_id - 1], self.router_new_start)
        for s in range(task_id + 1):
            if not bool(self.expert_ready[s]):
                self.library.init_expert(s, self.expert_init, task_seed(7_919, s))
                self.expert_ready[s] = True
        ExpertFreezing.apply(self, task_id)

    def on_task_end(self, task_id: int) -> None:
        """Records task t's coefficients on all its training windows, then (t > 0) replays them into router t."""
        _, coefficients = self.record_coefficients(task_id)
        self.log_expert_use(task_id, coefficients)
        if task_id > 0:
            self.replay_router(task_id)

    def log_expert_use(self, task_id: int, coefficients: Tensor) -> list[float]:
        """Mean coefficient of each expert 0..t on task t's windows (over windows and groups; 0 where not in
        the top k), logged as task/coefficient/expert_j: an old expert far from 0 is interfering."""
        means = coefficients.float().mean(dim=(0, 1)).tolist()
        if self._trainer is not None and self.logger is not None:
            self.logger.log_metrics({f"task/coefficient/expert_{j}": m for j, m in enumerate(means)}, task_id)
        return means

    # -- routing ------------------------------------------------------------------------------
    def query(self, obs: dict[str, Tensor], lang: Tensor) -> Tensor:
        """(B, Q) router input of each window, computed with every expert off."""
        return routing_query(self.policy, obs, lang, self.library)

    def bc_loss(self, batch: dict[str, Any]) -> Tensor:
        """The NLL with the current router's per-sample coefficients in every wrapped layer."""
        lang = self.lang(batch["task"])
        coefficients = self.routers[self.current_task].dense(self.query(batch["obs"], lang))
        with self.library.routing(coefficients):
            return self.policy.nll(batch["obs"], lang, batch["actions"])

    # -- coefficient replay -------------------------------------------------------------------
    @torch.no_grad()
    def record_coefficients(
        self, task_id: int, dataset: Dataset | None = None, num_workers: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Stores (query, router t's dense top-k coefficients) of task t's training windows (eval mode, no
        augmentation; `dataset`: the datamodule's by default); a seeded `replay_sample_ratio` share of them.
        Returns the stored pair."""
        queries, targets = [], []
        for batch in self.ordered_windows(task_id, self.record_batch_size, dataset, num_workers):
            q = self.query(batch["obs"], self.lang(batch["task"]))
            queries.append(q[:, self.lang_dim :].cpu())
            targets.append(self.routers[task_id].dense(q).cpu())
        queries_t, targets_t = torch.cat(queries), torch.cat(targets)
        keep = max(1, round(self.replay_sample_ratio * len(queries_t)))
        if keep < len(queries_t):
            g = torch.Generator().manual_seed(task_seed(6_151, task_id))
            idx = torch.randperm(len(queries_t), generator=g)[:keep].sort().values
            queries_t, targets_t = queries_t[idx], targets_t[idx]
        self.memory.store(task_id, queries_t, targets_t)
        return queries_t, targets_t

    def replay_set(self, task_id: int) -> tuple[Tensor, Tensor]:
        """All stored windows of tasks 0..t: full queries (N, Q) and targets zero-padded to (N, G, t+1)."""
        queries, targets = [], []
        for s in range(task_id + 1):
            q, c = self.memory.queries[s], self.memory.targets[s]
            lang = self.lang_table[s].cpu().float().expand(len(q), -1)
            queries.append(torch.cat([lang, q], dim=1))
            targets.append(F.pad(c, (0, task_id + 1 - c.shape[-1])))
        return torch.cat(queries), torch.cat(targets)

    def replay_router(self, task_id: int) -> list[float]:
        """Fits router t alone to the stored coefficients of tasks 0..t (MSE over all G x (t+1) entries,
        AdamW, seeded shuffles) and keeps the epoch of lowest mean loss. Returns the per-epoch means."""
        router = self.routers[task_id]
        queries, targets = self.replay_set(task_id)
        params = list(router.parameters())
        flags = [p.requires_grad for p in params]
        optimizer = torch.optim.AdamW(params, lr=self.replay_lr, weight_decay=self.replay_weight_decay)
        g = torch.Generator().manual_seed(task_seed(104_729, task_id))
        history: list[float] = []
        best: dict[str, Tensor] | None = None
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
                for _ in range(self.replay_epochs):
                    total, count = 0.0, 0
                    for idx in torch.randperm(len(queries), generator=g).split(self.replay_batch_size):
                        q, c = queries[idx].to(self.device), targets[idx].to(self.device)
                        loss = F.mse_loss(router.dense(q), c)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, self.replay_grad_clip)
                        optimizer.step()
                        total, count = total + loss.item() * len(idx), count + len(idx)
                    history.append(total / count)
                    if history[-1] == min(history):
                        best = {k: v.detach().clone() for k, v in router.state_dict().items()}
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        if best is not None:
            router.load_state_dict(best)
        self.replay_history = history
        if history and self._trainer is not None and self.logger is not None:
            self.logger.log_metrics(
                {
                    "train/replay_mse_first": history[0],
                    "train/replay_mse": min(history),
                    "train/replay_best_epoch": float(int(np.argmin(history))),
                },
                step=self.global_step,
            )
        return history

    # -- rollouts -----------------------------------------------------------------------------
    def prepare_step(self, obs: dict[str, Tensor], lang: Tensor, ids: Tensor, reset: Tensor, task_id: int) -> None:
        """Routes each episode by the mean of its last `window` step queries with the current router (the
        task id is not used); the coefficients stay set until `finish_step`."""
        means = self.episode_query_means(self.query(obs, lang), ids, reset)
        self.library.set_coefficients(self.routers[self.current_task].dense(means))

    def finish_step(self) -> None:
        self.library.clear()
