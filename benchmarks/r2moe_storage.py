"""R2MoE's storage per concept at Stable Diffusion 1.5 size, measured from the files the suite writes.

    python benchmarks/r2moe_storage.py [--concepts 10 101] [--removed 0.233] [--tiny]

For each N in `--concepts`, builds R2MoE on SD 1.5's UNet (its public config, random weights; a 1-layer
CLIP text encoder of SD 1.5's width 768 stands in for the 12-layer one, whose weights are never stored)
and plays N finished concepts: every expert's B and router increment random, the layer-experts of a
random `--removed` fraction of layers deleted per concept (0.233: the paper's 15.2 M kept of 100 x
198,144), each task's router folded as its end does. Then it writes, with the suite's own code, the
checkpoint (`Trainer.save_checkpoint`, the current task's AdamW state included) and the export
(`lifelong export`'s writer, float32 and float16), and divides each file's size by N. The expert bytes
(what the paper counts) are read back from the exported file. `--tiny` adds the kept fraction of a real
30-step run of `r2moe_concepts_tiny.yaml`. Writes `benchmarks/out/r2moe_storage.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent

# The spec's figures (A.9) and the published parameter count of SD 1.5's UNet.
SPEC = {
    "unet_parameters": 859_520_964,
    "wrapped_layers": 32,
    "expert_total": 198_144,
    "custom_diffusion_kv": 19_169_280,
}
PAPER_PER_CONCEPT = 152_000  # 15.2M expert parameters after 100 concepts (spec A.9)
PAPER_MB = PAPER_PER_CONCEPT * 4 / 1e6  # 0.61 MB in fp32
PAPER_REMOVED = 1 - PAPER_PER_CONCEPT / SPEC["expert_total"]


def sd15_unet() -> torch.nn.Module:
    """SD 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_parts(path: str, seed: int = 0):
    """The tiny preset with SD 1.5's UNet and a 768-wide text encoder (what R2MoE's stored shapes depend on)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.nn.diffusion.components import tiny_stable_diffusion
    from lightning_modules.nn.diffusion.tokenizer import CLIP_TEXT_VOCAB

    parts = tiny_stable_diffusion(seed)
    torch.manual_seed(seed)
    parts.unet = sd15_unet().requires_grad_(False)
    config = CLIPTextConfig(**CLIP_TEXT_VOCAB, hidden_size=768, intermediate_size=64, num_attention_heads=12)
    parts.text_encoder = CLIPTextModel(config.__class__(**{**config.to_dict(), "num_hidden_layers": 1}))
    parts.text_encoder.requires_grad_(False)
    return parts


def stream(n: int):
    from datamodules.concepts import ConceptStream

    names = tuple(f"concept{k}" for k in range(n))
    return ConceptStream(
        task_names=names,
        tokens=tuple(f"<new{k + 1}>" for k in range(n)),
        classes=("thing",) * n,
        gate_prompts=tuple(f"photo of a <new{k + 1}> thing" for k in range(n)),
        resolution=512,
    )


def play_concepts(model, removed: float, seed: int = 0) -> list[int]:
    """N finished concepts with random weights; deletes round(removed x layers) layer-experts per concept."""
    g = torch.Generator().manual_seed(seed)
    layers = model.experts.layers
    kept = []
    with torch.no_grad():
        for t in range(model.num_tasks):
            dead = set(torch.randperm(len(layers), generator=g)[: round(removed * len(layers))].tolist())
            for i, layer in enumerate(layers):
                layer.lora_up[t].normal_(generator=g)
                layer.route[:, 1 : t + 2].normal_(generator=g)
                if i in dead:
                    layer.remove_expert(t)
                layer.fold_router()
            model.concept_tokens.rows[t].normal_(generator=g)
            model.gate_memory[t].normal_(generator=g)
            model.kept_experts[t] = len(layers) - len(dead)
            kept.append(len(layers) - len(dead))
    model.current_task = model.num_tasks - 1
    return kept


def write_checkpoint(model, path: str) -> int:
    """`last.ckpt` as fit writes it: Lightning's checkpoint of the module, with the last task's AdamW state."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    from callbacks import ExpertFreezing

    ExpertFreezing.apply(model, model.current_task)
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    optimizer.step()
    trainer.strategy.optimizers = [optimizer]
    trainer.save_checkpoint(path)
    return os.path.getsize(path)


