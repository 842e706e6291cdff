"""The LIBERO baselines ER, EWC, PackNet and TAIL: each trains two tiny tasks through a Lightning fit on
random windows, and its mechanism is checked against hand computations (no simulator: a stand-in runner
probes the policy the rollouts would use)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import Dataset, default_collate

from callbacks import TaskSwitch
from callbacks.base import ContinualCallback
from cli.errors import ConfigError
from datamodules.base import ContinualDataModule, TensorDictDataset
from datamodules.robot.stream import EnvSpec, RobotTaskStream
from lightning_modules import TAIL, PackNet, RobotER, RobotEWC
from lightning_modules.nn.robot.policy import PolicyConfig
from lightning_modules.robot import ewc as ewc_module
from lightning_modules.robot.base import end_of_task_seed, weights_fingerprint
from lightning_modules.robot.ewc import ewc_penalty, minibatch_fisher
from lightning_modules.robot.packnet import prune_smallest
from tests.helpers import check_deepspeed_claim

SHAPES = (("ee_states", (3,)), ("gripper_states", (1,)))
WINDOW, WINDOWS, BATCH, STEPS = 3, 20, 4, 3


def make_stream(shapes=SHAPES) -> RobotTaskStream:
    names = ("reach-v3", "push-v3")
    return RobotTaskStream(
        task_names=names,
        instructions=("reach the goal", "push the puck to the goal"),
        obs_shapes=shapes,
        action_dim=4,
        window=WINDOW,
        env=EnvSpec(suite="metaworld", env_names=names),
    )


class Windows(Dataset):
    """Random windows of one task, items shaped like the robot datamodule's."""

    def __init__(self, task: int):
        g = torch.Generator().manual_seed(100 + task)
        self.obs = {k: torch.randn(WINDOWS, WINDOW, *s, generator=g) for k, s in SHAPES}
        self.actions = torch.rand(WINDOWS, WINDOW, 4, generator=g) * 1.6 - 0.8
        self.task = task

    def __len__(self) -> int:
        return WINDOWS

    def __getitem__(self, i: int) -> dict:
        obs = {k: v[i] for k, v in self.obs.items()}
        return {"obs": obs, "actions": self.actions[i], "task": torch.tensor(self.task)}


class FakeRobotData(ContinualDataModule):
    def __init__(self):
        super().__init__(batch_size=BATCH, seed=0)
        self._train = [Windows(0), Windows(1)]

    @property
    def task_names(self) -> list[str]:
        return ["reach-v3", "push-v3"]

    @property
    def stream(self) -> RobotTaskStream:
        return make_stream()

    def train_dataset(self, task_id: int) -> Dataset:
        return self._train[task_id]

    def eval_dataset(self, task_id: int) -> Dataset:
        return TensorDictDataset(episode=torch.arange(2))


class AtTaskEnds(ContinualCallback):
    """Records `fn(module)` at each task's start and end (after the module's own hook)."""

    def __init__(self, fn):
        self.fn, self.start, self.end = fn, {}, {}

    def on_task_start(self, trainer, pl_module, task_id: int) -> None:
        self.start[task_id] = self.fn(pl_module)

    def on_task_end(self, trainer, pl_module, task_id: int) -> None:
        self.end[task_id] = self.fn(pl_module)


class ProbeRunner:
    """Stands in for the rollout runner: one step of the policy, then `probe()` of the policy in use."""

    def __init__(self, probe):
        self.probe, self.seen = probe, []

    def run(self, task_id, episodes, policy, record=0):
        n = len(episodes)
        obs = {k: np.zeros((n, *s), dtype=np.float32) for k, s in SHAPES}
        actions = policy(obs, np.arange(n), np.ones(n, dtype=bool))
        assert actions.shape == (n, 4)
        self.seen.append(self.probe())
        return SimpleNamespace(success=np.ones(n, dtype=bool), trajectories=[])

    def close(self) -> None:
        pass


