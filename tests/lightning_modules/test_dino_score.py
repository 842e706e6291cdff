"""DINO-I: its formula against a hand computation on real CLS features, DINO's eval transform, the tiny
preset's determinism, a saved folder loading offline, and the one-line errors for unusable sources."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.dino_score import IMAGENET_MEAN, IMAGENET_STD, DinoScorer, dino_i_score


@pytest.fixture(scope="module")
def scorer() -> DinoScorer:
    return DinoScorer("tiny", seed=0)


def images(seed: int, n: int, size: tuple[int, int] = (48, 40)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_dino_i_is_the_mean_cosine_of_cls_features_by_hand(scorer):
    """The model's CLS token (last layer, after its layer norm), compared by loops over every pair."""
    gen, ref = images(1, 3), images(2, 4, (40, 40))
    with torch.no_grad():
        cls_gen = scorer.model(pixel_values=scorer.preprocess(gen)).last_hidden_state[:, 0]
        cls_ref = scorer.model(pixel_values=scorer.preprocess(ref)).last_hidden_state[:, 0]
    expected = []
    for x in cls_gen.tolist():
        cosines = []
        for y in cls_ref.tolist():
            dot = sum(a * b for a, b in zip(x, y, strict=True))
            cosines.append(dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y))))
        expected.append(sum(cosines) / len(cosines))
    scores = scorer.dino_i(gen, ref)
    assert scores.shape == (3,) and scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert scorer.dino_i(ref, ref).mean().item() < 1.0  # distinct references are not all aligned ...
    assert scorer.dino_i(ref[:1], ref[:1]).item() == pytest.approx(1.0, abs=1e-6)  # ... an image with itself is
    s = 1 / math.sqrt(2)
    assert dino_i_score(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0], [-2.0, 0.0]])).tolist() == pytest.approx(
        [(s - 1) / 2], abs=1e-6
    )


def test_preprocessing_is_dinos_eval_transform():
    """Shorter side to 256/224 of the crop (256 for ViT-S/16's 224), centre crop, ImageNet mean / std."""
    vit_s = DinoScorer("tiny")
    vit_s.image_size = 224  # the transform alone, at ViT-S/16's size
    x = images(3, 2, (300, 600))
    out = vit_s.preprocess(x)
    assert out.shape == (2, 3, 224, 224)
    resized = F.interpolate(x, size=(256, 512), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (resized[..., 16:240, 144:368] - mean) / std)
    grey = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)  # uint8 in, one value out per channel
    tiny = DinoScorer("tiny").preprocess(grey)
    assert tiny.shape == (1, 3, 32, 32)  # tiny: shorter side to round(32 * 256 / 224) = 37, crop 32
    torch.testing.assert_close(tiny, ((128 / 255 - mean) / std).expand(1, 3, 32, 32))


def test_tiny_preset_is_deterministic_frozen_and_leaves_the_global_rng_alone(scorer):
    state = torch.random.get_rng_state()
    other = DinoScorer("tiny", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), (_, q) in zip(scorer.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    x = images(4, 2)
    assert torch.equal(scorer.embed_images(x), other.embed_images(x))
    assert not torch.equal(DinoScorer("tiny", seed=1).embed_images(x), scorer.embed_images(x))
    assert not any(p.requires_grad for p in other.parameters())
    other.train()
    assert not other.training and not other.model.training


def test_a_saved_vit_folder_loads_offline(scorer, tmp_path):
    scorer.model.save_pretrained(tmp_path / "dino")
    loaded = DinoScorer(str(tmp_path / "dino"))
    x = images(5, 2)
    torch.testing.assert_close(loaded.embed_images(x), scorer.embed_images(x))


def test_unusable_sources_are_one_line_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.dino_model: .*nowhere' does not exist; pass 'tiny'") as missing:
        DinoScorer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model.dino_model: .*empty' is not a folder with a config.json") as empty:
        DinoScorer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^model.dino_model: .*broken' is not a loadable") as broken:
        DinoScorer(str(tmp_path / "broken"))
    for err in (missing, empty, broken):
        assert "\n" not in str(err.value)
