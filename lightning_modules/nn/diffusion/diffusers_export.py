"""Exports a stock diffusers `StableDiffusionPipeline` loads (`lifelong export --format diffusers`).

- a UNet LoRA in diffusers' format, written by `StableDiffusionPipeline.save_lora_weights` with its peft
  config as metadata (`pipe.load_lora_weights(folder, weight_name=...)`);
- full cross-attention K/V weights as a slice of the UNet's state dict (`pipe.unet.load_state_dict(...,
  strict=False)`): diffusers 0.42.1's Custom Diffusion loader, `unet.load_attn_procs`, reads such weights
  but installs them only when called with a private `_pipeline` argument (otherwise a silent no-op);
- each concept token as a textual-inversion file `{token: row}` (`pipe.load_textual_inversion(file)`);
- `export.json`: what each file is and the lines that load it.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import torch
from torch import Tensor

MANIFEST = "export.json"


def cast(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Detached contiguous CPU copies for a file, floating tensors as `dtype` (flags and counts keep theirs)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in state.items()}


def save_token(folder: str, concept: str, token: str, row: Tensor, dtype: torch.dtype) -> str:
    """`<concept>_token.safetensors` holding {token: embedding row}, diffusers' textual-inversion format."""
    from safetensors.torch import save_file

    name = f"{concept}_token.safetensors"
    save_file(cast({token: row}, dtype), os.path.join(folder, name))
    return name


def save_unet_lora(folder: str, weight_name: str, state: dict[str, Tensor], config: dict[str, Any]) -> str:
    """A UNet LoRA (peft state-dict keys, `<module>.lora_A.weight` / `.lora_B.weight`) with its `LoraConfig`
    kwargs as metadata, in the file diffusers' `load_lora_weights` reads."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, weight_name=weight_name, unet_lora_adapter_metadata=config
    )
    return weight_name


def routed_lora(layers, names: list[str], u: Tensor, task_id: int) -> tuple[dict[str, Tensor], dict[str, int]]:
    """R2MoE's routed delta under router input `u` as a plain LoRA. Per layer the experts S selected at
    inference give x sum_{j in S} g_j A_j B_j = (x [A_j]_j) [g_j B_j]_j: a LoRA of rank r |S| (null and removed
    experts add nothing and are left out; so is a layer that routes to none). Returns the peft state dict
    (lora_A: R x d_in, lora_B: d_out x R) and each layer's rank R."""
    state, ranks = {}, {}
    for name, layer in zip(names, layers, strict=True):
        selected, gates = layer.gates(u, task_id, False)
        pairs = [
            (layer.lora_down[j - 1], g * layer.lora_up[j - 1])
            for j, g in zip(selected, gates, strict=True)
            if j > 0 and bool(layer.alive[j])
        ]
        if not pairs:
            continue
        down = torch.cat([a for a, _ in pairs], dim=1)
        up = torch.cat([b for _, b in pairs], dim=0)
        state[f"{name}.lora_A.weight"] = down.T
        state[f"{name}.lora_B.weight"] = up.T
        ranks[name] = down.shape[1]
    return state, ranks


def lora_config(ranks: dict[str, int]) -> dict[str, Any]:
    """`LoraConfig` kwargs for LoRAs of per-layer ranks at scale 1 (alpha = rank in every layer)."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
    }


def loading_snippet(manifest: dict[str, Any], folder: str) -> list[str]:
    """Python lines that load the export described by `manifest` (written to `folder`) into a stock pipeline
    and sample as the suite's evaluation does (DDIM, eta 1): the first concept (CFG 6), or a reward export's
    first evaluation prompt (CFG 5). R2MoE's files are one LoRA per concept: load one concept at a time
    (`pipe.unload_lora_weights()` in between)."""
    base = manifest["base"]
    if base == "tiny":  # the random preset has no folder until written
        base = "<a folder written by lightning_modules.nn.diffusion.components.save_tiny>"
    concepts = manifest.get("concepts", [])  # none for the reward methods: a LoRA alone
    first = concepts[0] if concepts else {}
    if "lora" in manifest:  # one LoRA for every concept (or reward)
        unet = [f'pipe.load_lora_weights("{folder}", weight_name="{manifest["lora"]}")']
    elif "unet_kv" in manifest:
        path = f"{folder}/{manifest['unet_kv']}"
        unet = [
            "from safetensors.torch import load_file",
            f'pipe.unet.load_state_dict(load_file("{path}"), strict=False)',
        ]
    else:
        unet = [f'pipe.load_lora_weights("{folder}", weight_name="{first["lora"]}")'] if first.get("lora") else []
        concepts = [first]
    prompt = f"photo of a {first['token']} {first['class']}" if first else manifest["prompt"]
    guidance = 6.0 if first else 5.0  # the concept evaluations' CFG, the reward evaluations'
    return [
        "import torch",
        "from diffusers import DDIMScheduler, StableDiffusionPipeline",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base}", safety_checker=None)',
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False, steps_offset=1, "
        "clip_sample=False)",
        *unet,
        *(f'pipe.load_textual_inversion("{folder}/{c["token_file"]}")' for c in concepts),
        f'image = pipe("{prompt}", num_inference_steps=50, guidance_scale={guidance}, eta=1.0, '
        "generator=torch.Generator().manual_seed(0)).images[0]",
    ]
