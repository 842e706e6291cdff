"""CLIP text and image alignment for text-to-image evaluation (Custom Diffusion / R2MoE protocol).

CLIP-T is CLIPScore, 2.5 * max(cos(image, text), 0), per image and its prompt; CLIP-I is, per generated
image, the mean cosine to every real image of the concept, so its mean over generated images is the mean
pairwise cosine. `ClipScorer` embeds images and texts with a frozen CLIP: the random `tiny` one for tests,
a local Hugging Face CLIP folder, or a local open_clip checkpoint file (needs `import open_clip` to work).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError

TINY = "tiny"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIPSCORE_WEIGHT = 2.5
CONTEXT_LENGTH = 77
OPEN_CLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_SOURCES = (
    "pass 'tiny', 'tiny-pretrained', a local Hugging Face CLIP folder (config.json + weights, e.g. a saved "
    "openai/clip-vit-base-patch32) or a local open_clip checkpoint file (.pt/.bin/.safetensors) with arch"
)


def clip_t_score(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """CLIPScore of row i of `image_embeds` with row i of `text_embeds`: 2.5 * max(cos, 0), shape (N,)."""
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"clip_t_score needs two (N, D) tensors of the same shape, got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return CLIPSCORE_WEIGHT * cos.clamp(min=0)


def clip_i_score(generated_embeds: Tensor, reference_embeds: Tensor) -> Tensor:
    """Per generated image, the mean cosine to all reference images, shape (G,). Its mean is the mean pairwise
    cosine between the generated and the reference set."""
    if generated_embeds.dim() != 2 or reference_embeds.dim() != 2 or reference_embeds.shape[0] == 0:
        raise ValueError(
            f"clip_i_score needs (G, D) and non-empty (R, D) tensors, got {tuple(generated_embeds.shape)} "
            f"and {tuple(reference_embeds.shape)}"
        )
    if generated_embeds.shape[1] != reference_embeds.shape[1]:
        raise ValueError(
            f"clip_i_score: embedding sizes differ ({generated_embeds.shape[1]} vs {reference_embeds.shape[1]})"
        )
    gen = F.normalize(generated_embeds.float(), dim=-1)
    ref = F.normalize(reference_embeds.float(), dim=-1)
    return (gen @ ref.T).mean(dim=1)


def small_clip_config(width: int, intermediate: int, layers: int, projection: int, image_size: int = 32):
    """A small CLIP with OpenAI CLIP's vocabulary and 77-token context: text and vision towers of the same
    width, depth and 4 heads, the ViT on `image_size`-pixel images in 8 x 8 patches."""
    from transformers import CLIPConfig

    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB

    tower = dict(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4)
    vision = dict(image_size=image_size, patch_size=8, **tower)
    return CLIPConfig(text_config=dict(**CLIP_TEXT_VOCAB, **tower), vision_config=vision, projection_dim=projection)


def tiny_clip_config():
    """The random `tiny` CLIP: width 32, 2 layers, 16-d joint space, 32-pixel images."""
    return small_clip_config(width=32, intermediate=64, layers=2, projection=16)


def clip_features(out) -> Tensor:
    """transformers < 5 returns the projected features; 5.x returns an output whose pooler_output holds them."""
    return out if isinstance(out, Tensor) else out.pooler_output


def eval_view(images: Tensor, short: int, crop: int, mean: Tensor, std: Tensor) -> Tensor:
    """The usual evaluation transform of an image encoder, in torch on the images' device: bicubic
    (antialiased) resize of the shorter side to `short`, centre crop to `crop`, mean / std normalisation.
    `images` are B x 3 (or 1) x H x W, uint8 or float in [0, 1]; returns float32 B x 3 x crop x crop."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be B x 3 x H x W (or B x 1 x H x W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if min(h, w) != short:  # torchvision's Resize(int): the longer side int(short * long / shorter)
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
        h, w = new_h, new_w
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    x = x[..., top : top + crop, left : left + crop]
    return (x - mean.to(x.device)) / std.to(x.device)