def build(cls, shapes=SHAPES, image_encoder: str = "cnn", **kwargs):
    torch.manual_seed(0)
    config = PolicyConfig(
        embed_size=16,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
        dropout=0.0,
        drop_path=0.0,
        film_hidden=16,
        gmm_modes=2,
        gmm_hidden=16,
        image_encoder=image_encoder,
    )
    module = cls(stream=make_stream(shapes), policy=config, language_encoder="tiny", **kwargs)
    module.log = lambda *a, **k: None
    return module


def fit(module, *callbacks) -> FakeRobotData:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[TaskSwitch(steps_per_task=STEPS), *callbacks],
    )
    data = FakeRobotData()
    trainer.fit(module, datamodule=data)
    check_deepspeed_claim(trainer, module)
    return data


def batch_of(task: int, n: int = BATCH) -> dict:
    return default_collate([Windows(task)[i] for i in range(n)])


def probe(module, policy: nn.Module | None = None) -> torch.Tensor:
    """Log-likelihood of task 0's first windows under the module's policy as it is now (or under `policy`)."""
    b, policy = batch_of(0), policy or module.policy
    was = policy.training
    policy.eval()
    with torch.no_grad():
        out = policy(b["obs"], module.lang(b["task"])).log_prob(b["actions"])
    policy.train(was)
    return out


def checkpoint_round_trip(module, cls, **kwargs):
    """A fresh module loaded from `module`'s state dict and checkpoint entry, as a resume does."""
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    fresh = build(cls, **kwargs)
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.on_load_checkpoint(ckpt)
    return fresh


