"""DINO image alignment for text-to-image evaluation (the CustomConcept101 / R2MoE protocol, spec A.12).

DINO-I is CLIP-I's formula on DINO features: per generated image, the mean cosine between its CLS feature
and every real image's, so its mean over the generated images is the mean pairwise cosine between the two
sets. The released evaluation uses DINO ViT-S/16 with DINO's eval transform: bicubic resize of the
shorter side to 256, centre crop 224, ImageNet mean / std; the feature is the CLS token of the last layer
after the final layer norm. `DinoScorer` is the random `tiny` preset (a small transformers ViT, for tests)
or a local Hugging Face DINO ViT folder (e.g. a saved facebook/dino-vits16). In the suite the real images
reach it as the evaluation's references, already centre-cropped to `data.clip_resolution` (224): the same
view as the released transform, resampled once more (224 -> 256 -> crop 224).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from cli.errors import ConfigError
from lightning_modules.nn.diffusion.clip_score import FrozenScorer, clip_i_score, eval_view

TINY = "tiny"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DINO's eval transform resizes the shorter side to 256 before a 224 crop: 256/224 of the crop
RESIZE_RATIO = 256 / 224
_SOURCES = (
    "pass 'tiny', a local Hugging Face DINO ViT folder (config.json + weights, e.g. a saved "
    "facebook/dino-vits16), or null to skip DINO"
)


def dino_i_score(generated_embeds: Tensor, reference_embeds: Tensor) -> Tensor:
    """Per generated image, the mean cosine of its DINO feature to every reference image's, shape (G,)."""
    return clip_i_score(generated_embeds, reference_embeds)


def tiny_dino_config():
    """A small random ViT (DINO's architecture, ViT-S/16 scaled down) for 32-pixel images."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )


class DinoScorer(FrozenScorer):
    """A frozen DINO ViT that embeds images (B x 3 x H x W, float in [0, 1] or uint8) as L2-normalised CLS
    features. `source`: "tiny" (random, deterministic for `seed`) or a local Hugging Face ViT folder."""

    def __init__(self, source: str = TINY, seed: int = 0):
        super().__init__()
        self.source = source
        if source == TINY:
            from transformers import ViTModel

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = ViTModel(tiny_dino_config(), add_pooling_layer=False)
        elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
            model = _load_folder(source)
        elif not os.path.exists(source):
            raise ConfigError(f"model.dino_model: {source!r} does not exist; {_SOURCES}")
        else:
            raise ConfigError(f"model.dino_model: {source!r} is not a folder with a config.json; {_SOURCES}")
        size = model.config.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.hold(model, IMAGENET_MEAN, IMAGENET_STD)

    def preprocess(self, images: Tensor) -> Tensor:
        """DINO's eval transform: the shorter side resized to round(256/224 x image_size) (256 for ViT-S/16),
        centre crop to image_size, ImageNet mean / std."""
        return eval_view(images, round(self.image_size * RESIZE_RATIO), self.image_size, self.mean, self.std)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised float32 CLS features of the last layer (after its layer norm), B x D."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        hidden = self.model(pixel_values=pixels).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1)

    def dino_i(self, images: Tensor, reference_images: Tensor) -> Tensor:
        """Per image, the mean cosine to all reference images, shape (B,)."""
        return dino_i_score(self.embed_images(images), self.embed_images(reference_images))


def _load_folder(path: str):
    from transformers import AutoConfig, AutoModel, ViTModel

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "vit":  # DINO v1 (facebook/dino-vits16): no pooler, the CLS token is the feature
            model = ViTModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.dino_model: {path!r} is not a loadable Hugging Face ViT folder ({first})") from e
    if not hasattr(model.config, "image_size"):
        raise ConfigError(f"model.dino_model: {path!r} holds a {config.model_type} model, not a DINO ViT")
    return model
