"""The shared diffusion parts: the tiny preset and local-folder loading, the CLIP BPE tokenizer, concept
tokens, the loss functions against hand computations, and the expert-freezing callback."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from cli.errors import ConfigError  # noqa: E402
from lightning_modules.nn.diffusion.components import load_stable_diffusion, save_tiny  # noqa: E402
from lightning_modules.nn.diffusion.loss import diffusion_target, masked_mse  # noqa: E402
from lightning_modules.nn.diffusion.tokenizer import clip_tokenizer  # noqa: E402
from lightning_modules.nn.diffusion.tokens import add_concept_tokens  # noqa: E402


def test_clip_tokenizer_has_openai_clips_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    ids = tok(["photo of a dog"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:6] == [49406, 1125, 539, 320, 1929, 49407] and len(ids) == 77 and ids[-1] == 49407
    assert tok.convert_ids_to_tokens(42170) == "ktn"  # Custom Diffusion's initialiser token


def test_clip_tokenizer_leaves_no_files_behind(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tok = clip_tokenizer()
    assert list(tmp_path.iterdir()) == []  # its vocabulary files are gone once it is built
    tok.save_pretrained(tmp_path / "saved")  # and it saves from memory
    assert tok.__class__.from_pretrained(tmp_path / "saved")("a dog").input_ids == [49406, 320, 1929, 49407]


def test_tiny_preset_is_deterministic_and_loads_back_from_a_diffusers_folder(tmp_path):
    a, b = load_stable_diffusion("tiny"), load_stable_diffusion("tiny")
    state = a.unet.state_dict()
    assert all(torch.equal(v, b.unet.state_dict()[k]) for k, v in state.items())
    saved = load_stable_diffusion(save_tiny(str(tmp_path / "sd")))
    z, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    with torch.no_grad():
        c = a.encode_text(["photo of a dog"])
        torch.testing.assert_close(c, saved.encode_text(["photo of a dog"]))
        torch.testing.assert_close(a.unet(z, t, c).sample, saved.unet(z, t, c).sample)
    assert saved.noise_scheduler.config.beta_schedule == "scaled_linear" and saved.vae_scale_factor == 2
    assert not any(p.requires_grad for p in saved.parameters())


def test_a_folder_that_is_not_a_diffusers_model_is_one_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_stable_diffusion(str(tmp_path))


def test_concept_tokens_read_their_own_rows_and_only_they_learn():
    parts = load_stable_diffusion("tiny")
    table = add_concept_tokens(parts.tokenizer, parts.text_encoder, ["<new1>", "<new2>"], 42170)
    base = table.base.weight
    assert torch.equal(table.rows[0], base[42170]) and torch.equal(table.rows[1], base[42170])
    ids = parts.tokenize(["photo of a <new2> dog"])
    assert 49409 in ids[0].tolist()  # <new2> is one token right after the vocabulary
    table.rows[1].requires_grad_(True)
    parts.text_encoder(ids)[0].sum().backward()
    assert table.rows[1].grad.abs().sum() > 0 and table.rows[0].grad is None and base.grad is None
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_concept_tokens(parts.tokenizer, parts.text_encoder, ["<new1>"], 42170)


def test_masked_mse_is_the_mean_over_each_samples_mask():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    # sample 0: (1 + 16) / 2; sample 1: an empty mask (a far-away paste at tiny size) contributes 0
    assert masked_mse(pred, target, mask).item() == pytest.approx((17 / 2 + 0) / 2)
    assert masked_mse(pred, target).item() == pytest.approx((1 + 4 + 9 + 16 + 4) / 8)
    # two channels under a one-channel mask: `mean` averages them, the released reduction sums them
    pred2, mask2 = torch.cat([pred, 2 * pred], dim=1), mask
    sample0 = (1 + 16) + (4 + 64)  # squared errors under the mask, both channels
    assert masked_mse(pred2, target.expand_as(pred2), mask2).item() == pytest.approx(sample0 / 4 / 2)
    assert masked_mse(pred2, target.expand_as(pred2), mask2, channel_sum=True).item() == pytest.approx(sample0 / 2 / 2)


def test_diffusion_target_follows_the_prediction_type():
    from diffusers import DDPMScheduler

    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion_target(eps, latents, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        diffusion_target(v, latents, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * latents
    )
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, t)


def test_expert_freezing_trains_only_the_current_tasks_parameters():
    from callbacks import ExpertFreezing
    from lightning_modules.diffusion import R2MoE
    from tests.lightning_modules.test_r2moe import stream

    model = R2MoE(stream(3))
    model.current_task = 1
    ExpertFreezing.apply(model, 1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.task_parameters(1)}
    groups = model.trainable_parameters()
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert [g["lr"] for g in groups] == [2e-4, 1e-4, 1e-3]  # experts, router, token (spec A.6)
    ExpertFreezing.apply(torch.nn.Linear(2, 2), 0)  # a module without per-task parameters: untouched


def test_composition_masks_are_binary_and_an_empty_one_is_refused(tmp_path):
    from PIL import Image

    from lightning_modules.nn.diffusion.composition import read_masks

    left = Image.new("L", (8, 8), 0)
    left.paste(255, (0, 0, 4, 8))
    left.save(tmp_path / "left.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    (mask,) = read_masks([str(tmp_path / "left.png")], 4)
    assert mask.shape == (1, 4, 4) and mask[0, :, :2].eq(1).all() and mask[0, :, 2:].eq(0).all()
    with pytest.raises(ConfigError, match=r"--mask .*black.png: selects no pixels"):
        read_masks([str(tmp_path / "left.png"), str(tmp_path / "black.png")], 4)