# -- ER -------------------------------------------------------------------------------------------------
def test_er_keeps_the_first_fifth_and_replays_a_batch_as_large_as_the_current_one():
    m = build(RobotER)
    calls = []
    draw = m.replay_batch

    def recording(size):
        memory = draw(size)
        calls.append((m.current_task, size, memory))
        return memory

    m.replay_batch = recording
    data = fit(m)
    assert m.replay_counts.tolist() == [WINDOWS // 5, WINDOWS // 5]
    assert m.buffer_indices() == [(t, i) for t in range(2) for i in range(WINDOWS // 5)]
    assert m.added_parameters(1) == 0 and m.added_memory(0) == {"replay_windows": 4}
    # Replay only in task 1, one draw per step, as many windows as the batch, all from task 0's first 4.
    assert [(t, s) for t, s, _ in calls] == [(1, BATCH)] * STEPS
    kept = data.train_dataset(0).actions[: WINDOWS // 5]
    for _, _, memory in calls:
        assert memory["actions"].shape == (BATCH, WINDOW, 4) and memory["task"].tolist() == [0] * BATCH
        assert all(any(torch.equal(a, k) for k in kept) for a in memory["actions"])

    # The loss is the mean NLL over the concatenation; the draw follows the global RNG.
    m.replay_batch = draw
    m.eval()
    batch = batch_of(1)
    torch.manual_seed(5)
    terms = m.training_terms(batch)
    torch.manual_seed(5)
    memory = m.replay_batch(BATCH)
    obs = {k: torch.cat([batch["obs"][k], memory["obs"][k]]) for k in batch["obs"]}
    both = torch.cat([batch["task"], memory["task"]])
    expected = -m.policy(obs, m.lang(both)).log_prob(torch.cat([batch["actions"], memory["actions"]])).mean()
    assert set(terms) == {"nll", "replay_nll"}
    assert float(sum(terms.values()).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)

    fresh = checkpoint_round_trip(m, RobotER)
    assert fresh.buffer_indices() == m.buffer_indices() and fresh.current_task == 1


def test_er_buffer_sizes_and_option_errors():
    m = build(RobotER)
    assert [m.kept_windows(n) for n in range(5, 200)] == [n // 5 for n in range(5, 200)]
    assert build(RobotER, buffer_windows=1000).kept_windows(3000) == 1000
    assert build(RobotER, buffer_windows=1000).kept_windows(300) == 300
    with pytest.raises(ConfigError, match="buffer_share"):
        build(RobotER, buffer_share=0.0)


# -- EWC ------------------------------------------------------------------------------------------------
def test_minibatch_fisher_and_penalty_match_a_hand_computation():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    b = nn.Parameter(torch.tensor([0.5]))
    frozen = nn.Parameter(torch.tensor([3.0]), requires_grad=False)
    batches = [
        {"x": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "y": torch.tensor([1.0, -1.0])},
        {"x": torch.tensor([[1.0, 1.0]]), "y": torch.tensor([0.0])},
    ]

    def mean_nll(batch):  # Gaussian NLL up to constants: mean of (x.w + b + frozen*0 - y)^2 / 2
        r = batch["x"] @ w + b + 0 * frozen - batch["y"]
        return (r**2).mean() / 2

    expected_w, expected_b = torch.zeros(2), torch.zeros(1)
    for batch in batches:
        r = batch["x"] @ w.detach() + b.detach() - batch["y"]
        expected_w += ((r[:, None] * batch["x"]).mean(0)) ** 2  # (d/dw mean nll)^2
        expected_b += r.mean() ** 2
    (fw, fb, ff), count = minibatch_fisher([w, b, frozen], batches, mean_nll)
    assert count == 2
    assert torch.allclose(fw, expected_w / 2) and torch.allclose(fb, expected_b / 2)
    assert torch.equal(ff, torch.zeros(1))  # frozen parameters get no Fisher
    theta, anchor = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])], [torch.tensor([0.0, 4.0]), torch.tensor([1.0])]
    penalty = ewc_penalty([fw, fb], theta, anchor)
    assert float(penalty) == pytest.approx(float(fw[0] * 1 + fw[1] * 4 + fb[0] * 1))


def test_ewc_accumulates_the_fisher_online_and_penalises_moves_from_the_anchor(monkeypatch):
    counts = []
    real = ewc_module.minibatch_fisher

    def counting(*args):
        fisher, n = real(*args)
        counts.append(n)
        return fisher, n

    monkeypatch.setattr(ewc_module, "minibatch_fisher", counting)
    m = build(RobotEWC, e_lambda=500.0, gamma=0.9, fisher_batches=2)
    record = AtTaskEnds(lambda m: (m.fisher.clone(), m.anchor.clone(), float(m.penalty())))
    fit(m, record)
    assert counts == [2, 2]
    fisher0, anchor0, penalty0 = record.end[0]
    assert penalty0 == 0.0 and fisher0.min() >= 0 and fisher0.max() > 0  # at the anchor, nothing to pay
    # After task 1: F = 0.9 F_0 + F_1, with F_1 recomputed from the same batches and seed.
    params = list(m.policy.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(end_of_task_seed(1))
        batches = m.task_batches(1, BATCH, seed=end_of_task_seed(1), max_batches=2)
        f1, _ = real(params, batches, m.bc_loss)
    f1 = torch.cat([f.flatten() for f in f1])
    assert torch.allclose(m.fisher, 0.9 * fisher0 + f1, rtol=1e-5, atol=1e-12)
    assert torch.equal(m.anchor, parameters_to_vector(params).detach())
    assert not torch.equal(m.anchor, anchor0)
    # The training term: e_lambda * sum_i F_i (theta_i - theta*_i)^2 against the flat hand computation.
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    theta = parameters_to_vector(params).detach()
    hand = 500.0 * (m.fisher * (theta - m.anchor) ** 2).sum()
    terms = m.training_terms(batch_of(1))
    assert set(terms) == {"nll", "ewc"} and float(terms["ewc"]) == pytest.approx(float(hand), rel=1e-5)
    fresh = checkpoint_round_trip(m, RobotEWC, e_lambda=500.0)
    assert torch.equal(fresh.fisher, m.fisher) and torch.equal(fresh.anchor, m.anchor)


# -- PackNet --------------------------------------------------------------------------------------------
def masked_state(m):
    return [(w.detach().clone(), owner.clone()) for w, owner in m.masked_weights()]


def test_packnet_prunes_per_layer_freezes_earlier_tasks_and_masks_evaluation():
    m = build(PackNet, post_prune_epochs=1)
    fixed = {n: p.detach().clone() for n, p in m.policy.named_parameters() if not p.requires_grad}
    assert fixed and all(n.endswith("bias") or "norm" in n for n in fixed)
    record = AtTaskEnds(masked_state)
    fit(m, record)
    assert m.added_parameters(1) == 0
    for (w, owner), (w0, owner0), (_, owner1_start) in zip(
        m.masked_weights(), record.end[0], record.start[1], strict=True
    ):
        n = owner.numel()
        freed0 = round(0.75 * n)
        # Task 0 took every weight, then freed its 75% smallest (zeroed) in each layer.
        assert int((owner0 == 1).sum()) == n - freed0 and int((owner0 == 0).sum()) == freed0
        assert torch.equal(w0[owner0 == 0], torch.zeros(freed0))
        # Task 1 took exactly the freed weights, and its training left task 0's bit-identical.
        assert torch.equal(owner1_start == 2, owner0 == 0)
        assert torch.equal(w[owner0 == 1], w0[owner0 == 1])
        assert int((owner == 2).sum()) == freed0 - round(0.75 * freed0)
    for name, p in m.policy.named_parameters():
        if name in fixed:
            assert torch.equal(p, fixed[name])  # biases and norms never train

    # Evaluating task 0 uses task 0's weights only; the live weights come back bit-identical.
    live = masked_state(m)
    reference = copy.deepcopy(m.policy)
    with torch.no_grad():
        for name, (_, owner) in zip(m.masked_names, m.masked_weights(), strict=True):
            reference.get_parameter(name)[owner != 1] = 0
    with m.task_weights(0):
        for w, owner in m.masked_weights():
            assert int(w[owner == 2].count_nonzero()) == 0
    for (w, _), (w_live, _) in zip(m.masked_weights(), live, strict=True):
        assert torch.equal(w, w_live)
    m._runner = ProbeRunner(lambda: probe(m))
    m.eval_step({"episode": torch.tensor([0, 1])}, 0)
    m.eval_step({"episode": torch.tensor([0, 1])}, 1)
    assert torch.equal(m._runner.seen[0], probe(m, reference)) and torch.equal(m._runner.seen[1], probe(m))
    assert not torch.equal(probe(m, reference), probe(m))
    fresh = checkpoint_round_trip(m, PackNet)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fresh.masked_weights(), m.masked_weights(), strict=True))


def test_prune_smallest_frees_the_smallest_share_of_the_tasks_own_weights():
    weight = nn.Parameter(torch.tensor([[0.5, -0.1, 3.0, 0.2], [-0.05, 0.3, -2.0, 0.01]]))
    owner = torch.tensor([[1, 1, 2, 2], [1, 2, 0, 1]], dtype=torch.int16)  # task 1 (owner 2) holds 3 weights
    assert prune_smallest(weight, owner, 1, 0.75) == 2  # round(0.75 * 3)
    assert owner.tolist() == [[1, 1, 2, 0], [1, 0, 0, 1]]  # 0.2 and 0.3 freed, 3.0 kept; others untouched
    assert torch.equal(weight.detach(), torch.tensor([[0.5, -0.1, 3.0, 0.0], [-0.05, 0.0, -2.0, 0.01]]))


def test_packnet_tensors_without_owner_train_in_the_first_task_only_unless_always():
    shapes = (*SHAPES, ("corner_rgb", (3, 32, 32)))
    m = build(PackNet, shapes=shapes, image_encoder="tiny_clip")
    assert sorted(n.split(".")[-2] + "." + n.split(".")[-1] for n in m.unmasked_names) == [
        "embeddings.class_embedding",
        "position_embedding.weight",
    ]
    unmasked = {id(m.policy.get_parameter(n)) for n in m.unmasked_names}
    assert unmasked <= {id(p) for p in m.trainable_parameters()}
    m.current_task = 1
    assert not unmasked & {id(p) for p in m.trainable_parameters()}
    m.unmasked_params = "always"
    assert unmasked <= {id(p) for p in m.trainable_parameters()}
    with pytest.raises(ConfigError, match="prune_perc"):
        build(PackNet, prune_perc=1.0)


def test_packnet_faithful_weight_decay_shrinks_earlier_tasks_weights_only_by_the_decay():
    lr, wd = 1e-2, 0.1
    m = build(PackNet, post_prune_epochs=1, faithful_weight_decay=True)
    m._optimizer_factory = lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    record = AtTaskEnds(masked_state)
    fit(m, record)
    # Task 1's steps (3 in training + 5 in the post-prune loop) only decay task 0's weights: their
    # gradients are zero (masked after clipping), so Adam moves them by nothing else.
    steps = STEPS + WINDOWS // BATCH
    for (w, _), (w0, owner0) in zip(m.masked_weights(), record.end[0], strict=True):
        mine = owner0 == 1
        assert torch.allclose(w[mine], w0[mine] * (1 - lr * wd) ** steps, rtol=1e-5, atol=0)
        assert not torch.equal(w[mine], w0[mine])


# -- TAIL -----------------------------------------------------------------------------------------------
def lora_layers(m):
    from peft.tuners.lora import LoraLayer

    return {n: mod for n, mod in m.policy.named_modules() if isinstance(mod, LoraLayer)}


def test_tail_task_id_keeps_each_tasks_adapter_and_parts_and_freezes_the_base():
    m = build(TAIL)
    base = {
        n: p.detach().clone()
        for n, p in m.policy.named_parameters()
        if ".lora_" not in n and n.split(".")[0] not in ("lowdim", "film", "head")
    }
    assert all(not m.policy.get_parameter(n).requires_grad for n in base)
    layers = lora_layers(m)
    assert sorted(layers) == ["blocks.0.attn.qkv"]
    assert sorted(layers["blocks.0.attn.qkv"].lora_A) == ["task_0", "task_1"]
    assert layers["blocks.0.attn.qkv"].lora_A["task_0"].weight.shape == (16, 16)  # rank 16 on the fused qkv
    adapter0 = lambda m: [p.detach().clone() for p in m.adapter_parameters("task_0")]  # noqa: E731
    record = AtTaskEnds(lambda m: (probe(m), adapter0(m)))
    fit(m, record)
    for n, p in base.items():
        assert torch.equal(m.policy.get_parameter(n), p)
    ids = {id(p) for p in m.trainable_parameters()}
    assert ids == {id(p) for p in m.adapter_parameters("task_1") + m.part_parameters()}
    expected0, adapter_at_end0 = record.end[0]
    assert all(torch.equal(a, b) for a, b in zip(adapter0(m), adapter_at_end0, strict=True))
    # Given task id 0, the policy is exactly task 0's again; without it, it is task 1's.
    after = probe(m)
    assert not torch.equal(after, expected0)
    with m.use_task(0):
        assert torch.equal(probe(m), expected0)
        assert layers["blocks.0.attn.qkv"].active_adapters == ["task_0"]
    assert torch.equal(probe(m), after) and layers["blocks.0.attn.qkv"].active_adapters == ["task_1"]
    m._runner = ProbeRunner(lambda: probe(m))
    m.eval_step({"episode": torch.tensor([0, 1])}, 0)
    m.eval_step({"episode": torch.tensor([0, 1])}, 1)
    assert torch.equal(m._runner.seen[0], expected0) and torch.equal(m._runner.seen[1], after)
    adapter = sum(p.numel() for p in m.adapter_parameters("task_0"))
    assert adapter == 16 * 16 + 48 * 16  # A: (r, in), B: (3 x embed, r)
    assert m.added_parameters(1) == adapter + sum(p.numel() for p in m.part_parameters())
    fresh = checkpoint_round_trip(m, TAIL)
    assert fresh.current_adapter == "task_1" and torch.equal(probe(fresh), after)
    with fresh.use_task(0):
        assert torch.equal(probe(fresh), expected0)


def test_tail_released_fine_tunes_one_adapter_sequentially_from_noisy_previous_weights():
    m = build(TAIL, variant="released")
    assert sorted(lora_layers(m)["blocks.0.attn.qkv"].lora_A) == ["task_0"]
    record = AtTaskEnds(lambda m: (probe(m), parameters_to_vector(m.trainable_parameters()).detach().clone()))
    fit(m, record)
    expected0, trained0 = record.end[0]
    noise = record.start[1][1] - trained0  # task 1 starts from task 0's weights plus N(0, 1e-3)
    assert 0.7e-3 < float(noise.std()) < 1.3e-3 and abs(float(noise.mean())) < 2e-4
    with m.use_task(0):  # nothing is reloaded: task 0 is evaluated with task 1's weights
        assert not torch.equal(probe(m), expected0)
    assert m.added_parameters(0) > 0 and m.added_parameters(1) == 0


def test_tail_adapts_the_later_clip_q_v_projections_at_rank_8():
    shapes = (*SHAPES, ("corner_rgb", (3, 32, 32)))
    m = build(TAIL, shapes=shapes, image_encoder="tiny_clip")
    layers = lora_layers(m)
    image = sorted(n for n in layers if n.startswith("image."))
    assert [n.split("encoder.")[-1] for n in image] == [
        "layers.2.self_attn.q_proj",
        "layers.2.self_attn.v_proj",
        "layers.3.self_attn.q_proj",
        "layers.3.self_attn.v_proj",
    ]
    assert all(layers[n].r["task_0"] == 8 and layers[n].scaling["task_0"] == 2.0 for n in image)
    assert layers["blocks.0.attn.qkv"].r["task_1"] == 16 and layers["blocks.0.attn.qkv"].scaling["task_1"] == 1.0
    assert not any(p.requires_grad for n, p in m.policy.image.named_parameters() if ".lora_" not in n)
    with pytest.raises(ConfigError, match="variant"):
        build(TAIL, variant="oracle")


def test_a_loaded_foundation_is_named_by_a_fingerprint_of_its_weights(tmp_path):
    source = build(RobotER)
    weights = source.policy.state_dict()
    path = tmp_path / "foundation.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in weights.items()}}, path)
    assert build(RobotER).policy_fingerprint is None  # random initialisation: no foundation to name
    loaded = build(RobotER, policy_checkpoint=str(path))
    assert loaded.policy_fingerprint == weights_fingerprint(weights)
    assert len(loaded.policy_fingerprint) == 12 and int(loaded.policy_fingerprint, 16) >= 0

    # the same values in another order or another tensor object: the same name
    reordered = dict(reversed([(k, v.clone()) for k, v in weights.items()]))
    assert weights_fingerprint(reordered) == loaded.policy_fingerprint
    # one value moved by one ulp, or the same bytes in another shape: another name
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    nudged = dict(weights, **{name: weights[name].clone()})
    nudged[name].view(-1)[0] = torch.nextafter(nudged[name].view(-1)[0], torch.tensor(float("inf")))
    assert weights_fingerprint(nudged) != loaded.policy_fingerprint
    assert weights_fingerprint(dict(weights, **{name: weights[name].reshape(-1)})) != loaded.policy_fingerprint
