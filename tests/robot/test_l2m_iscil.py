"""L2M (key selection, usage penalty, pull term, rollout queries) and IsCiL (k-means prototypes, retrieval,
slot copying and freezing, mixed-slot batches, checkpoints), each also trained on two tiny tasks."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import ExpertFreezing, TaskSwitch
from callbacks.base import ContinualCallback
from cli.errors import ConfigError
from lightning_modules.nn.robot.policy import PolicyConfig
from lightning_modules.robot.iscil import IsCiL, SlotLinear, kmeans
from lightning_modules.robot.l2m import L2M
from tests.helpers import check_deepspeed_claim
from tests.robot.test_dmpel import ACTION, LOWDIM, WINDOW, RandomWindows, Windows, batch_of, fit_two_ranks, make_stream

CONFIG = dict(embed_size=32, num_layers=2, num_heads=2, mlp_dim=64, film_hidden=32, gmm_hidden=32)


def make(cls, num_tasks: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(stream=make_stream(num_tasks), policy=PolicyConfig(**CONFIG), language_encoder="tiny", **kw)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)


def fit(module, snapshot: ContinualCallback | None = None, steps: int = 3) -> RandomWindows:
    dm = RandomWindows(module.stream)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,  # TaskSwitch sets the real number
        callbacks=[TaskSwitch(steps_per_task=steps), ExpertFreezing()] + ([snapshot] if snapshot else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    check_deepspeed_claim(trainer, module)
    return dm


class Snapshot(ContinualCallback):
    """Copies every tensor of the module when task 1 starts (after the module's own task start)."""

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        if task_id == 1:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}


def step_obs(n: int, g: torch.Generator) -> dict:
    return {k: torch.rand(n, 1, *s, generator=g) for k, s in LOWDIM}


# -- L2M ----------------------------------------------------------------------------------------
def frozen_query(m: L2M, obs: dict, lang: torch.Tensor) -> torch.Tensor:
    """The frozen policy's mean readout, computed without the module's helpers."""
    policy = m.policy
    with torch.no_grad(), m.library.disabled():
        was = policy.training
        policy.eval()
        out = policy.temporal(policy.encode(obs, lang)).mean(1)
        policy.train(was)
    return out


def hand_cosines(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([torch.dot(a, k) / (a.norm() * k.norm()) for k in keys]) for a in q])


def test_l2m_pool_every_expert_and_key_trains_in_every_task():
    m = make(L2M, pool_size=5)
    assert m.library.groups == ["tem"]  # no `img` without a CLIP tower
    assert all(layer.num_experts == 5 and layer.rank == 8 and layer.scale == 1.0 for _, layer in m.library.all_layers())
    assert m.keys.shape == (5, 32) and m.keys.abs().max() <= 1 and m.keys.min() < 0 < m.keys.max()
    for _, layer in m.library.all_layers():
        for pool in layer.pools:
            assert all(not b.any() for b in pool.B) and all(a.any() for a in pool.A)  # B = 0, A random
    pool_params = {id(p) for k in range(5) for p in m.library.expert_parameters(k)} | {id(m.keys)}
    for t in range(2):
        m.on_task_start(t)
        assert {id(p) for p in m.parameters() if p.requires_grad} == pool_params
        assert {id(p) for p in m.trainable_parameters()} == pool_params
    per_expert = sum(layer.rank * (32 + 32) * 2 for _, layer in m.library.all_layers())  # q and v slices
    assert m.added_parameters(0) == 5 * per_expert + 5 * 32 and m.added_parameters(1) == 0


def test_l2m_selects_the_key_of_highest_cosine_and_uses_that_expert():
    m = make(L2M, pool_size=6).eval()
    batch = batch_of(Windows(0), n=6)
    lang = m.lang(batch["task"])
    q = frozen_query(m, batch["obs"], lang)
    with torch.no_grad():
        for pool in (p for _, layer in m.library.all_layers() for p in layer.pools):
            for b in pool.B:
                b.normal_()
        m.keys[2] = q[0]  # sample 0 is closest to key 2, sample 1 to key 4
        m.keys[4] = q[1]
    assert torch.allclose(m.query(batch["obs"], lang), q)  # experts and dropout off
    cos = hand_cosines(q, m.keys.detach())
    assert torch.allclose(m.similarities(q), cos, atol=1e-5)
    selected = m.select(m.similarities(q))
    assert torch.equal(selected, cos.argmax(-1))
    assert selected[0] == 2 and selected[1] == 4
    one_hot = F.one_hot(selected, 6).float()[:, None, :]
    with torch.no_grad():
        with m.library.routing(one_hot):
            expected = m.policy.nll(batch["obs"], lang, batch["actions"])
        assert torch.equal(m.bc_loss(batch), expected)
        assert not torch.equal(expected, m.policy.nll(batch["obs"], lang, batch["actions"]))
    assert int(m.forward_passes) == 0 and not m.usage.any()  # eval passes are not counted


