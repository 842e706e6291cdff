"""R2MoE's parity checks (spec A.14) and its gate, router and removal arithmetic, on the tiny preset."""

from __future__ import annotations

import pytest
import torch

from datamodules.concepts import ConceptStream
from lightning_modules.diffusion import R2MoE
from lightning_modules.nn.diffusion.experts import ExpertBank

pytest.importorskip("diffusers")


def stream(n: int = 3) -> ConceptStream:
    names = ("cat", "cup", "rocket", "dog")[:n]
    return ConceptStream(
        task_names=names,
        tokens=tuple(f"<new{k + 1}>" for k in range(n)),
        classes=names,
        gate_prompts=tuple(f"photo of a <new{k + 1}> {c}" for k, c in enumerate(names)),
        resolution=64,
    )


@pytest.fixture(scope="module")
def model() -> R2MoE:
    torch.manual_seed(0)
    return R2MoE(stream(3), eval_inference_steps=2, eval_samples_per_prompt=1)


def unet_inputs(model: R2MoE, prompts=("photo of a <new1> cat", "a cup")):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(len(prompts), 4, 32, 32, generator=g)
    t = torch.tensor([10, 700][: len(prompts)])
    with torch.no_grad():
        c = model.encode_prompts(list(prompts))
    return z, t, c


def base_output(model: R2MoE, z, t, c):
    with torch.no_grad(), model.experts.routing("off", 0):
        return model.parts.unet(z, t, c).sample


