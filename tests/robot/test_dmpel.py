"""DMPEL: the LoRA expert pool and its merge maths, the router, per-task freezing, orthogonal expert
initialisation, coefficient replay, rollout-time routing and checkpoint round trips."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from callbacks import ExpertFreezing, TaskSwitch
from callbacks.base import ContinualCallback
from cli.errors import ConfigError
from datamodules.base import ContinualDataModule
from datamodules.robot.stream import EnvSpec, RobotTaskStream
from lightning_modules.nn.robot.experts import ExpertPool, MoELoRALinear
from lightning_modules.nn.robot.policy import PolicyConfig
from lightning_modules.nn.robot.router import CoefficientRouter
from lightning_modules.robot.dmpel import DMPEL
from tests.helpers import check_deepspeed_claim

LOWDIM = (("ee_states", (3,)), ("gripper_states", (1,)), ("object_states", (14,)), ("goal_states", (3,)))
WINDOW, ACTION = 4, 4


def make_stream(num_tasks: int = 2, cameras: bool = False) -> RobotTaskStream:
    names = tuple(f"task-{t}" for t in range(num_tasks))
    shapes = LOWDIM + ((("corner_rgb", (3, 16, 16)),) if cameras else ())
    return RobotTaskStream(
        task_names=names,
        instructions=tuple(f"do thing number {t}" for t in range(num_tasks)),
        obs_shapes=shapes,
        action_dim=ACTION,
        window=WINDOW,
        env=EnvSpec(suite="metaworld", env_names=names),
    )


def make_module(num_tasks: int = 2, cameras: bool = False, seed: int = 0, **kw) -> DMPEL:
    torch.manual_seed(seed)
    config = PolicyConfig(
        embed_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        film_hidden=32,
        gmm_hidden=32,
        image_encoder="tiny_clip" if cameras else "cnn",
    )
    return DMPEL(stream=make_stream(num_tasks, cameras), policy=config, language_encoder="tiny", **kw)


class Windows(Dataset):
    """Random windows of one task; actions depend on the state so that the policy has something to learn."""

    def __init__(self, task: int, n: int = 24, cameras: bool = False):
        g = torch.Generator().manual_seed(100 + task)
        shapes = LOWDIM + ((("corner_rgb", (3, 16, 16)),) if cameras else ())
        self.obs = {k: torch.rand(n, WINDOW, *s, generator=g) for k, s in shapes}
        sign = 1.0 if task % 2 == 0 else -1.0
        self.actions = (sign * self.obs["ee_states"][..., :ACTION].repeat(1, 1, 2)[..., :ACTION]).clamp(-1, 1)
        self.task = task

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, i: int) -> dict:
        return {
            "obs": {k: v[i] for k, v in self.obs.items()},
            "actions": self.actions[i],
            "task": torch.tensor(self.task),
        }


def batch_of(ds: Windows, n: int = 6) -> dict:
    return {
        "obs": {k: v[:n] for k, v in ds.obs.items()},
        "actions": ds.actions[:n],
        "task": torch.full((n,), ds.task, dtype=torch.long),
    }


def pools(module: DMPEL) -> list[ExpertPool]:
    return [pool for _, layer in module.library.all_layers() for pool in layer.pools]


# -- the wrapper's maths ------------------------------------------------------------------------
def tiny_wrapper(merge: str, dropout: float = 0.0) -> MoELoRALinear:
    torch.manual_seed(3)
    layer = MoELoRALinear(nn.Linear(3, 5), 2, rank=2, alpha=4.0, slices=[(0, 2), (3, 5)], merge=merge, dropout=dropout)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape))
    return layer


def test_weight_merge_is_a_product_of_mixtures_with_cross_terms():
    layer = tiny_wrapper("weight").eval()
    x = torch.randn(6, 3)  # 2 samples x 3 rows each (time folded into the batch, sample-major)
    c = torch.tensor([[0.7, 0.4], [1.5, 0.2]])
    layer.set_coefficients(c)
    y = layer(x)
    base = layer.base_layer(x)
    expected = base.clone()
    for i in range(6):
        c0, c1 = c[i // 3]
        for (start, end), pool in zip(layer.slices, layer.pools, strict=True):
            a0, a1, b0, b1 = pool.A[0], pool.A[1], pool.B[0], pool.B[1]
            xi = x[i : i + 1]
            cross = c0 * c0 * xi @ a0 @ b0 + c0 * c1 * xi @ a0 @ b1 + c1 * c0 * xi @ a1 @ b0 + c1 * c1 * xi @ a1 @ b1
            expected[i, start:end] += 2.0 * cross[0]  # alpha / rank = 2
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.equal(y[:, 2], base[:, 2])  # the output between the slices is not adapted
    layer.set_coefficients(c[:, :1])  # only expert 0 of the pool
    pool = layer.pools[0]
    assert torch.allclose(
        layer(x)[:, :2],
        base[:, :2] + 2.0 * c[:, :1].repeat_interleave(3, 0) ** 2 * (x @ pool.A[0] @ pool.B[0]),
        atol=1e-5,
    )


def test_output_merge_and_the_off_switch():
    layer = tiny_wrapper("output").eval()
    x = torch.randn(4, 2, 3)  # leading dim 4 = 2 samples x 2
    c = torch.tensor([[0.3, 1.1], [0.9, 0.5]])
    layer.set_coefficients(c)
    base = layer.base_layer(x)
    expected = base.clone()
    for i in range(4):
        c0, c1 = c[i // 2]
        for (start, end), pool in zip(layer.slices, layer.pools, strict=True):
            out = c0 * x[i] @ pool.A[0] @ pool.B[0] + c1 * x[i] @ pool.A[1] @ pool.B[1]
            expected[i, :, start:end] += 2.0 * out
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.enabled = False
    assert torch.equal(layer(x), base)
    layer.enabled = True
    layer.set_coefficients(None)
    assert torch.equal(layer(x), base)
    layer.set_coefficients(c)
    with pytest.raises(RuntimeError, match="does not fit"):
        layer(torch.randn(3, 3))


def test_coefficient_dropout_in_training_only():
    layer = tiny_wrapper("weight", dropout=0.5)
    x = torch.randn(64, 3)
    c = torch.ones(64, 1)
    layer.set_coefficients(c)
    pool = layer.pools[0]
    full = 2.0 * (x @ pool.A[0] @ pool.B[0])
    base = layer.base_layer(x)[:, :2]
    torch.manual_seed(0)
    delta = layer.train()(x)[:, :2] - base
    dropped = delta.abs().sum(1) < 1e-6
    kept = torch.isclose(delta, 4.0 * full, atol=1e-4).all(1)  # (c / (1 - p))^2 = 4 in the weight merge
    assert (dropped | kept).all() and dropped.any() and kept.any()
    assert torch.allclose(layer.eval()(x)[:, :2] - base, full, atol=1e-5)


# -- the router ---------------------------------------------------------------------------------
def test_router_sparsity_range_and_initial_coefficients():
    router = CoefficientRouter(10, groups=3, experts=5, top_k=3, hidden=16)
    q = torch.randn(64, 10) * 3
    raw = router(q)
    assert raw.shape == (64, 3, 5) and (raw > 0).all() and (raw < 2).all()
    dense = router.dense(q)
    assert ((dense != 0).sum(-1) == 3).all()
    top = raw.topk(3, dim=-1).values
    assert torch.allclose(dense.topk(3, dim=-1).values, top)  # kept values, not renormalised
    assert not torch.allclose(dense.sum(-1), torch.ones(64, 3))
    assert CoefficientRouter(10, 3, 2, top_k=3).k == 2
    assert ((CoefficientRouter(10, 3, 2, top_k=3).dense(q) != 0).sum(-1) == 2).all()
    # The last bias is logit(0.5 / k): every coefficient starts near 1 / k (exactly without the weights).
    assert router(q).mean().item() == pytest.approx(1 / 3, abs=0.1)
    with torch.no_grad():
        router.out.weight.zero_()
    assert torch.allclose(router(q), torch.full((64, 3, 5), 1 / 3), atol=1e-6)
    for k in (1, 2):
        r = CoefficientRouter(10, 2, k, top_k=3)
        with torch.no_grad():
            r.out.weight.zero_()
        assert torch.allclose(r.dense(q).sum(-1), torch.ones(64, 2), atol=1e-6)


def test_favour_new_starts_the_new_expert_near_one_and_old_ones_near_zero():
    q = torch.randn(64, 10) * 3
    router = CoefficientRouter(10, groups=3, experts=5, top_k=3, hidden=16, init="favour_new")
    with torch.no_grad():
        router.out.weight.zero_()  # the bias alone: exactly the chosen starting coefficients
    raw = router(q)
    torch.testing.assert_close(raw[..., -1], torch.ones(64, 3))
    torch.testing.assert_close(raw[..., :-1], torch.full((64, 3, 4), 0.05))
    assert bool((router.dense(q)[..., -1] == raw[..., -1]).all())  # the new expert is always kept
    with pytest.raises(ConfigError, match="model.router_init"):
        CoefficientRouter(10, 3, 5, init="uniform")


def test_favour_new_starts_at_the_given_coefficients():
    m = make_module(num_tasks=3, router_init="favour_new", router_old_start=0.01, router_new_start=1.5)
    router = m.routers[2]
    with torch.no_grad():
        router.out.weight.zero_()
    raw = router(torch.randn(8, m.query_dim))
    torch.testing.assert_close(raw[..., -1], torch.full((8, router.groups), 1.5))
    torch.testing.assert_close(raw[..., :-1], torch.full((8, router.groups, 2), 0.01))
    with pytest.raises(ConfigError, match="model.router_old_start"):
        make_module(num_tasks=2, router_init="favour_new", router_old_start=2.0)


# k = 2 experts: 1/k each when released; inherit: router 0's start (k = 1: 1.0) and `router_new_start`
STARTS = {"released": (0.5, 0.5), "favour_new": (0.05, 1.0), "inherit": (1.0, 1.0)}


@pytest.mark.parametrize("router_init", list(STARTS))
def test_a_new_tasks_router_starts_as_chosen_and_its_expert_learns_from_the_first_step(router_init):
    m = make_module(num_tasks=2, router_init=router_init)
    m.on_task_start(0)
    with torch.no_grad():
        m.routers[0].out.weight.zero_()
    m.on_task_start(1)
    router = m.routers[1]
    with torch.no_grad():
        router.out.weight.zero_()
    batch = batch_of(Windows(1))
    coefficients = router(m.query(batch["obs"], m.lang(batch["task"])))
    old, new = STARTS[router_init]
    torch.testing.assert_close(coefficients[..., 0], torch.full_like(coefficients[..., 0], old))
    torch.testing.assert_close(coefficients[..., 1], torch.full_like(coefficients[..., 1], new))
    m.bc_loss(batch).backward()
    grads = [p.grad for p in m.library.expert_parameters(1)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # expert 1 moves at its first step
    assert all(p.grad is None for p in m.library.expert_parameters(0))  # expert 0 is frozen


def test_inherit_starts_each_router_as_the_last_one_once_per_task():
    m = make_module(num_tasks=3, router_init="inherit", router_new_start=0.3)
    batch = batch_of(Windows(1))
    q = m.query(batch["obs"], m.lang(batch["task"]))
    m.on_task_start(0)
    with torch.no_grad():  # stands in for task 0's training and replay
        for p in m.routers[0].parameters():
            p.add_(torch.randn_like(p))
    m.on_task_start(1)
    before = m.routers[0](q)
    torch.testing.assert_close(m.routers[1](q)[..., :1], before)  # the old expert as router 0 left it
    with torch.no_grad():
        m.routers[1].out.weight.view(m.routers[1].groups, 2, -1)[:, 1] = 0
    torch.testing.assert_close(m.routers[1](q)[..., 1], torch.full_like(before[..., 0], 0.3))
    with torch.no_grad():  # task 1's training
        for p in m.routers[1].parameters():
            p.add_(torch.randn_like(p))
    trained = {k: v.clone() for k, v in m.routers[1].state_dict().items()}
    m.on_task_start(1)  # a resume within task 1 keeps its router as trained
    assert all(torch.equal(v, m.routers[1].state_dict()[k]) for k, v in trained.items())
    m.on_task_start(2)
    torch.testing.assert_close(m.routers[2](q)[..., :2], m.routers[1](q))
    with pytest.raises(ConfigError, match="model.router_new_start"):
        make_module(num_tasks=2, router_init="inherit", router_new_start=0.0)


def test_expert_use_is_the_mean_coefficient_of_each_expert():
    m = make_module(num_tasks=2)
    coefficients = torch.tensor([[[0.2, 1.0], [0.0, 0.6]], [[0.4, 0.8], [0.2, 0.0]]])  # (windows, groups, experts)
    assert m.log_expert_use(1, coefficients) == pytest.approx([0.2, 0.6])


# -- the module ---------------------------------------------------------------------------------
def test_pool_growth_and_what_trains_per_task():
    m = make_module(num_tasks=3)
    assert m.library.groups == ["extra", "fusion", "tem", "head"]  # no `img` without a CLIP tower
    assert m.query_dim == 32 + 3 + 1 + 14 + 3
    assert [r.out.out_features for r in m.routers] == [4, 8, 12]
    assert all(layer.num_experts == 3 for _, layer in m.library.all_layers())
    assert [len(layer.pools) for layer in m.library.layers["tem"]] == [2, 2]  # q and v slices
    assert m.library.layers["tem"][0].slices == [(0, 32), (64, 96)]
    assert all(layer.rank == 16 and layer.scale == 1.0 for _, layer in m.library.all_layers())
    assert not any(p.requires_grad for n, p in m.policy.named_parameters() if "base_layer" in n or "pools" not in n)
    for t in range(3):
        m.on_task_start(t)
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in m.task_parameters(t)}
        groups = m.trainable_parameters()
        assert [g["name"] for g in groups] == ["experts", "router"]
        assert {id(p) for g in groups for p in g["params"]} == trainable
        assert bool(m.expert_ready[: t + 1].all()) and not bool(m.expert_ready[t + 1 :].any())
    # Added per task: one expert (A and B per layer and slice) plus router t.
    expert = 0
    for _, layer in m.library.all_layers():
        for start, end in layer.slices:
            expert += layer.rank * (layer.base_layer.in_features + end - start)
    for t in range(3):
        router = m.query_dim * 256 + 256 + 256 * 256 + 256 + (256 + 1) * 4 * (t + 1)
        assert m.added_parameters(t) == expert + router


def test_router_lr_scale_gives_the_router_its_own_rate():
    m = make_module(router_lr_scale=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.1))
    m.on_task_start(0)
    optimizer = m.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"experts": 1e-4, "router": 5e-5}
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)


def test_orthogonal_initialisation_of_later_experts():
    m = make_module(num_tasks=3)
    for t in range(3):
        m.on_task_start(t)
    for pool in pools(m):
        a0, a1, a2 = (pool.A[k].detach().flatten().double() for k in range(3))
        bound = 1 / math.sqrt(a0.numel())
        assert a0.abs().max() <= bound and a0.std() > 0.4 * bound  # kaiming-uniform, fan-in in * r
        for new, old in ((a1, [a0]), (a2, [a0, a1])):
            assert new.norm().item() == pytest.approx(1.0, abs=1e-5)
            for o in old:
                assert abs(torch.dot(new, o).item()) < 1e-5
        assert all(not pool.B[k].any() for k in range(3))
    # Seeded by the run seed, not the global RNG: another module draws the same experts.
    other = make_module(num_tasks=3, seed=7)
    for t in range(3):
        other.on_task_start(t)
    assert all(torch.equal(p.A[2], q.A[2]) for p, q in zip(pools(m), pools(other), strict=True))
    kaiming = make_module(num_tasks=2, expert_init="kaiming")
    kaiming.on_task_start(0)
    kaiming.on_task_start(1)
    pool = pools(kaiming)[0]
    assert pool.A[1].abs().max() <= 1 / math.sqrt(pool.A[1].numel())


@pytest.mark.parametrize("in_features, rank", [(1, 1), (2, 1), (2, 2)])
def test_orthogonal_init_falls_back_to_kaiming_once_the_pool_spans_the_space(in_features, rank):
    n = in_features * rank  # directions of the flattened A
    pool = ExpertPool(in_features, 3, num_experts=n + 2, rank=rank)
    g = torch.Generator().manual_seed(11)
    for k in range(n + 2):
        pool.init_expert(k, "ortho", g)
    A = [a.detach().flatten().double() for a in pool.A]
    for k in range(1, n):  # unit norm, orthogonal to the earlier experts, until the space is spanned
        assert A[k].norm().item() == pytest.approx(1.0, abs=1e-6)
        assert all(abs(torch.dot(A[k], A[j]).item()) < 1e-6 for j in range(k))
    # Experts n and n + 1 have no direction left: kaiming-uniform, drawn after the Gaussian vector.
    replay = torch.Generator().manual_seed(11)
    bound = 1 / math.sqrt(n)
    torch.empty(in_features, rank).uniform_(-bound, bound, generator=replay)  # expert 0
    for _ in range(1, n):
        torch.randn(n, generator=replay, dtype=torch.float64)
    for k in (n, n + 1):
        torch.randn(n, generator=replay, dtype=torch.float64)
        expected = torch.empty(in_features, rank).uniform_(-bound, bound, generator=replay)
        assert torch.isfinite(pool.A[k]).all() and torch.equal(pool.A[k].detach(), expected)
    assert all(not b.any() for b in pool.B)


class RandomWindows(ContinualDataModule):
    def __init__(self, stream: RobotTaskStream):
        super().__init__(batch_size=8, seed=0)
        self._stream = stream
        self.data = [Windows(t) for t in range(stream.num_tasks)]

    @property
    def task_names(self) -> list[str]:
        return list(self._stream.task_names)

    @property
    def stream(self) -> RobotTaskStream:
        return self._stream

    def train_dataset(self, task_id: int) -> Dataset:
        return self.data[task_id]

    def eval_dataset(self, task_id: int) -> Dataset:
        return self.data[task_id]


class Snapshot(ContinualCallback):
    """Copies every tensor of the module when task 1 starts."""

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        if task_id == 1:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}


def test_training_task_one_leaves_expert_zero_and_router_zero_bit_identical():
    m = make_module(replay_epochs=3, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1))
    dm = RandomWindows(m.stream)
    snap = Snapshot()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,  # TaskSwitch sets the real number
        callbacks=[TaskSwitch(steps_per_task=4), ExpertFreezing(), snap],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, datamodule=dm)
    check_deepspeed_claim(trainer, m)
    after = m.state_dict()
    expert0 = [k for k in after if k.endswith((".A.0", ".B.0"))]
    expert1 = [k for k in after if k.endswith((".A.1", ".B.1"))]
    assert expert0 and len(expert0) == len(expert1)
    assert all(torch.equal(after[k], snap.state[k]) for k in expert0)  # frozen, no weight decay
    assert all(torch.equal(after[k], snap.state[k]) for k in after if k.startswith("routers.0."))
    assert all(torch.equal(after[k], snap.state[k]) for k in after if "base_layer" in k)
    assert any(not torch.equal(after[k], snap.state[k]) for k in expert1 if k.endswith(".B.1"))
    assert any(snap.state[k].any() for k in expert0 if k.endswith(".B.0"))  # expert 0 did learn in task 0
    # Both tasks' coefficients were recorded at their ends, and task 1's router was replayed.
    assert [len(q) for q in m.memory.queries] == [24, 24]
    assert [tuple(c.shape[1:]) for c in m.memory.targets] == [(4, 1), (4, 2)]
    assert len(m.replay_history) == 3


def recorded(num_tasks: int = 2, **kw) -> tuple[DMPEL, list[Windows]]:
    """A module that has recorded task 0's coefficients and started (and recorded) task 1."""
    m = make_module(num_tasks=num_tasks, **kw)
    data = [Windows(t, n=48) for t in range(num_tasks)]
    m.on_task_start(0)
    m.record_coefficients(0, data[0])
    m.on_task_start(1)
    m.record_coefficients(1, data[1])
    return m, data


