"""Rewards read off a frozen CLIP: prompt alignment (CLIP score), human preference (HPSv2, PickScore) and
LAION's aesthetic predictor. Each loads local weights only (a Hugging Face CLIP folder, an open_clip
checkpoint file with its arch, or `tiny` / `tiny-pretrained`) and differentiates through the image tower."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from cli.errors import ConfigError
from lightning_modules.nn.rewards.base import Reward


class ClipSimilarity(Reward):
    """`scale` times the cosine between the image's and its prompt's CLIP embeddings."""

    unit = "cosine"

    def __init__(self, clip_model: str, clip_arch: str | None = None):
        super().__init__()
        from lightning_modules.nn.diffusion.clip_score import ClipScorer

        self.clip = ClipScorer(clip_model, clip_arch)

    def scale(self) -> float:
        return 1.0

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: {images.shape[0]} images but {len(prompts)} prompts")
        cos = (self.clip.image_features(images) * self.clip.embed_texts(list(prompts))).sum(-1)
        return self.scale() * cos


class ClipScore(ClipSimilarity):
    """100 cos(image, prompt): torchmetrics' CLIPScore without its clamp at 0 (so it has a gradient everywhere)."""

    unit = "100 cos"
    default_loss_scale = 0.05

    def scale(self) -> float:
        return 100.0


class HPSv2(ClipSimilarity):
    """Human Preference Score v2 (Wu et al., 2023): the cosine of an open_clip ViT-H/14 fine-tuned on human
    choices (`HPS_v2_compressed.pt` with clip_arch ViT-H-14), as its reference scorer computes it. The
    training loss follows AlignProp's 1 - score (the same gradient as -score)."""

    default_loss_scale = 5.0

    def __init__(self, clip_model: str, clip_arch: str | None = "ViT-H-14"):
        super().__init__(clip_model, clip_arch)


class PickScore(ClipSimilarity):
    """PickScore (Kirstain et al., 2023): the CLIP's own logit scale times the cosine, from the released
    CLIP-H folder (`yuvalkirstain/PickScore_v1` saved locally)."""

    unit = "logit"
    default_loss_scale = 0.25

    def scale(self) -> float:
        return float(self.clip.model.logit_scale.exp())


def aesthetic_head(dim: int) -> nn.Sequential:
    """LAION's improved aesthetic predictor's MLP (its layer indices, so the released state dict loads)."""
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class Aesthetic(Reward):
    """LAION aesthetic score (about 1-10): the MLP `head_weights` (`sac+logos+ava1-l14-linearMSE.pth`, made
    for CLIP ViT-L/14's 768-d embedding) on the L2-normalised CLIP image embedding. Without `head_weights`
    the head has seeded random weights: a structural stand-in for tests and the small CLIP, not an
    aesthetic judgement."""

    unit = "score"
    default_loss_scale = 0.01  # AlignProp's loss coefficient

    def __init__(self, clip_model: str, clip_arch: str | None = None, head_weights: str | None = None, seed: int = 0):
        super().__init__()
        from lightning_modules.nn.diffusion.clip_score import ClipScorer

        self.clip = ClipScorer(clip_model, clip_arch)
        with torch.no_grad():
            dim = self.clip.embed_texts(["a"]).shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = aesthetic_head(dim)
        if head_weights is not None:
            self.head.load_state_dict(_head_state(head_weights, self.head))
        self.head.requires_grad_(False)

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return self.head(self.clip.image_features(images)).squeeze(-1)


def _head_state(path: str, head: nn.Module) -> dict[str, Tensor]:
    """The head's state dict read from `path`, checked key by key and shape by shape (one line if it does
    not fit)."""
    option = "aesthetic.options.head_weights"
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: {path} does not exist; pass the aesthetic MLP's .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{option}: {path} is not a readable torch file ({type(err).__name__})") from None
    state = {k.removeprefix("layers."): v for k, v in state.items()} if isinstance(state, dict) else {}
    expected = head.state_dict()
    if set(state) != set(expected):
        raise ConfigError(f"{option}: {path} does not hold the aesthetic MLP's weights (keys layers.0.weight ...)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"{option}: {path} has {key} of shape {tuple(state[key].shape)} but this CLIP's "
                f"{head[0].in_features}-d embedding needs {tuple(value.shape)}: pass the head made for this CLIP"
            )
    return state