def test_usage_penalty_changes_the_selection_in_training_only():
    m = make(L2M, pool_size=4, count_penalty_steps=10)
    batch = batch_of(Windows(0), n=4)
    q = m.query(batch["obs"], m.lang(batch["task"]))
    with torch.no_grad():
        m.keys.copy_(torch.stack([q[0], q[0] + 0.3 * torch.randn(32), -q[0], torch.randn(32)]))
    cos = hand_cosines(q, m.keys.detach())
    plain = cos.argmax(-1)
    m.usage.copy_(torch.tensor([1000.0, 0.0, 0.0, 0.0]))  # expert 0 (the best match of sample 0) is overused
    freq = (m.usage + 1) / (m.usage + 1).sum()
    weights = (1 / freq) / (1 / freq).sum()
    assert torch.allclose(m.usage_weights(), weights)
    penalised = ((cos + 1) / 2 * weights).argmax(-1)
    assert plain[0] == 0 and penalised[0] != 0
    m.train()
    assert torch.equal(m.select(m.similarities(q)), penalised)
    m.eval()
    assert torch.equal(m.select(m.similarities(q)), plain)
    m.train()
    m.forward_passes.fill_(10)  # the penalty stops after count_penalty_steps forward passes
    assert torch.equal(m.select(m.similarities(q)), plain)


def test_pull_term_and_usage_counts_against_a_hand_computation():
    m = make(L2M, pool_size=5).train()
    batch = batch_of(Windows(0), n=6)
    q = frozen_query(m, batch["obs"], m.lang(batch["task"]))
    with torch.no_grad():
        m.keys[1] = q[0]
    cos = hand_cosines(q, m.keys.detach())
    best = cos.argmax(-1)  # no counts yet: the penalty weights are uniform
    terms = m.training_terms(batch)
    assert set(terms) == {"nll", "pull"}
    assert terms["pull"].item() == pytest.approx(-0.5 * cos.max(-1).values.mean().item(), abs=1e-5)
    assert torch.equal(m.usage, torch.bincount(best, minlength=5).float()) and int(m.forward_passes) == 1
    terms["pull"].backward()
    rows = m.keys.grad.abs().sum(1) > 0
    assert torch.equal(rows, torch.isin(torch.arange(5), best))  # the pull moves the selected keys only
    assert all(p.grad is None for k in range(5) for p in m.library.expert_parameters(k))
    m.zero_grad()
    m.training_terms(batch)["nll"].backward()
    assert m.keys.grad is None or not m.keys.grad.any()  # keys learn from the pull term alone


def test_l2m_rollout_query_is_the_frozen_readout_of_each_episodes_history():
    m = make(L2M, pool_size=6).eval()
    g = torch.Generator().manual_seed(5)
    lang = m.lang_table[0].expand(2, -1)
    ids = torch.tensor([0, 1])
    steps = []
    for step in range(WINDOW + 2):
        obs = step_obs(2, g)
        steps.append(obs)
        reset = torch.tensor([step == 0, step in (0, 3)])
        m.prepare_step(obs, lang, ids, reset, task_id=0)
    layer = m.library.layers["tem"][0]
    for row, first in ((0, 2), (1, 3)):  # episode 0: its last `window` steps; episode 1: since its reset at 3
        window = {k: torch.cat([s[k][row : row + 1] for s in steps[first:]], dim=1) for k in steps[0]}
        q = frozen_query(m, window, lang[:1])
        expected = hand_cosines(q, m.keys.detach()).argmax(-1)
        assert m.selected[row] == expected[0]
        assert torch.equal(layer.coefficients[row], F.one_hot(expected, 6).float()[0])
    m.library.clear()