def randomize_expert(model: R2MoE, task_id: int, seed: int = 0, finish: bool = True) -> None:
    """Random B and router increment for task `task_id` (tasks before it finished); `finish` folds the
    increment into the frozen routers, as the end of the task does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.experts.layers:
            up = layer.lora_up[task_id]
            up.copy_(torch.randn(up.shape, generator=g))
            layer.route[:, 1 : task_id + 2] = torch.randn(layer.route.shape[0], task_id + 1, generator=g)
            if finish:
                layer.fold_router()


def test_wraps_every_cross_attention_key_and_value(model):
    names = model.experts.names
    assert len(names) == 12  # tiny UNet: 6 cross-attention blocks, K and V each
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    layer = model.experts.layers[0]
    assert len(layer.lora_down) == 3 and layer.route.shape == layer.route_frozen.shape == (32, 4)
    assert torch.all(layer.lora_up[0] == 0) and torch.all(layer.route == 0) and torch.all(layer.route_frozen == 0)
    # released init: Kaiming-uniform (a = sqrt 5) of the stacked 3 x 32 x 4 tensor, fan-in 32 * 4
    bound = 1 / (32 * 4) ** 0.5
    a = torch.cat([layer.lora_down[t] for t in range(3)]).detach()
    assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)


def test_per_expert_init_is_twice_the_released_scale_at_rank_4():
    torch.manual_seed(0)
    m = R2MoE(stream(3), expert_init="per_expert")
    a = torch.cat([layer.lora_down[t] for layer in m.experts.layers for t in range(3)]).detach()
    bound = 1 / 32**0.5  # one d_in -> r matrix as nn.Linear / peft: fan-in 32
    assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)


def test_new_expert_adds_nothing_before_training():
    torch.manual_seed(0)
    fresh = R2MoE(stream(2))
    z, t, c = unet_inputs(fresh)
    with torch.no_grad(), fresh.experts.routing("train", 0):
        trained_routing = fresh.parts.unet(z, t, c).sample
    assert torch.equal(trained_routing, base_output(fresh, z, t, c))


def test_initial_gates_share_mass_with_the_null_expert():
    torch.manual_seed(0)
    bank_model = R2MoE(stream(4))
    u = torch.randn(32)
    for t, expected in [(0, 1 / 2), (1, 1 / 3), (2, 1 / 4), (3, 1 / 4)]:
        gates = bank_model.experts.new_expert_gates(u, t)
        torch.testing.assert_close(gates, torch.full_like(gates, expected))
    layer = bank_model.experts.layers[0]
    selected, g = layer.gates(u, 3, training=True)
    assert selected[0] == 0 and selected[-1] == 4 and len(selected) == 4  # null, two old, new


def test_router_learns_only_its_own_columns():
    torch.manual_seed(0)
    m = R2MoE(stream(3))
    layer = m.experts.layers[0]
    for p in m.experts.task_parameters(1):
        p.requires_grad_(True)
    with torch.no_grad():
        layer.lora_up[0].normal_()
        layer.lora_up[1].normal_()
    x = torch.randn(2, 77, 32)
    with m.experts.routing("train", 1):
        layer(x).square().sum().backward()
    grad = layer.route.grad
    assert grad[:, 1:3].abs().sum() > 0
    assert torch.all(grad[:, 0] == 0) and torch.all(grad[:, 3:] == 0)
    assert not layer.route_frozen.requires_grad and layer.lora_down[0].grad is None  # old routers, expert: frozen


def test_folded_routers_are_the_sum_of_each_tasks_router():
    """A layer keeps sum_{s<t} R_s and R_t, not every R_s: training and inference see the same G."""
    torch.manual_seed(0)
    m = R2MoE(stream(3))
    layer = m.experts.layers[0]
    routers = []
    for t in range(3):
        with torch.no_grad():
            layer.route.normal_()
        routers.append(layer.route.detach().clone())
        training = layer.router(t, training=True)
        torch.testing.assert_close(training, sum(routers))  # frozen earlier ones plus the increment
        layer.fold_router()
        assert torch.all(layer.route == 0)
    torch.testing.assert_close(layer.router(2, training=False), routers[0] + routers[1] + routers[2])


def test_gate_mix_matches_hand_computation():
    torch.manual_seed(0)
    m = R2MoE(stream(3))
    layer = m.experts.layers[0]
    routers = []
    with torch.no_grad():
        for k in range(3):
            layer.lora_up[k].normal_()
            layer.route.normal_()
            routers.append(layer.route.clone())
            layer.fold_router()
    u = torch.randn(32)
    logits = u @ (routers[0] + routers[1] + routers[2])
    # inference with all three learned: null + top-3 of {1, 2, 3} = everyone
    g = torch.softmax(logits, 0)
    expected = sum(g[j] * layer.lora_down[j - 1] @ layer.lora_up[j - 1] for j in (1, 2, 3))
    torch.testing.assert_close(layer.mixed_delta(u, 2, training=False), expected)


def test_removed_expert_contributes_exactly_zero():
    torch.manual_seed(0)
    m = R2MoE(stream(2), removed_experts="faithful")
    randomize_expert(m, 0, seed=1)
    randomize_expert(m, 1, seed=2)
    layer = m.experts.layers[0]
    u = torch.randn(32)
    layer.remove_expert(0)
    selected, g = layer.gates(u, 1, training=False)
    assert selected == [0, 1, 2]  # faithful: the dead expert still holds a slot ...
    only_alive = g[2] * (layer.lora_down[1] @ layer.lora_up[1])
    assert torch.equal(layer.mixed_delta(u, 1, training=False), only_alive)  # ... and adds exactly nothing
    layer.removed_experts = "masked"
    assert layer.gates(u, 1, training=False)[0] == [0, 2]


def test_unconditional_cfg_branch_is_bit_identical_to_the_base_model(model):
    randomize_expert(model, 0, seed=3)
    model.kept_experts[0] = 12
    z, t, c = unet_inputs(model)
    uncond = model.encode_prompts(["", ""]).detach()
    batch_z, batch_t, batch_c = torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, c])
    with torch.no_grad(), model.sample_routing(2, ["photo of a <new1> cat"]):
        routed = model.parts.unet(batch_z, batch_t, batch_c).sample
    base = base_output(model, batch_z, batch_t, batch_c)
    assert torch.equal(routed[:2], base[:2])
    assert not torch.allclose(routed[2:], base[2:])  # the conditional half does see the experts


def test_routing_distillation_is_the_sum_of_frobenius_norms():
    torch.manual_seed(0)
    m = R2MoE(stream(3))
    randomize_expert(m, 0, seed=3)
    randomize_expert(m, 1, seed=4, finish=False)
    old = torch.randn(1, 32)
    expected = sum(torch.sqrt(((old @ layer.route) ** 2).sum()) for layer in m.experts.layers)
    torch.testing.assert_close(m.experts.routing_distillation(old, 1), expected)


def test_redundancy_removal_thresholds_the_new_experts_gate():
    torch.manual_seed(0)
    m = R2MoE(stream(2))
    u = m.gate_input(["photo of a <new1> cat"])
    with torch.no_grad():
        for i, layer in enumerate(m.experts.layers):  # push half the layers' gate above 0.4, half below
            layer.lora_up[0].normal_()
            direction = u / u.square().sum()
            layer.route[:, 1] = (3.0 if i % 2 else -3.0) * direction
    keep = m.experts.remove_redundant(u, 0, 0.4)
    assert keep == [bool(i % 2) for i in range(len(keep))]
    for layer, k in zip(m.experts.layers, keep, strict=True):
        assert bool(layer.alive[1]) == k
        assert (layer.lora_up[0].abs().sum() > 0) == k and (layer.lora_down[0].abs().sum() > 0) == k


def test_expert_bank_rejects_a_unet_without_cross_attention():
    class NoAttention(torch.nn.Module):
        config = type("C", (), {"cross_attention_dim": 8})()

    with pytest.raises(ValueError, match="no cross-attention"):
        ExpertBank(NoAttention(), 2)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The routing holds through backward, where checkpointing recomputes the UNet's forward."""
    from callbacks import ExpertFreezing

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = R2MoE(stream(2), gradient_checkpointing=checkpointing)
        ExpertFreezing.apply(m, 0)
        m.train()
        g = torch.Generator().manual_seed(0)
        batch = {
            "pixels": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
            "mask": torch.ones(2, 1, 32, 32),
            "caption": ["photo of a <new1> cat", "photo of a cat"],
        }
        m.on_train_batch_start(batch, 0)
        torch.manual_seed(1)
        m.training_step(batch, 0).backward()
        m.on_train_batch_end(None, batch, 0)
        assert m.experts.context.mode == "off"
        grads.append([p.grad for p in m.task_parameters(0)])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_masking_removed_experts_in_training_is_its_own_option():
    """With expert 1 dead in a layer, task 1's new expert starts at 1/3 (released: the dead one keeps its
    slot) or at 1/2 when training masks it; inference masking follows `removed_experts` alone."""
    u = torch.randn(32)
    for training_option, initial_gate in (("faithful", 1 / 3), ("masked", 1 / 2)):
        torch.manual_seed(0)
        m = R2MoE(stream(2), removed_experts="masked", removed_experts_training=training_option)
        layer = m.experts.layers[0]
        layer.fold_router()
        layer.remove_expert(0)
        selected, g = layer.gates(u, 1, training=True)
        assert selected == ([0, 1, 2] if training_option == "faithful" else [0, 2])
        torch.testing.assert_close(g[-1], torch.tensor(initial_gate))
        assert layer.gates(u, 1, training=False)[0] == [0, 2]  # inference: masked either way