def measure(n: int, removed: float, folder: str) -> dict:
    from safetensors import safe_open

    from cli.diffusion import write_export
    from lightning_modules.diffusion import R2MoE

    start = time.perf_counter()
    with mock.patch("lightning_modules.nn.diffusion.components.load_stable_diffusion", sd15_parts):
        torch.manual_seed(0)
        model = R2MoE(stream(n), pretrained_model_name_or_path="sd15")
    layers = model.experts.layers
    counts = {
        "unet_parameters": sum(
            p.numel() for k, p in model.parts.unet.named_parameters() if not k.endswith(".route") and ".lora_" not in k
        ),
        "wrapped_layers": len(layers),
        "expert_total": sum(layer.lora_down[0].numel() + layer.lora_up[0].numel() for layer in layers),
        "custom_diffusion_kv": sum(layer.base_layer.weight.numel() for layer in layers),
    }
    kept = play_concepts(model, removed)
    out = {
        "concepts": n,
        "removed": removed,
        "counts": counts,
        "kept_layer_experts": sum(kept),
        "layer_experts": n * len(layers),
    }
    out["checkpoint_bytes"] = write_checkpoint(model, os.path.join(folder, f"last_{n}.ckpt"))
    for dtype in ("float32", "float16"):
        path = os.path.join(folder, f"export_{n}_{dtype}.safetensors")
        write_export(model, path, dtype)
        out[f"export_{dtype}_bytes"] = os.path.getsize(path)
        with safe_open(path, "pt") as f:
            sizes = {k: f.get_slice(k) for k in f.keys()}
            nbytes = {k: s.get_shape() for k, s in sizes.items()}
        element = 4 if dtype == "float32" else 2
        experts = sum(
            torch.Size(shape).numel() * element for k, shape in nbytes.items() if ".lora_down." in k or ".lora_up." in k
        )
        out[f"export_{dtype}_expert_bytes"] = experts
        out[f"export_{dtype}_expert_parameters"] = experts // element
    out["seconds"] = time.perf_counter() - start
    del model
    gc.collect()
    return out


def tiny_run(root: str) -> dict:
    """Trains R2MoE on the tiny preset through the CLI; returns what redundancy removal kept."""
    from cli.main import QUIET, LifelongCLI

    args = [
        "fit",
        "-c",
        str(ROOT / "configs/trainer/cpu.yaml"),
        "-c",
        str(ROOT / "configs/diffusion/r2moe_concepts_tiny.yaml"),
    ]
    cli = LifelongCLI(args=[*args, *QUIET, "--trainer.default_root_dir", root])
    kept = [int(k) for k in cli.model.kept_experts.tolist()]
    return {"kept_experts": kept, "layers": len(cli.model.experts.layers), "steps": cli.trainer.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[10, 101], help="N, the concepts played")
    parser.add_argument(
        "--removed",
        type=float,
        nargs="+",
        default=[0.0, round(PAPER_REMOVED, 3)],
        help="fractions of layer-experts removed",
    )
    parser.add_argument("--tiny", action="store_true", help="also train the tiny config for its kept fraction")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        runs = [measure(n, removed, folder) for removed in opts.removed for n in opts.concepts]
        tiny = tiny_run(os.path.join(folder, "tiny")) if opts.tiny else None
    checks = {k: ("OK" if runs[0]["counts"][k] == v else "MISMATCH") for k, v in SPEC.items()}

    from rich.console import Console
    from rich.table import Table

    mb = lambda nbytes, n: f"{nbytes / n / 1e6:.3f} MB"  # noqa: E731
    table = Table(title="R2MoE storage per concept (bytes of each file / N), SD 1.5 shapes, rank 4")
    table.add_column("file")
    for run in runs:
        table.add_column(f"N = {run['concepts']}, {run['removed']:.0%} removed", justify="right")
    table.add_column("paper", justify="right")
    rows = [
        ("checkpoint last.ckpt (training state + AdamW of the last task)", "checkpoint_bytes", ""),
        ("export, float32 (whole file)", "export_float32_bytes", ""),
        ("  of which experts (A + B kept)", "export_float32_expert_bytes", f"{PAPER_MB:.2f} MB"),
        ("export, float16 (whole file)", "export_float16_bytes", ""),
        ("  of which experts (A + B kept)", "export_float16_expert_bytes", ""),
    ]
    for label, key, paper in rows:
        table.add_row(label, *[mb(run[key], run["concepts"]) for run in runs], paper)
    table.add_row(
        "kept layer-experts",
        *[f"{r['kept_layer_experts']} / {r['layer_experts']}" for r in runs],
        f"{1 - PAPER_REMOVED:.1%}",
    )
    Console(width=150).print(table)
    counts = runs[0]["counts"]
    print(
        f"SD 1.5 UNet {counts['unet_parameters']:,} parameters ({checks['unet_parameters']}), "
        f"{counts['wrapped_layers']} K/V layers ({checks['wrapped_layers']}), expert A+B {counts['expert_total']:,} "
        f"({checks['expert_total']}), Custom Diffusion K/V delta {counts['custom_diffusion_kv']:,} "
        f"({counts['custom_diffusion_kv'] * 4 / 1e6:.1f} MB, {checks['custom_diffusion_kv']})"
    )
    if tiny:
        print(f"tiny run: {tiny['steps']} steps, kept layer-experts {tiny['kept_experts']} of {tiny['layers']}")
    result = {"spec": SPEC, "checks": checks, "removed": opts.removed, "runs": runs, "tiny_run": tiny}
    result["paper_per_concept_bytes"] = PAPER_PER_CONCEPT * 4
    os.makedirs(ROOT / "benchmarks/out", exist_ok=True)
    (ROOT / "benchmarks/out/r2moe_storage.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
