"""Pre-trained vision transformers as backbones: HF `transformers` ViT (a local folder, or a random-weight
preset) and timm models (a local weight file). Everything is frozen but the last `trainable_blocks`
blocks, and the outputs of those blocks are available as "levels" (LMSRR regularises their drift).

A source splits its forward in three: `prefix` (input handling, embedding and the frozen blocks),
`run_blocks` (the trainable blocks, returning every block's output) and `pool` (final norm and class
token). A drift reference can then reuse the frozen prefix and run only its copy of the blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli.errors import ConfigError
from cli.files import load_torch_file
from lightning_modules.nn.backbones import register_backbone

#: random-weight presets of the HF ViT architecture (`tiny` for tests and CPU runs, `base` = ViT-B/16).
#: The tiny one draws weights with std 0.3: at HF's 0.02 a random ViT's class token hardly depends on
#: the image (feature std over images 0.005 vs 0.6), and nothing past the first task is learnt.
HF_VIT_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        initializer_range=0.3,
    ),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224),
}


class ViTSource(nn.Module):
    """A frozen transformer with trainable last blocks. Subclasses set `blocks` (the trainable ones),
    `out_features`, `image_size`, `model_stats` (the mean/std it was pre-trained with), and implement
    `embed` (patch embedding and frozen blocks) and `pool` (final norm, class token).

    `resize_antialias` (default True): inputs of another size are resized with antialiased bicubic, which
    is what LMSRR's released code gets from torchvision's `Resize` on tensors since torchvision 0.17 (PIL's
    kernel, a = -0.5, widened when shrinking). False gives plain bicubic (a = -0.75, no widening), this
    suite's behaviour before; on CIFAR upsampled to 224 the two differ by 0.06 on average (at most 0.43)
    in normalised units."""

    blocks: nn.ModuleList
    out_features: int
    image_size: int
    model_stats: tuple[tuple[float, ...], tuple[float, ...]]

    def __init__(
        self,
        input_shape: Sequence[int],
        input_norm: Literal["dataset", "model"] = "dataset",
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        resize_antialias: bool = True,
    ):
        super().__init__()
        if input_norm not in ("dataset", "model"):
            raise ConfigError(f"input_norm: {input_norm!r} is not one of 'dataset', 'model'")
        self.input_shape = tuple(input_shape)
        self.input_norm = input_norm
        self.input_stats = input_stats
        self.resize_antialias = bool(resize_antialias)

    def _freeze_all_but_last(self, model: nn.Module, layers: nn.ModuleList, trainable_blocks: int) -> nn.ModuleList:
        if not 0 <= trainable_blocks <= len(layers):
            raise ConfigError(f"trainable_blocks={trainable_blocks}: this model has {len(layers)} blocks")
        model.requires_grad_(False)
        trainable = nn.ModuleList(layers[len(layers) - trainable_blocks :]) if trainable_blocks else nn.ModuleList()
        trainable.requires_grad_(True)
        self.frozen_blocks = list(layers[: len(layers) - trainable_blocks])  # plain list: owned by `model`
        return trainable

    def prepare(self, x: Tensor) -> Tensor:
        """Data-normalised images -> the model's input: 3 channels, bicubic resize to the model's size
        (antialiased unless `resize_antialias` is off), and with `input_norm: model` the data normalisation
        swapped for the model's own."""
        if self.input_norm == "model" and self.input_stats is not None:
            mean, std = (_channels(s, x) for s in self.input_stats)
            x = x * std + mean
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=self.resize_antialias)
        if self.input_norm == "model":
            mean, std = (_channels(s, x) for s in self.model_stats)
            x = (x - mean) / std
        return x

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def prefix(self, x: Tensor) -> Tensor:
        """Tokens entering the first trainable block (nothing here trains)."""
        h = self.embed(self.prepare(x))
        for block in self.frozen_blocks:
            h = _hidden(block(h))
        return h

    def run_blocks(self, h: Tensor, blocks: nn.ModuleList | None = None) -> list[Tensor]:
        """Outputs of each of `blocks` (default: this source's trainable blocks), before the final norm."""
        levels = []
        for block in self.blocks if blocks is None else blocks:
            h = _hidden(block(h))
            levels.append(h)
        return levels

    def forward(self, x: Tensor) -> Tensor:
        h = self.prefix(x)
        levels = self.run_blocks(h)
        return self.pool(levels[-1] if levels else h)


def _channels(values: Sequence[float], x: Tensor) -> Tensor:
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