def test_coefficient_replay_restores_the_old_tasks_coefficients():
    m, _ = recorded(replay_epochs=10)
    queries, targets = m.replay_set(1)
    assert queries.shape == (96, m.query_dim) and targets.shape == (96, 4, 2)
    assert not targets[:48, :, 1].any()  # task 0 never saw expert 1: its target is 0
    assert torch.equal(queries[:48, :32], m.lang_table[0].expand(48, -1))  # instruction restored
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(m.routers[1].dense(queries[:48]), targets[:48]).item()
    history = m.replay_router(1)
    assert len(history) == 10 and min(history) < 0.5 * history[0]
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(m.routers[1].dense(queries[:48]), targets[:48]).item()
    assert after < 0.5 * before
    assert all(not p.requires_grad for p in m.routers[0].parameters())  # flags restored
    assert all(p.requires_grad for p in m.routers[1].parameters())


def test_replay_sample_ratio_keeps_a_seeded_share():
    m = make_module(replay_sample_ratio=0.25)
    m.on_task_start(0)
    q, c = m.record_coefficients(0, Windows(0, n=48))
    assert len(q) == 12 and len(c) == 12
    q2, _ = m.record_coefficients(0, Windows(0, n=48))  # recording task 0 again replaces its set
    assert torch.equal(q, q2) and len(m.memory) == 1