def test_export_holds_the_inference_state_and_loads_back():
    """Export: finished experts without removed ones, the summed routers, tokens; no router increment, no
    distillation memory, no unfinished expert; float16 on request; it routes and samples as the model."""
    torch.manual_seed(0)
    m = R2MoE(stream(3), eval_inference_steps=2)
    randomize_expert(m, 0, seed=1)
    randomize_expert(m, 1, seed=2)
    m.experts.layers[3].remove_expert(1)
    m.kept_experts[:2] = torch.tensor([12, 11])
    exported = m.export_state_dict()
    assert not any(k.endswith(".route") or k == "gate_memory" for k in exported)
    assert not any(k.endswith((".lora_down.2", ".lora_up.2")) for k in exported)  # task 2 not finished
    name = m.experts.names[3]
    assert f"parts.unet.{name}.lora_up.1" not in exported and f"parts.unet.{name}.lora_up.0" in exported
    half = m.export_state_dict(torch.float16)
    assert half[f"parts.unet.{name}.route_frozen"].dtype == torch.float16 and half["kept_experts"].dtype == torch.long
    assert sum(v.numel() * v.element_size() for v in half.values()) < 0.6 * sum(
        v.numel() * v.element_size() for v in exported.values()
    )

    torch.manual_seed(0)
    fresh = R2MoE(stream(3), eval_inference_steps=2)
    fresh.load_delta(exported)
    assert not bool(fresh.experts.layers[3].alive[2]) and fresh.finished_tasks() == 2
    images = m.generate(["photo of a <new2> cup"], ["photo of a <new2> cup"], seed=0)
    assert torch.equal(fresh.generate(["photo of a <new2> cup"], ["photo of a <new2> cup"], seed=0), images)
    torch.manual_seed(0)
    from_half = R2MoE(stream(3), eval_inference_steps=2)
    from_half.load_delta(half)
    close = from_half.generate(["photo of a <new2> cup"], ["photo of a <new2> cup"], seed=0)
    assert (close - images).abs().max() < 2e-2 and not torch.equal(close, images)


def test_the_unet_attends_with_pytorch_sdpa(model):
    """The expert wrappers replace K/V projections, not attention: every processor stays diffusers' SDPA one."""
    assert {type(p).__name__ for p in model.parts.unet.attn_processors.values()} == {"AttnProcessor2_0"}