def _hidden(out: Tensor | tuple) -> Tensor:
    """A block's hidden states (older transformers releases return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _layer_list(model: nn.Module) -> nn.ModuleList:
    for path in ("layers", "encoder.layer", "blocks"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList | nn.Sequential):
            return obj
    raise ConfigError(f"{type(model).__name__}: no list of transformer blocks found (layers, encoder.layer, blocks)")


@register_backbone("hf_vit")
class HFViT(ViTSource):
    """`transformers.ViTModel` from a local folder (`path`, e.g. a saved google/vit-base-patch16-224),
    or with random weights of a preset architecture (`preset: tiny | base`). Feature: the class token
    after the final LayerNorm. Dropout stays as the checkpoint configures it (0 for Google's ViTs)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        path: str | None = None,
        preset: Literal["tiny", "base"] = "tiny",
        trainable_blocks: int = 3,
        input_norm: Literal["dataset", "model"] = "dataset",
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        resize_antialias: bool = True,
    ):
        super().__init__(input_shape, input_norm, input_stats, resize_antialias)
        try:
            from transformers import ViTConfig, ViTModel
        except ImportError:
            raise ConfigError("backbone hf_vit needs transformers: pip install -e '.[classification]'") from None
        if path is not None:
            folder = Path(path)
            if not (folder / "config.json").is_file():
                raise ConfigError(
                    f"hf_vit path: {folder} has no config.json; save a ViT there first, e.g. "
                    "`hf download google/vit-base-patch16-224 --local-dir FOLDER`"
                )
            self.vit = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
            stats = _processor_stats(folder)
        else:
            if preset not in HF_VIT_PRESETS:
                raise ConfigError(f"hf_vit preset: {preset!r} is not one of {', '.join(HF_VIT_PRESETS)}")
            self.vit = ViTModel(ViTConfig(**HF_VIT_PRESETS[preset]), add_pooling_layer=False)
            stats = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.model_stats = stats
        config = self.vit.config
        self.image_size = int(config.image_size)
        self.out_features = int(config.hidden_size)
        self.blocks = self._freeze_all_but_last(self.vit, _layer_list(self.vit), trainable_blocks)

    def embed(self, x: Tensor) -> Tensor:
        return self.vit.embeddings(x.to(self.vit.embeddings.patch_embeddings.projection.weight.dtype))

    def pool(self, h: Tensor) -> Tensor:
        return self.vit.layernorm(h)[:, 0]


def _processor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean/std a checkpoint folder's preprocessor_config.json declares (ViT default 0.5)."""
    file = folder / "preprocessor_config.json"
    if file.is_file():
        cfg = json.loads(file.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@register_backbone("timm")
class TimmViT(ViTSource):
    """A timm transformer (`model_name`, e.g. vit_base_patch16_224) built without downloading, with
    weights from a local `checkpoint` file (.safetensors, .pth or .bin) or random ones. Feature: the
    model's pre-logits (class token or pooled tokens, as the model defines)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        model_name: str = "vit_tiny_patch16_224",
        checkpoint: str | None = None,
        trainable_blocks: int = 3,
        model_args: dict | None = None,
        input_norm: Literal["dataset", "model"] = "dataset",
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        resize_antialias: bool = True,
    ):
        super().__init__(input_shape, input_norm, input_stats, resize_antialias)
        try:
            import timm
        except Exception as err:  # missing, or a torchvision that does not match this torch
            raise ConfigError(
                f"backbone timm: timm could not be imported ({type(err).__name__}: {err}); pip install timm "
                "with a torchvision built for the installed torch"
            ) from None
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_args or {}))
        except RuntimeError as err:
            raise ConfigError(f"timm model_name: {err}") from None
        if checkpoint is not None:
            self.model.load_state_dict(_read_weights(Path(checkpoint), self.model), strict=False)  # head dropped
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.model_stats = (tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3)))
        self.image_size = int(getattr(self.model.patch_embed, "img_size", (224, 224))[0])
        self.out_features = int(self.model.num_features)
        self.blocks = self._freeze_all_but_last(self.model, _layer_list(self.model), trainable_blocks)

    def embed(self, x: Tensor) -> Tensor:
        m = self.model
        h = m._pos_embed(m.patch_embed(x))
        return m.norm_pre(m.patch_drop(h))

    def pool(self, h: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(h), pre_logits=True)


def _read_weights(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """A state dict from a local file, with the checks a user needs (safe loading only)."""
    if not path.is_file():
        raise ConfigError(f"timm checkpoint: {path} not found; give the path of a .safetensors or .pth weight file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ConfigError(f"timm checkpoint {path}: not a safetensors file ({err})") from None
    else:
        state = load_torch_file(path, "timm checkpoint")
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}  # the backbone has no head
    unknown = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unknown or len(missing) == len(own):
        raise ConfigError(
            f"timm checkpoint: {path} does not fit this model ({len(unknown)} unknown keys, e.g. "
            f"{unknown[:2]}; {len(missing)} missing): check model_name"
        )
    return state
