"""CLIP-T / CLIP-I: the pure scores against hand computations, and the frozen `ClipScorer` (tiny, saved folder,
and the ConfigErrors for unusable sources)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.clip_score import ClipScorer, clip_i_score, clip_t_score


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer("tiny", seed=0)


def test_clip_t_is_2_5_times_the_clamped_cosine_per_pair():
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, -2.0]])
    # row 0: same direction -> cos 1; row 1: orthogonal -> 0; row 2: cos = -3 / (sqrt2 * sqrt5) < 0 -> clamped to 0
    assert clip_t_score(image, text).tolist() == pytest.approx([2.5, 0.0, 0.0], abs=1e-6)
    a, b = torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[2.0, 1.0, 2.0]])
    # cos = (2 + 2 + 4) / (3 * 3) = 8 / 9
    assert clip_t_score(a, b).item() == pytest.approx(2.5 * 8 / 9, rel=1e-6)
    with pytest.raises(ValueError):
        clip_t_score(a, torch.ones(2, 3))


def test_clip_i_is_the_mean_cosine_to_every_reference():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-3.0, 0.0]])
    s = 1 / math.sqrt(2)
    # gen 0: cos 1, 1/sqrt2, -1 (negatives are not clamped here); gen 1: cos 0, 1/sqrt2, 0
    assert clip_i_score(gen, ref).tolist() == pytest.approx([(1 + s - 1) / 3, (0 + s + 0) / 3], abs=1e-6)


def test_mean_clip_i_is_the_mean_pairwise_cosine_computed_by_loops():
    g = torch.Generator().manual_seed(3)
    gen, ref = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g)
    total = 0.0
    for x in gen.tolist():
        for y in ref.tolist():
            dot = sum(a * b for a, b in zip(x, y, strict=True))
            total += dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))
    assert clip_i_score(gen, ref).mean().item() == pytest.approx(total / (5 * 4), abs=1e-5)


def test_tiny_scorer_is_frozen_deterministic_and_leaves_the_global_rng_alone(scorer):
    state = torch.random.get_rng_state()
    other = ClipScorer("tiny", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), (_, q) in zip(scorer.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in other.parameters())
    other.train()
    assert not other.training and not other.model.training
    different = ClipScorer("tiny", seed=1)
    assert not torch.equal(different.model.visual_projection.weight, other.model.visual_projection.weight), (
        "the seed should matter"
    )


def test_embeddings_are_unit_norm_float32_with_the_projection_size(scorer):
    images = torch.rand(3, 3, 32, 32)
    emb = scorer.embed_images(images)
    assert emb.shape == (3, 16) and emb.dtype == torch.float32 and not emb.requires_grad
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    txt = scorer.embed_texts(["photo of a barn.", "a dog", "x " * 200])  # the last one is truncated to 77 tokens
    assert txt.shape == (3, 16) and txt.dtype == torch.float32
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    uint8 = (images * 255).round().to(torch.uint8)
    assert torch.allclose(scorer.embed_images(uint8), scorer.embed_images(uint8.float() / 255), atol=1e-6)
    scores = scorer.clip_t(images, ["a", "b", "c"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 2.5)).all())


def test_identical_images_have_clip_i_one(scorer):
    image = torch.rand(1, 3, 48, 40)
    assert scorer.clip_i(image, image.repeat(4, 1, 1, 1)).item() == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_i(image.repeat(2, 1, 1, 1), image).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_preprocessing_resizes_the_shorter_side_centre_crops_and_normalises(scorer):
    wide = torch.rand(2, 3, 40, 100)
    out = scorer.preprocess(wide)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    tall = torch.rand(1, 3, 90, 16)
    assert scorer.preprocess(tall).shape == (1, 3, 32, 32)
    # an image already at the model's size is only normalised; a constant grey one gives (v - mean) / std
    grey = torch.full((1, 3, 32, 32), 0.5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(scorer.preprocess(grey), ((0.5 - mean) / std).expand(1, 3, 32, 32), atol=1e-6)
    # centre crop of a 32 x 64 image keeps columns 16..47
    ramp = torch.arange(64.0).div(63).view(1, 1, 1, 64).expand(1, 3, 32, 64)
    cropped = scorer.preprocess(ramp) * std + mean
    assert torch.allclose(cropped[0, 0, 0], ramp[0, 0, 0, 16:48], atol=1e-6)


def test_a_saved_tiny_model_loads_from_its_folder_with_identical_embeddings(scorer, tmp_path):
    scorer.model.save_pretrained(tmp_path)
    scorer.tokenizer.save_pretrained(tmp_path)
    loaded = ClipScorer(str(tmp_path))
    assert loaded.image_size == 32 and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(2, 3, 36, 50)
    texts = ["photo of a barn.", "a castle on a hill"]
    assert torch.allclose(loaded.embed_images(images), scorer.embed_images(images), atol=1e-6)
    assert torch.allclose(loaded.embed_texts(texts), scorer.embed_texts(texts), atol=1e-6)
    assert loaded.tokenizer(texts).input_ids == scorer.tokenizer(texts).input_ids


def test_bad_sources_raise_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="clip_model") as missing:
        ClipScorer(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="clip_model") as neither:
        ClipScorer(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match="clip_model") as empty_dir:
        ClipScorer(str(tmp_path))
    for err in (missing, neither, empty_dir):
        assert "\n" not in str(err.value)


def test_an_open_clip_file_without_a_working_open_clip_is_a_config_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "clip.pt"
    ckpt.write_bytes(b"not a checkpoint")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ConfigError, match="torchvision") as err:
        ClipScorer(str(ckpt), arch="ViT-B-32")
    assert "\n" not in str(err.value) and "Hugging Face CLIP folder" in str(err.value)
    with pytest.raises(ConfigError, match="arch"):
        ClipScorer(str(ckpt))


def test_the_real_open_clip_import_failure_is_a_config_error(tmp_path):
    try:
        import open_clip  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("open_clip imports here; the error path is covered by the monkeypatched test")
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match="torchvision"):
        ClipScorer(str(ckpt), arch="ViT-B-32")
