"""Rewards: the weight-free statistics against hand computations, the JPEG surrogate against the real encoder,
CLIP-based rewards' gradients, and bad input as one line."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from cli.errors import ConfigError
from lightning_modules.nn.rewards import REWARDS, build_reward
from lightning_modules.nn.rewards.clip_rewards import aesthetic_head
from lightning_modules.nn.rewards.compressibility import dct_matrix, jpeg_size_estimate, jpeg_size_kb


def test_brightness_contrast_and_colourfulness_match_hand_computations():
    red_left = torch.zeros(1, 3, 4, 4)
    red_left[:, 0, :, :2] = 1.0  # left half pure red, right half black
    assert build_reward("brightness")(red_left, [""]).item() == pytest.approx(0.299 / 2)
    assert build_reward("darkness")(red_left, [""]).item() == pytest.approx(1 - 0.299 / 2)
    assert build_reward("contrast")(red_left, [""]).item() == pytest.approx(
        torch.tensor([0.299] * 8 + [0.0] * 8).std().item()
    )
    # rg = R - G in {1, 0}, yb = (R + G) / 2 - B in {0.5, 0}: std 0.5 and 0.25, means 0.5 and 0.25
    expected = (0.25 + 0.0625) ** 0.5 + 0.3 * (0.25 + 0.0625) ** 0.5
    assert build_reward("colourfulness")(red_left, [""]).item() == pytest.approx(expected, abs=1e-4)
    grey = torch.full((2, 3, 8, 8), 0.4)
    assert build_reward("colourfulness")(grey, ["", ""]).abs().max().item() < 1e-3


def test_the_dct_is_orthonormal():
    d = dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)


def test_the_compressibility_surrogate_ranks_images_like_the_real_jpeg_size():
    from datamodules import small_world as world

    g = torch.Generator().manual_seed(0)
    digits = (world.held_out_digits()["pixel_values"][:6] + 1) / 2
    photos = (world.held_out_photos(6, 0) + 1) / 2
    noise = torch.rand(3, 3, 32, 32, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(3, 3, 32, 32, generator=g), 5, 1, 2)
    images = torch.cat([digits, photos, noise, smooth])
    real, estimate = jpeg_size_kb(images), jpeg_size_estimate(images)
    assert spearmanr(real.numpy(), estimate.numpy()).correlation > 0.8
    assert (estimate / real - 1).abs().max().item() < 0.25  # and is close in kB, not just in rank
    reward = build_reward("compressibility")
    assert torch.equal(reward.measure(images, [""] * len(images)), -real)


def test_the_compressibility_surrogate_has_a_gradient_that_smooths_the_image():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    (-build_reward("compressibility")(x, [""]).sum()).backward()
    step = (x - 0.05 * x.grad.sign()).detach().clamp(0, 1)
    assert jpeg_size_kb(step).item() < jpeg_size_kb(x.detach()).item()


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "aesthetic"])
def test_clip_rewards_differentiate_through_the_image_tower(name):
    options = {"clip_model": "tiny"} | ({"clip_arch": None} if name == "hpsv2" else {})
    reward = build_reward(name, options)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = reward(images, ["a handwritten digit two", "a photo of grass"])
    assert scores.shape == (2,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_the_aesthetic_head_loads_a_released_style_state_dict_and_refuses_a_wrong_shape(tmp_path):
    reward = build_reward("aesthetic", {"clip_model": "tiny"})
    dim = reward.head[0].in_features
    good = {f"layers.{k}": v for k, v in aesthetic_head(dim).state_dict().items()}
    torch.save(good, tmp_path / "head.pth")
    loaded = build_reward("aesthetic", {"clip_model": "tiny", "head_weights": str(tmp_path / "head.pth")})
    assert torch.equal(loaded.head[7].weight, good["layers.7.weight"])
    torch.save({f"layers.{k}": v for k, v in aesthetic_head(768).state_dict().items()}, tmp_path / "l14.pth")
    with pytest.raises(ConfigError, match=r"l14\.pth has 0\.weight of shape \(1024, 768\)") as err:
        build_reward("aesthetic", {"clip_model": "tiny", "head_weights": str(tmp_path / "l14.pth")})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        build_reward("aesthetic", {"clip_model": "tiny", "head_weights": str(tmp_path / "missing.pth")})


def test_an_unknown_reward_or_option_is_one_line_with_the_choices():
    with pytest.raises(ConfigError, match="unknown reward 'beauty'; choose one of " + ", ".join(REWARDS)):
        build_reward("beauty")
    with pytest.raises(ConfigError, match=r"reward\.options: .*'qualty'.*takes quality"):
        build_reward("compressibility", {"qualty": 90})