def test_rollout_routing_averages_each_episodes_query_fifo():
    m, _ = recorded()
    m.eval()
    g = torch.Generator().manual_seed(5)

    def step_obs(n: int) -> dict:
        return {k: torch.rand(n, 1, *s, generator=g) for k, s in LOWDIM}

    lang = m.lang_table[0].expand(2, -1)
    ids = torch.tensor([0, 1])
    layer = m.library.layers["head"][0]
    queries = []
    for step in range(WINDOW + 2):
        obs = step_obs(2)
        queries.append(m.query(obs, lang))
        reset = torch.tensor([step == 0, step in (0, 3)])
        m.prepare_step(obs, lang, ids, reset, task_id=0)  # task id 0, but the current router (1) routes
    mean0 = torch.stack([q[0] for q in queries[-WINDOW:]]).mean(0)  # episode 0: the last `window` steps
    mean1 = torch.stack([q[1] for q in queries[3:]]).mean(0)  # episode 1: since its reset at step 3
    expected = m.routers[1].dense(torch.stack([mean0, mean1]))
    assert torch.allclose(layer.coefficients, expected[:, m.library.groups.index("head")], atol=1e-6)


def test_act_routes_every_transformer_call_with_its_own_rows():
    m, _ = recorded()
    m.eval()
    layer = m.library.layers["tem"][0]
    seen = []
    layer.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape[0], mod.coefficients.clone())))
    rng = np.random.default_rng(0)

    def obs(n: int) -> dict:
        return {k: rng.random((n, *s), dtype=np.float32) for k, s in LOWDIM}

    ids = np.array([4, 7, 9])
    m.act(obs(3), ids, np.array([True, True, True]), task_id=0)
    seen.clear()
    actions = m.act(obs(3), ids, np.array([False, True, False]), task_id=1)  # histories of 2, 1 and 2 steps
    assert actions.shape == (3, ACTION) and np.abs(actions).max() <= 1
    assert [n for n, _ in seen] == [1, 2]  # one transformer call per history length, rows in order
    g = m.library.groups.index("tem")
    for (_, coefficients), rows in zip(seen, ([7], [4, 9]), strict=True):
        means = torch.stack([m._query_fifo[i].mean(0) for i in rows])
        assert torch.allclose(coefficients, m.routers[1].dense(means)[:, g], atol=1e-6)
    assert layer.coefficients is None  # cleared after the call


