"""The small pretrained bases: their data, losses and metrics against hand computations, and the cache and
builders on a few training steps (`Recipe.scaled`): complete folders that diffusers' and transformers' stock
classes load and run, deterministic for a seed, never counted while half-built. The full bases (minutes of
training) are built by `benchmarks/bases.py`, never here."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cli.errors import ConfigError
from datamodules import small_world as world
from lightning_modules.nn.bases import build, cache, quality
from lightning_modules.nn.bases.classifier import DigitClassifier, ink_map

SCALE = 0.004
QUICK = build.Recipe().scaled(SCALE)


def test_the_stream_is_seeded_and_captions_name_the_digit():
    a = next(world.CaptionedImages(seed=3).batches(32))
    b = next(world.CaptionedImages(seed=3).batches(32))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    assert a["pixel_values"].shape == (32, 3, 32, 32)
    assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    pool = world.CaptionedImages(seed=3).pool(32)  # the same first samples, stacked
    assert torch.equal(pool["pixel_values"], a["pixel_values"]) and pool["caption"] == a["caption"]
    for caption, label in zip(a["caption"], a["label"].tolist(), strict=True):
        if label >= 0:
            assert f"handwritten digit {world.DIGIT_WORDS[label]}" in caption
        else:
            assert caption in world.PHOTOS.values()  # the concepts' photos are left out by default
    for caption, label in zip(a["caption"], a["label"].tolist(), strict=True):
        words = caption.split()  # "a handwritten digit seven" or "a red handwritten digit seven on a ... background"
        if label >= 0 and len(words) > 4:
            assert words[1] in world.COLOURS and words[-2] in world.COLOURS and caption.endswith("background")


def test_colour_pairs_contrast_and_held_out_digits_are_split_digits_test_split():
    for ink, bg in world.colour_pairs():
        assert abs(world.luma(world.COLOURS[ink]) - world.luma(world.COLOURS[bg])) >= world.MIN_CONTRAST
    x_train, _ = world.digits_split("train")
    held = world.held_out_digits()
    assert len(held["label"]) == 360 and len(x_train) == 1437  # 20% of 1,797, stratified
    # no held-out digit is a train digit
    flat_train = {tuple(v.flatten().tolist()) for v in x_train[:, :, ::4, ::4]}
    x_test, _ = world.digits_split("test")
    assert sum(tuple(v.flatten().tolist()) in flat_train for v in x_test[:, :, ::4, ::4]) < 5  # duplicates in the data


def test_ink_map_is_the_same_for_any_colours():
    x, _ = world.digits_split("test")
    red_on_white = world.paint(x[0], "red", "white").unsqueeze(0)
    yellow_on_blue = world.paint(x[0], "yellow", "blue").unsqueeze(0)
    assert torch.allclose(ink_map(red_on_white), ink_map(yellow_on_blue), atol=1e-5)
    assert torch.allclose(ink_map(red_on_white), x[0:1] / x[0].max(), atol=1e-5)  # the border is background


def test_clip_loss_is_clips_loss_when_captions_are_distinct():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(10.0)
    got = build.clip_contrastive_loss(image, text, torch.arange(5), scale)
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    want = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(got, want, atol=1e-6)
    # two images of one caption: text -> image averages the log-likelihood of both
    got = build.clip_contrastive_loss(image[:3], text[:2], torch.tensor([0, 1, 1]), scale)
    logits = scale * F.normalize(image[:3], dim=-1) @ F.normalize(text[:2], dim=-1).T
    i2t = F.cross_entropy(logits, torch.tensor([0, 1, 1]))
    lp = F.log_softmax(logits.T, dim=1)
    t2i = -(lp[0, 0] + (lp[1, 1] + lp[1, 2]) / 2) / 2
    assert torch.allclose(got, (i2t + t2i) / 2, atol=1e-6)


def test_psnr_and_mean_fill_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert math.isclose(quality.psnr(a, b).item(), 20.0, rel_tol=1e-5)  # mse 0.01
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    b[..., 2:, :] = 0.0  # the outside is exact
    assert quality.psnr(a, b, 1 - mask).item() == pytest.approx(100.0)  # clamped at mse 1e-10
    img = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4) / 16
    filled = quality.mean_fill(img, mask)
    assert torch.allclose(filled[..., :2, :], torch.full((1, 3, 2, 4), img[..., 2:, :].mean().item()))
    assert torch.equal(filled[..., 2:, :], img[..., 2:, :])


def test_random_masks_are_binary_and_seeded():
    m1 = build.random_masks(40, 32, torch.Generator().manual_seed(1))
    m2 = build.random_masks(40, 32, torch.Generator().manual_seed(1))
    assert torch.equal(m1, m2) and set(m1.unique().tolist()) <= {0.0, 1.0}
    cover = m1.flatten(1).mean(1)
    assert (cover > 0).all() and (cover < 1).sum() >= 30  # about one in ten masks is the whole image


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    report = cache.build_bases(cache.MODELS, root=root, scale=SCALE, progress=False, log=None)
    return root, report


def test_quick_build_writes_complete_folders_that_stock_pipelines_run(quick_cache):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLInpaintPipeline
    from transformers import CLIPModel

    root, report = quick_cache
    for name in cache.MODELS:
        path = cache.model_dir(name, root, scale=SCALE)
        assert report[name]["path"] == str(path) and cache.is_built(path)
        assert json.loads((path / cache.MARKER).read_text())["recipe"]["unet_steps"] == QUICK.unet_steps
    assert not [p for p in cache.bases_dir(root, scale=SCALE).iterdir() if "building" in p.name]
    pipe = StableDiffusionPipeline.from_pretrained(
        cache.model_dir("text-to-image", root, scale=SCALE), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit seven", height=32, width=32, num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    # the text-to-image base's text encoder is the CLIP's text tower
    clip = CLIPModel.from_pretrained(cache.model_dir("clip", root, scale=SCALE), local_files_only=True)
    for key, value in getattr(pipe.text_encoder, "text_model", pipe.text_encoder).state_dict().items():
        assert torch.equal(value, clip.text_model.state_dict()[key]), key
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(
        cache.model_dir("inpainting", root, scale=SCALE), local_files_only=True
    )
    inpaint.set_progress_bar_config(disable=True)
    assert inpaint.unet.config.in_channels == 9 and inpaint.unet.config.addition_embed_type == "text_time"
    held = (world.held_out_digits()["pixel_values"][:2] + 1) / 2
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    out = inpaint(
        prompt=["a handwritten digit one"] * 2,
        image=held,
        mask_image=masks,
        height=32,
        width=32,
        num_inference_steps=2,
        strength=1.0,
        output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    classifier = cache.load_digit_classifier(str(cache.model_dir("digit-classifier", root, scale=SCALE)))
    assert classifier.predict(held).shape == (2,)


def test_build_is_deterministic_for_a_seed():
    a = build.train_classifier(QUICK, seed=4)
    b = build.train_classifier(QUICK, seed=4)
    c = build.train_classifier(QUICK, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    v1, v2 = build.train_vae(QUICK, seed=4), build.train_vae(QUICK, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(v1.state_dict().values(), v2.state_dict().values(), strict=True))
    assert v1.config.scaling_factor == v2.config.scaling_factor


def test_presets_read_the_cache(quick_cache, monkeypatch, tmp_path):
    from lightning_modules.nn.diffusion.clip_score import ClipScorer
    from lightning_modules.nn.diffusion.components import load_stable_diffusion

    root, _ = quick_cache
    os.symlink(cache.bases_dir(root, scale=SCALE), cache.bases_dir(tmp_path))  # the quick build as the full one
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(cache, "build_bases", lambda *a, **k: calls.append(a))
    scorer = ClipScorer(cache.PRESET)
    assert scorer.image_size == 32 and scorer.embed_texts(["a handwritten digit two"]).shape == (1, 64)
    parts = load_stable_diffusion(cache.PRESET)
    assert parts.unet.config.sample_size == 16 and parts.vae_scale_factor == 2
    assert calls == []  # everything was in the cache
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "empty"))
    with pytest.raises(AssertionError):  # an empty cache builds on first use
        monkeypatch.setattr(cache, "build_bases", lambda *a, **k: (_ for _ in ()).throw(AssertionError("builds")))
        ClipScorer(cache.PRESET)


def test_pretrain_bases_command(tmp_path, capsys):
    from cli.main import main

    args = ["pretrain-bases", "--cache", str(tmp_path), "--models", "[digit-classifier]", "--scale", str(SCALE)]
    args += ["--progress", "false"]
    main(args)
    path = cache.model_dir("digit-classifier", tmp_path, scale=SCALE)
    assert cache.is_built(path) and f"{path}: built in" in capsys.readouterr().out
    assert [p.name for p in cache.bases_dir(tmp_path, scale=SCALE).iterdir() if not p.name.startswith(".")] == [
        "digit-classifier"
    ]
    main(args)
    assert "already built" in capsys.readouterr().out


def test_a_half_built_model_never_counts(tmp_path):
    folder = cache.model_dir("digit-classifier", tmp_path, scale=SCALE)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what a builder killed before its marker leaves
    assert not cache.is_built(folder)
    report = cache.build_bases(["digit-classifier"], root=tmp_path, scale=SCALE, progress=False, log=None)
    assert report["digit-classifier"]["seconds"] is not None and cache.is_built(folder)
    assert DigitClassifier.from_pretrained(folder, local_files_only=True) is not None
    again = cache.build_bases(["digit-classifier"], root=tmp_path, scale=SCALE, progress=False, log=None)
    assert again["digit-classifier"]["seconds"] is None  # reused


def test_bad_caches_are_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable.*LIFELONG_CACHE"):
        cache.build_bases(["clip"], root=blocker / "cache", progress=False, log=None)
    folder = cache.model_dir("clip", tmp_path)
    folder.mkdir(parents=True)
    (folder / cache.MARKER).write_text("{}")
    (folder / "config.json").write_text("not json")
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path))
    from lightning_modules.nn.diffusion.clip_score import ClipScorer

    with pytest.raises(ConfigError, match=f"{folder}.*does not load.*delete that folder"):
        ClipScorer(cache.PRESET)
    with pytest.raises(ConfigError, match="not one of the pretrained bases"):
        cache.model_dir("unet", tmp_path)


def test_min_snr_weighting_by_hand():
    from diffusers import DDPMScheduler

    from lightning_modules.nn.diffusion.components import SD_SCHEDULE

    scheduler = DDPMScheduler(**SD_SCHEDULE)
    pred, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([10, 900])
    plain = build.noise_loss(pred, noise, t, scheduler, 0.0)
    assert plain.item() == pytest.approx(1.0)
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)  # high at t = 10 (weight 5 / snr < 1), low at t = 900 (weight 1)
    assert snr[0] > 5 > snr[1]
    want = (5 / snr[0] + 1) / 2
    assert build.noise_loss(pred, noise, t, scheduler, 5.0).item() == pytest.approx(want.item(), rel=1e-5)
    # the same loss in every parametrisation: min(SNR, 5) times the clean-latent MSE; a prediction off by
    # d in x0 is off by d * sqrt(SNR) in epsilon and by d * sqrt(1 + SNR) in v (|v| scales as sqrt(1 + SNR)
    # times the x0 error for a fixed noisy input)
    d = torch.tensor([0.3, 0.3]).view(2, 1, 1, 1)
    x0_error = (d**2).flatten()
    want = (snr.clamp(max=5) * x0_error).mean()
    zero = torch.zeros(2, 1, 2, 2)
    for kind, error in (
        ("sample", d),
        ("epsilon", d * snr.sqrt().view(2, 1, 1, 1)),
        ("v_prediction", d * (1 + snr).sqrt().view(2, 1, 1, 1)),
    ):
        got = build.noise_loss(zero + error, zero, t, scheduler, 5.0, kind)
        assert got.item() == pytest.approx(want.item(), rel=1e-5), kind
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        build.noise_loss(zero, zero, t, scheduler, 5.0, "flow")
