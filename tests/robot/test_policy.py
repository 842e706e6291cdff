"""The foundation policy: token layout, block-causal attention, temporal encoding, FiLM and the GMM."""

from __future__ import annotations

import math

import pytest
import torch

from cli.errors import ConfigError
from lightning_modules.nn.robot.encoders import encode_instructions
from lightning_modules.nn.robot.policy import (
    FoundationPolicy,
    PolicyConfig,
    block_causal_mask,
    temporal_encoding,
)

SHAPES = {"ee_states": (3,), "gripper_states": (1,), "corner_rgb": (3, 16, 16)}


def small_policy(**kw) -> FoundationPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(embed_size=32, num_layers=2, num_heads=4, mlp_dim=64, dropout=0.0, drop_path=0.0, **kw)
    return FoundationPolicy(cfg, SHAPES, action_dim=4, lang_dim=32, window=5).eval()


def batch(b: int = 2, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "ee_states": torch.randn(b, t, 3, generator=g),
        "gripper_states": torch.randn(b, t, 1, generator=g),
        "corner_rgb": torch.rand(b, t, 3, 16, 16, generator=g),
    }


def test_temporal_encoding_uses_base_ten():
    enc = temporal_encoding(4, 6)
    freq = [1.0, 10 ** (-2 / 6), 10 ** (-4 / 6)]
    assert enc.shape == (4, 6)
    for t in range(4):
        expected = [math.sin(t * f) for f in freq] + [math.cos(t * f) for f in freq]
        assert torch.allclose(enc[t], torch.tensor(expected), atol=1e-6)


def test_block_causal_mask_sees_own_and_earlier_steps_only():
    mask = block_causal_mask(3, 2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_tokens_per_step_and_output_shapes():
    policy = small_policy()
    obs, lang = batch(), torch.randn(2, 32)
    tokens = policy.encode(obs, lang)
    assert tokens.shape == (2, 5, 3, 32)  # two low-dim keys, then the camera
    dist = policy(obs, lang)
    assert dist.batch_shape == (2, 5) and dist.event_shape == (4,)
    assert dist.sample().abs().max() < 10


def test_later_steps_do_not_change_earlier_outputs():
    policy = small_policy()
    obs, lang = batch(), torch.randn(2, 32)
    h = policy.temporal(policy.encode(obs, lang))
    changed = {k: v.clone() for k, v in obs.items()}
    changed["ee_states"][:, 3:] += 5.0
    h2 = policy.temporal(policy.encode(changed, lang))
    assert torch.allclose(h[:, :3], h2[:, :3], atol=1e-5)
    assert not torch.allclose(h[:, 3:], h2[:, 3:], atol=1e-3)


def test_film_is_identity_when_its_output_is_zero():
    policy = small_policy()
    torch.nn.init.zeros_(policy.film.fc2.weight)
    torch.nn.init.zeros_(policy.film.fc2.bias)
    tokens = torch.randn(2, 5, 3, 32)
    assert torch.equal(policy.film(tokens, torch.randn(2, 32)), tokens)


def test_nll_is_the_mixture_negative_log_likelihood():
    policy = small_policy()
    obs, lang = batch(), torch.randn(2, 32)
    actions = torch.rand(2, 5, 4) * 2 - 1
    z = policy.head.trunk(policy.temporal(policy.encode(obs, lang)))
    mean = torch.tanh(policy.head.mean(z)).view(2, 5, 5, 4)
    std = torch.nn.functional.softplus(policy.head.scale(z)).view(2, 5, 5, 4) + 1e-4
    logw = torch.log_softmax(policy.head.logits(z), -1)
    comp = (-((actions[:, :, None] - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    expected = -torch.logsumexp(logw + comp, -1).mean()
    assert torch.allclose(policy.nll(obs, lang, actions), expected, atol=1e-5)


def test_lora_targets_name_real_linear_layers():
    policy = small_policy(image_encoder="tiny_clip")
    modules = dict(policy.named_modules())
    groups = policy.lora_targets()
    assert len(groups["tem"]) == 2 and groups["tem"][0][1] == [(0, 32), (64, 96)]
    assert len(groups["img"]) == 4  # q and v of the later two of four CLIP layers
    for targets in groups.values():
        for name, _ in targets:
            assert isinstance(modules[name], torch.nn.Linear)


def test_window_longer_than_policy_is_refused():
    policy = small_policy()
    with pytest.raises(ConfigError, match="data.window"):
        policy(batch(t=6), torch.randn(2, 32))


def test_instruction_encoders():
    tiny = encode_instructions("tiny", ["open the door", "close the door", "open the door"])
    assert tiny.shape == (3, 32) and torch.equal(tiny[0], tiny[2]) and not torch.equal(tiny[0], tiny[1])
    minilm = encode_instructions("minilm", ["open the door", "close the door", "push the puck"])
    assert minilm.shape == (3, 384)
    assert torch.allclose(minilm.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = minilm @ minilm.T
    assert sim[0, 1] > sim[0, 2]  # a real sentence encoder: the two door sentences are closest
    with pytest.raises(ConfigError, match="language_encoder"):
        encode_instructions("no-such-encoder", ["x"])