def test_checkpoint_round_trip_keeps_outputs_and_replay_sets():
    m, data = recorded(replay_epochs=2)
    with torch.no_grad():
        for pool in pools(m):
            pool.B[0].normal_()
            pool.B[1].normal_()
    m.replay_router(1)
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = make_module(seed=11, replay_epochs=2)
    fresh.on_task_start(0)
    fresh.on_task_start(1)
    fresh.load_state_dict(state)
    m.eval()
    fresh.eval()
    batch = batch_of(data[0])
    with torch.no_grad():
        assert torch.equal(m.bc_loss(batch), fresh.bc_loss(batch))
        assert not torch.equal(m.bc_loss(batch), m.policy.nll(batch["obs"], m.lang(batch["task"]), batch["actions"]))
    for a, b in ((m.memory.queries, fresh.memory.queries), (m.memory.targets, fresh.memory.targets)):
        assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(m.replay_set(1), fresh.replay_set(1), strict=True))


def test_camera_query_uses_frozen_features_and_img_experts_adapt_the_encoder():
    m = make_module(cameras=True)
    assert m.library.groups == ["img", "extra", "fusion", "tem", "head"]
    assert all(layer.rank == 8 and layer.scale == 2.0 for layer in m.library.layers["img"])
    assert m.query_dim == 32 + 32 + 21
    m.on_task_start(0)
    with torch.no_grad():
        for pool in pools(m):
            pool.B[0].normal_()
    m.eval()
    ds = Windows(0, n=4, cameras=True)
    batch = batch_of(ds, n=4)
    lang = m.lang(batch["task"])
    images = batch["obs"]["corner_rgb"]
    with torch.no_grad():
        frozen = m.policy.image(images.flatten(0, 1)).view(4, WINDOW, -1).mean(1)
        q = m.query(batch["obs"], lang)
        assert torch.allclose(q[:, 32:64], frozen, atol=1e-6)
        assert torch.equal(q[:, 64:67], batch["obs"]["ee_states"].mean(1))
        with m.library.routing(m.routers[0].dense(q)):
            adapted = m.policy.image(images.flatten(0, 1)).view(4, WINDOW, -1).mean(1)
            assert torch.allclose(m.query(batch["obs"], lang), q)  # the query ignores the experts
        assert not torch.allclose(adapted, frozen, atol=1e-4)
        m.bc_loss(batch)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"groups": ("txt",)}, "model.groups"),
        ({"ranks": {"vision": 4}}, "model.ranks"),
        ({"merge": "sum"}, "model.merge"),
        ({"expert_init": "zeros"}, "model.expert_init"),
        ({"replay_sample_ratio": 0.0}, "model.replay_sample_ratio"),
        ({"top_k": 0}, "model.top_k"),
    ],
)
def test_config_errors_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        make_module(**kwargs)