def test_l2m_act_gives_every_transformer_call_its_rows_selections():
    m = make(L2M, pool_size=6).eval()
    layer = m.library.layers["tem"][0]
    seen = []

    def record(mod, args):
        if mod.enabled:  # the adapted pass, not the frozen query pass
            seen.append((args[0].shape[0], mod.coefficients.clone()))

    layer.register_forward_pre_hook(record)
    rng = np.random.default_rng(0)

    def obs(n: int) -> dict:
        return {k: rng.random((n, *s), dtype=np.float32) for k, s in LOWDIM}

    ids = np.array([4, 7, 9])
    m.act(obs(3), ids, np.array([True, True, True]), task_id=0)
    seen.clear()
    actions = m.act(obs(3), ids, np.array([False, True, False]), task_id=1)  # histories of 2, 1, 2 steps
    assert actions.shape == (3, ACTION) and np.abs(actions).max() <= 1
    assert [n for n, _ in seen] == [1, 2]  # one transformer call per history length, rows in order
    for (_, coefficients), rows in zip(seen, ([7], [4, 9]), strict=True):
        history = torch.stack([m._frozen_queue[i] for i in rows])
        with torch.no_grad(), m.library.disabled():
            q = m.policy.temporal(history).mean(1)
        expected = F.one_hot(hand_cosines(q, m.keys.detach()).argmax(-1), 6).float()
        assert torch.equal(coefficients, expected)
    assert layer.coefficients is None  # cleared after the call


def test_l2m_trains_two_tasks_with_the_whole_pool():
    m = make(L2M, pool_size=4, optimizer=adamw)
    snap = Snapshot()
    fit(m, snap)
    after = m.state_dict()
    assert int(m.forward_passes) == 6 and m.usage.sum().item() == 6 * 8  # 3 steps per task, batch 8
    assert not torch.equal(after["keys"], snap.state["keys"])  # keys train in task 1 too
    assert all(torch.equal(after[k], snap.state[k]) for k in after if "base_layer" in k or k.startswith("policy.head"))
    used = m.usage.nonzero().flatten().tolist()
    changed = [
        k for k in after if k.endswith(tuple(f".B.{e}" for e in used)) and not torch.equal(after[k], snap.state[k])
    ]
    assert changed  # the selected experts learned in task 1


# -- IsCiL: k-means and retrieval ---------------------------------------------------------------
def test_kmeans_finds_two_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([10.0, 0.0, 5.0]) + 0.1 * torch.randn(30, 3, generator=g)
    b = torch.tensor([-10.0, 3.0, 0.0]) + 0.1 * torch.randn(20, 3, generator=g)
    points = torch.cat([a, b])[torch.randperm(50, generator=g)]
    centres = kmeans(points, 2, n_init=3, seed=1)
    centres = centres[centres[:, 0].argsort(descending=True)]
    assert torch.allclose(centres, torch.stack([a.mean(0), b.mean(0)]), atol=1e-5)
    assert torch.equal(kmeans(points, 2, n_init=3, seed=1), kmeans(points, 2, n_init=3, seed=1))  # seeded
    few = kmeans(points[:3], 5, seed=0)  # fewer points than centres: every point is a centre
    assert few.shape == (3, 3) and torch.allclose(few[few[:, 0].argsort()], points[:3][points[:3, 0].argsort()])


def set_prototypes(m: IsCiL, rows: dict[int, torch.Tensor]) -> None:
    for s, p in rows.items():
        m.prototypes[s] = p.expand(m.num_prototypes, -1) if p.dim() == 1 else p
        m.prototype_ready[s] = True


def test_retrieval_picks_the_slot_with_the_closest_prototype_and_masks_later_slots():
    m = make(IsCiL, num_tasks=3, prototypes=2)
    d = m.query_dim
    e = torch.eye(d)
    set_prototypes(m, {0: torch.stack([e[0], e[1]]), 1: torch.stack([e[2], e[3] + e[0]]), 2: torch.stack([e[4], e[4]])})
    queries = torch.stack([e[1] + 0.1 * e[2], e[3] + e[0] + 0.2 * e[1], 2 * e[4] + 0.1 * e[2], e[0] + 0.01 * e[3]])
    m.current_task = 2
    sim = m.slot_similarities(queries)
    q, p = F.normalize(queries, dim=-1), F.normalize(m.prototypes, dim=-1)
    hand = torch.stack([torch.stack([((q[b] @ p[s].T + 1) / 2).max() for s in range(3)]) for b in range(4)])
    assert torch.allclose(sim, hand, atol=1e-6)
    assert m.retrieve(queries).tolist() == [0, 1, 2, 0]
    m.current_task = 1  # slot 2 belongs to a later task: masked
    assert m.retrieve(queries).tolist() == [0, 1, 1, 0] and torch.isinf(m.slot_similarities(queries)[:, 2]).all()
    assert m.retrieve(queries, upto=0).tolist() == [0, 0, 0, 0]
    m.prototype_ready[1] = False  # a slot without prototypes is never retrieved
    assert m.retrieve(queries).tolist() == [0, 0, 0, 0]


