"""The object-removal parts against hand computations: the 9-channel input, the masked-image latent, the
discriminator's head and its trainable parameters, RORem's loss, and the stock pipeline loading a saved base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.discriminator import DiscriminatorHead, RemovalScorer, mid_feature_size
from lightning_modules.nn.diffusion.inpainting import (
    condition_latents,
    dilate,
    latent_mask,
    masked_image,
    nine_channels,
    tiny_inpainting,
)


@pytest.fixture(scope="module")
def parts():
    return tiny_inpainting()


def images_and_mask(b: int = 2, r: int = 32):
    g = torch.Generator().manual_seed(0)
    source = torch.rand(b, 3, r, r, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, r, r)
    mask[:, :, 8:20, 10:22] = 1.0
    mask[:, :, 8, 10] = 0.3  # a soft edge pixel (bicubic resizing leaves them)
    return source, mask


def test_masked_image_sets_the_pixels_to_fill_to_mid_grey():
    source, mask = images_and_mask()
    out = masked_image(source, mask)
    keep = mask < 0.5
    assert torch.equal(out[keep.expand_as(out)], source[keep.expand_as(source)])
    assert (out[(~keep).expand_as(out)] == 0).all()
    assert out[0, 0, 8, 10] == source[0, 0, 8, 10]  # 0.3 < 0.5: kept, as the released code does


def test_latent_mask_is_nearest_and_keeps_soft_values_unless_binarized():
    _, mask = images_and_mask()
    mask[:, :, 8, 10] = 0.7
    small = latent_mask(mask, (16, 16))
    assert torch.equal(small, mask[:, :, ::2, ::2])  # nearest at x2 reads the top-left pixel of each cell
    assert small[0, 0, 4, 5] == pytest.approx(0.7)
    hard = latent_mask(mask, (16, 16), binarize=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and hard[0, 0, 4, 5] == 1.0


def test_nine_channels_are_noisy_mask_and_masked_image_latents_in_that_order(parts):
    source, mask = images_and_mask()
    small, cond = condition_latents(parts, source, mask, generator=torch.Generator().manual_seed(3))
    # By hand: the VAE posterior of the masked source, sampled with the same generator, times the scaling factor.
    dist = parts.vae.encode(source * (mask < 0.5).float()).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(cond, (dist.mean + dist.std * eps) * parts.vae.config.scaling_factor, atol=1e-5)
    noisy = torch.randn(2, 4, 16, 16)
    x = nine_channels(noisy, small, cond)
    assert x.shape == (2, 9, 16, 16)
    assert torch.equal(x[:, :4], noisy) and torch.equal(x[:, 4:5], small) and torch.equal(x[:, 5:], cond)
    # The discriminator's variant encodes the whole source.
    _, whole = condition_latents(parts, source, mask, masked=False, generator=torch.Generator().manual_seed(3))
    dist = parts.vae.encode(source).latent_dist
    assert torch.allclose(whole, (dist.mean + dist.std * eps) * parts.vae.config.scaling_factor, atol=1e-5)
    with pytest.raises(ValueError, match="latent sizes differ"):
        nine_channels(noisy, small[..., :8, :8], cond)


def test_dilate_is_a_square_max_filter():
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1
    assert dilate(mask, 3)[0, 0].nonzero().tolist() == [[r, c] for r in (3, 4, 5) for c in (3, 4, 5)]
    assert dilate(mask, 4)[0, 0].sum() == 16 and dilate(mask, 1) is mask


def test_the_head_is_rorems_at_512_and_scores_are_softplus():
    head = DiscriminatorHead(512, 16)  # SDXL at 512 px: 1280 channels at 16 x 16; narrower here, same layers
    convs = [m for m in head.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (4, 4), (0, 0)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    assert convs[-1].out_channels == 1
    norms = [m for m in head.layers if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == 32 for n in norms)
    features = torch.randn(5, 512, 16, 16) * 10
    scores = head(features)
    assert scores.shape == (5,) and (scores >= 0).all()
    assert torch.allclose(scores, F.softplus(head.logit(features)))
    small = DiscriminatorHead(64, 4)  # the small base: 64 channels at 4 x 4
    assert small(torch.randn(2, 64, 4, 4)).shape == (2,)
    assert [m.num_groups for m in small.layers if isinstance(m, torch.nn.GroupNorm)] == [4]  # 16 channels each
    with pytest.raises(ConfigError, match="4 x 2"):
        DiscriminatorHead(64, 6)


def test_only_the_lora_and_the_head_train_and_no_up_block_is_left(parts):
    unet = copy.deepcopy(parts.unet)
    scorer = RemovalScorer(unet, mid_feature_size(unet, 16))
    assert len(scorer.unet.up_blocks) == 0 and scorer.unet.conv_out is None
    trainable = {n for n, p in scorer.named_parameters() if p in set(scorer.trainable())}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    lora = [n for n in trainable if ".lora_" in n]
    assert all(any(f".{k}." in n for k in ("to_q", "to_k", "to_v", "to_out")) for n in lora)
    assert all("down_blocks" in n or "mid_block" in n for n in lora)
    assert not any(p.requires_grad for n, p in scorer.named_parameters() if n not in trainable)
    source, mask = images_and_mask()
    ctx, pooled = parts.encode_prompt([""])
    for p in scorer.trainable():
        p.requires_grad_(True)
    scores = scorer.score(parts, source, mask, source, ctx, pooled, generator=torch.Generator().manual_seed(0))
    scores.sum().backward()
    assert all(p.grad is not None for p in scorer.trainable())
    assert scorer.unet.conv_in.weight.grad is None  # conv_in stays frozen


def test_scores_are_reproducible_for_a_seed(parts):
    unet = copy.deepcopy(parts.unet)
    scorer = RemovalScorer(unet, mid_feature_size(unet, 16))
    source, mask = images_and_mask()
    ctx, pooled = parts.encode_prompt([""])
    with torch.no_grad():
        a, b = (
            scorer.score(parts, source, mask, source, ctx, pooled, generator=torch.Generator().manual_seed(1))
            for _ in "ab"
        )
    assert torch.equal(a, b)


def test_a_saved_tiny_base_loads_in_the_stock_pipeline_and_as_parts(parts, tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    from lightning_modules.nn.diffusion.inpainting import load_inpainting, save_inpainting

    save_inpainting(parts, str(tmp_path / "base"))
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    loaded = load_inpainting(str(tmp_path / "base"))
    saved, original = loaded.unet.state_dict(), parts.unet.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    with pytest.raises(ConfigError, match="not an SDXL-inpainting diffusers folder"):
        load_inpainting(str(tmp_path))