class FrozenScorer(nn.Module):
    """A metric's image (and text) encoder `self.model`: frozen and always in eval mode (dropout off), a
    fixed measuring instrument."""

    def hold(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Keeps `model` frozen, in eval mode, with the mean / std its input images are normalised by."""
        self.model = model.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenScorer:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class ClipScorer(FrozenScorer):
    """A frozen CLIP that embeds images (B x 3 x H x W, float in [0, 1] or uint8) and texts, L2-normalised.

    `source`: "tiny" (random, deterministic for `seed`), "tiny-pretrained" (the small CLIP trained on the
    embedded data, built into the cache on first use), a local Hugging Face CLIP folder, or a local open_clip
    checkpoint file together with `arch` (e.g. "ViT-B-32").
    """

    def __init__(self, source: str = TINY, arch: str | None = None, seed: int = 0):
        super().__init__()
        self.source = source
        self.arch = arch
        from lightning_modules.nn.bases import cache

        if source == cache.PRESET:
            path = cache.ensure("clip")
            model, self.tokenizer = cache.checked(path, cache.load_clip_folder)
            self.backend = "hf"
            self.image_size = int(model.config.vision_config.image_size)
        elif source == TINY:
            from transformers import CLIPModel

            from lightning_modules.nn.diffusion.tokenizer import clip_tokenizer

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = CLIPModel(tiny_clip_config())
            self.backend = "hf"
            self.tokenizer = clip_tokenizer(CONTEXT_LENGTH)
            self.image_size = int(model.config.vision_config.image_size)
        elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
            model, self.tokenizer = _load_hf_folder(source)
            self.backend = "hf"
            self.image_size = int(model.config.vision_config.image_size)
        elif os.path.isfile(source) and source.lower().endswith(OPEN_CLIP_SUFFIXES):
            model, self.tokenizer = _load_open_clip(source, arch)
            self.backend = "open_clip"
            size = model.visual.image_size
            self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        elif not os.path.exists(source):
            raise ConfigError(f"clip_model={source!r} does not exist: {_SOURCES}")
        else:
            raise ConfigError(f"clip_model={source!r} is neither a CLIP folder nor a checkpoint file: {_SOURCES}")
        self.hold(model, CLIP_MEAN, CLIP_STD)

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIP's eval transform: the shorter side resized to `image_size`, centre crop, CLIP's mean / std."""
        return eval_view(images, self.image_size, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised float32 image embeddings, B x D."""
        return self.image_features(images)

    def image_features(self, images: Tensor) -> Tensor:
        """`embed_images` with gradients to the images (a CLIP-based reward differentiates through it)."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        if self.backend == "hf":
            feats = clip_features(self.model.get_image_features(pixel_values=pixels))
        else:
            feats = self.model.encode_image(pixels)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """L2-normalised float32 text embeddings, N x D (77 tokens, padded and truncated)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.backend == "hf":
            tokens = self.tokenizer(
                texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
            )
            feats = clip_features(
                self.model.get_text_features(
                    input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
                )
            )
        else:
            feats = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return F.normalize(feats.float(), dim=-1)

    def clip_t(self, images: Tensor, texts: list[str]) -> Tensor:
        """CLIPScore of each image with its text (same order), shape (B,)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) != images.shape[0]:
            raise ValueError(f"clip_t needs one text per image, got {images.shape[0]} images and {len(texts)} texts")
        return clip_t_score(self.embed_images(images), self.embed_texts(texts))

    def clip_i(self, images: Tensor, reference_images: Tensor) -> Tensor:
        """Per image, the mean cosine to all reference images, shape (B,)."""
        return clip_i_score(self.embed_images(images), self.embed_images(reference_images))


def _load_hf_folder(path: str):
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"clip_model={path!r} is not a loadable Hugging Face CLIP folder ({first})") from e
    has_vocab = os.path.exists(os.path.join(path, "tokenizer.json")) or (
        os.path.exists(os.path.join(path, "vocab.json")) and os.path.exists(os.path.join(path, "merges.txt"))
    )
    if has_vocab:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    elif model.config.text_config.vocab_size == 49408:
        # No tokenizer files saved with the weights: OpenAI CLIP's vocabulary is the one shipped with open_clip.
        from lightning_modules.nn.diffusion.tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer(CONTEXT_LENGTH)
    else:
        raise ConfigError(f"clip_model={path!r} has no tokenizer (vocab.json + merges.txt): save the tokenizer there")
    return model, tokenizer


def _load_open_clip(path: str, arch: str | None):
    if not arch:
        raise ConfigError(f"clip_model={path!r} is an open_clip checkpoint: also pass clip_arch, e.g. 'ViT-B-32'")
    try:
        import open_clip
    except Exception as e:  # ImportError, or torchvision's operators failing to register against this torch
        raise ConfigError(
            f"clip_model={path!r} needs open_clip, which needs torchvision built for the installed torch "
            f"({type(e).__name__}): use a local Hugging Face CLIP folder instead, or install the extra that "
            "provides torchvision"
        ) from e
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=path)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, tokenizer