def test_slot_is_initialised_as_a_copy_of_the_most_retrieved_slot():
    m = make(IsCiL, num_tasks=3, prototypes=4, kmeans_init=2)
    data = [Windows(t) for t in range(3)]
    m.on_task_start(0)
    assert not m.prepare_task(0, data[0]).any() and int(m.slot_source[0]) == -1
    m.on_task_start(1)
    counts = m.prepare_task(1, data[1])
    assert counts.tolist() == [24, 0, 0] and int(m.slot_source[1]) == 0
    assert all(torch.equal(a, b) for a, b in zip(m.slot_parameters(0), m.slot_parameters(1), strict=True))
    with torch.no_grad():
        for p in m.slot_parameters(1):
            p.add_(torch.randn(p.shape))
    q2 = m.window_queries(2, data[2])
    assert q2.shape == (24, m.query_dim)
    set_prototypes(m, {0: -q2.mean(0), 1: q2.mean(0)})  # task 2's windows look like slot 1's
    m.on_task_start(2)
    counts = m.prepare_task(2, data[2])
    assert counts.tolist() == [0, 24, 0] and int(m.slot_source[2]) == 1
    assert all(torch.equal(a, b) for a, b in zip(m.slot_parameters(1), m.slot_parameters(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(m.slot_parameters(0), m.slot_parameters(2), strict=True))
    assert bool(m.prototype_ready[2]) and m.prototypes[2].shape == (4, m.query_dim)
    assert torch.cdist(q2, m.prototypes[2]).min(1).values.mean() < torch.cdist(q2, q2.mean(0)[None]).mean()


def test_slot_linear_uses_each_samples_slot():
    torch.manual_seed(0)
    layer = SlotLinear(nn.Linear(3, 4), slots=2)
    with torch.no_grad():
        layer.weight[1].normal_()
        layer.bias[1].normal_()
    x = torch.randn(3, 5, 3)
    layer.select([0, 1, 0])
    y = layer(x)
    for b, s in enumerate([0, 1, 0]):
        assert torch.allclose(y[b], F.linear(x[b], layer.weight[s], layer.bias[s]), atol=1e-6)
    layer.select([1, 1, 1])
    assert torch.allclose(layer(x), F.linear(x, layer.weight[1], layer.bias[1]))
    layer.select(None)
    with pytest.raises(RuntimeError, match="no slot"):
        layer(x)


def test_iscil_structure_and_a_mixed_slot_batch():
    m = make(IsCiL, num_tasks=3).eval()
    assert m.library.groups == ["tem"] and len(m.slot_layers) == 4 + 2 + 6  # 4 encoders, FiLM 2, head 6 linears
    assert all(torch.equal(layer.weight[0], layer.weight[2]) for layer in m.slot_layers)  # pretrained copies
    for t in range(3):
        m.on_task_start(t)
        assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in m.slot_parameters(t)}
    lora = sum(layer.rank * (32 + 32) * 2 for _, layer in m.library.all_layers())
    copies = sum(p.numel() for n, p in m.policy.named_parameters() if ".weight.0" in n or ".bias.0" in n)
    assert m.added_parameters(1) == lora + copies + 20 * m.query_dim
    with torch.no_grad():
        for p in m.slot_parameters(1):
            p.add_(0.1 * torch.randn(p.shape))
    batch = batch_of(Windows(0), n=2)
    lang = m.lang(batch["task"])
    with torch.no_grad():
        with m.using_slots(torch.tensor([0, 1])):
            mixed = m.policy(batch["obs"], lang).log_prob(batch["actions"])
        for row, s in enumerate([0, 1]):
            one = {k: v[row : row + 1] for k, v in batch["obs"].items()}
            with m.using_slots(torch.tensor([s])):
                alone = m.policy(one, lang[row : row + 1]).log_prob(batch["actions"][row : row + 1])
            assert torch.allclose(mixed[row], alone[0], atol=1e-5)
    assert m.library.layers["tem"][0].coefficients is None and m.slot_layers[0].rows is None


def test_iscil_rollout_retrieves_by_each_episodes_query_fifo():
    m = make(IsCiL, num_tasks=2).eval()
    g = torch.Generator().manual_seed(3)
    lang = m.lang_table[1].expand(2, -1)
    queries, steps = [], [step_obs(2, g) for _ in range(WINDOW + 2)]
    set_prototypes(m, {0: m.query(steps[0], lang)[0], 1: m.query(steps[-1], lang)[1]})
    m.current_task = 1
    ids = torch.tensor([5, 6])
    for step, obs in enumerate(steps):
        queries.append(m.query(obs, lang))
        m.prepare_step(obs, lang, ids, torch.tensor([step == 0, step in (0, 4)]), task_id=0)
    means = torch.stack(
        [torch.stack([q[0] for q in queries[-WINDOW:]]).mean(0), torch.stack([q[1] for q in queries[4:]]).mean(0)]
    )
    assert torch.equal(m.retrieved, m.retrieve(means))
    assert m.slot_layers[0].rows == m.retrieved.tolist()
    m.clear_slots()
    rng = np.random.default_rng(1)
    obs = {k: rng.random((2, *s), dtype=np.float32) for k, s in LOWDIM}
    actions = m.act(obs, np.array([5, 6]), np.array([False, True]), task_id=0)
    assert actions.shape == (2, ACTION) and m.slot_layers[0].rows is None


# -- IsCiL: training and checkpoints ------------------------------------------------------------
def test_iscil_trains_two_tasks_and_keeps_slot_zero_bit_identical():
    m = make(IsCiL, prototypes=4, kmeans_init=2, optimizer=adamw)
    snap = Snapshot()
    fit(m, snap)
    after = m.state_dict()
    slot0 = [k for k in after if k.endswith((".A.0", ".B.0", ".weight.0", ".bias.0"))]
    slot1 = [k[:-2] + ".1" for k in slot0]
    assert slot0 and all(k in after for k in slot1)
    assert all(torch.equal(after[k], snap.state[k]) for k in slot0)  # frozen, no weight decay
    assert all(torch.equal(snap.state[a], snap.state[b]) for a, b in zip(slot0, slot1, strict=True))  # the copy
    assert any(not torch.equal(after[k], snap.state[k]) for k in slot1)  # slot 1 learned
    assert all(torch.equal(after[k], snap.state[k]) for k in after if "base_layer" in k)
    assert m.prototype_ready.all() and m.slot_source.tolist() == [-1, 0]
    assert torch.equal(after["prototypes"][0], snap.state["prototypes"][0])


def test_iscil_checkpoint_round_trip_keeps_prototypes_and_outputs():
    m = make(IsCiL, prototypes=3, kmeans_init=2)
    data = [Windows(t) for t in range(2)]
    for t in range(2):
        m.on_task_start(t)
        m.prepare_task(t, data[t])
    with torch.no_grad():
        for p in m.slot_parameters(1):
            p.add_(0.1 * torch.randn(p.shape))
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(IsCiL, seed=9, prototypes=3, kmeans_init=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.current_task = 1
    for name in ("prototypes", "prototype_ready", "slot_source"):
        assert torch.equal(getattr(m, name), getattr(fresh, name))
    q = torch.cat([m.window_queries(t, data[t]) for t in range(2)])
    assert torch.equal(m.retrieve(q), fresh.retrieve(q))
    m.eval()
    fresh.eval()
    batch = batch_of(data[1])
    with torch.no_grad():
        assert torch.equal(m.bc_loss(batch), fresh.bc_loss(batch))


@pytest.mark.parametrize(
    "cls, kwargs, option",
    [
        (L2M, {"groups": ("txt",)}, "model.groups"),
        (L2M, {"pool_size": 0}, "model.pool_size"),
        (L2M, {"rank": 0}, "model.rank"),
        (IsCiL, {"copy_groups": ("tem",)}, "model.copy_groups"),
        (IsCiL, {"groups": ("tem", "head")}, "model.copy_groups"),
        (IsCiL, {"prototypes": 0}, "model.prototypes"),
    ],
)
def test_config_errors_name_the_option(cls, kwargs, option):
    with pytest.raises(ConfigError, match=option):
        make(cls, **kwargs)


class SaveState(ContinualCallback):
    def __init__(self, out: str):
        self.out = out

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def fit_iscil_under_ddp(out: str) -> None:
    """Run by the DDP test in a subprocess."""
    fit_two_ranks(
        make(IsCiL, prototypes=3, kmeans_init=2, optimizer=adamw), "ddp_find_unused_parameters_true", SaveState(out)
    )


@pytest.mark.slow
def test_iscil_ranks_stay_in_sync_under_ddp(tmp_path):
    """Slot 1 only starts training in task 1, after DDP wrapped the module: its gradients must still be
    averaged over the ranks."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    tensors = [k for k in a if torch.is_tensor(a[k])]
    assert tensors and all(torch.equal(a[k], b[k]) for k in tensors)
    assert a["slot_source"].tolist() == [-1, 0] and bool(a["prototype_ready"].all())


if __name__ == "__main__":
    fit_iscil_under_ddp(sys.argv[1])