class RecordRanks(ContinualCallback):
    """Saves this rank's trainable tensors after the first step of each task, and its state at the end."""

    def __init__(self, out: str):
        self.out, self.pending = out, None

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        self.pending = task_id

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pending is not None:
            params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            torch.save(params, os.path.join(self.out, f"task{self.pending}_rank{trainer.global_rank}.pt"))
            self.pending = None

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), os.path.join(self.out, f"final_rank{trainer.global_rank}.pt"))


def fit_two_ranks(module: nn.Module, strategy: str, recorder: ContinualCallback) -> None:
    """Two CPU processes, two tasks of three steps, `recorder` saving what the test compares."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        callbacks=[TaskSwitch(steps_per_task=3), ExpertFreezing(), recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=RandomWindows(module.stream))


def fit_under_ddp(strategy: str, out: str) -> None:
    """Run by `test_ddp_keeps_ranks_in_sync` in a subprocess."""
    m = make_module(replay_epochs=2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1))
    fit_two_ranks(m, strategy, RecordRanks(out))


@pytest.mark.slow
def test_ddp_keeps_ranks_in_sync_and_plain_ddp_is_refused(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def run(strategy: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, __file__, strategy, str(tmp_path)]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    done = run("ddp_find_unused_parameters_true")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("task0", "task1", "final"):
        a, b = (torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(2))
        tensors = [k for k in a if torch.is_tensor(a[k])]
        assert tensors and all(torch.equal(a[k], b[k]) for k in tensors)
    replay = a["memory._extra_state"]  # each rank recorded the whole task: the same replay sets
    assert all(torch.equal(x, y) for x, y in zip(replay["targets"], b["memory._extra_state"]["targets"], strict=True))
    refused = run("ddp")
    assert refused.returncode != 0 and "ddp_find_unused_parameters_true" in refused.stderr


if __name__ == "__main__":
    fit_under_ddp(sys.argv[1], sys.argv[2])
