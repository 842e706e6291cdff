"""R2MoE's storage per concept at Stable Diffusion 1.5 size (random weights, nothing downloaded).

    python benchmarks/r2moe_storage.py [--tasks 1] [--concepts 101] [--steps_per_task 30]

Builds the SD 1.5 UNet architecture from its public config, wraps its cross-attention K/V projections
with an `ExpertBank` and counts one concept's expert (A + B), router slice, token row and, for scale,
Custom Diffusion's full K/V delta, checking each count against the spec (A.9). Then trains R2MoE on
the tiny preset (`r2moe_concepts_tiny.yaml`) for the fraction of layer-experts that redundancy
removal keeps, and extrapolates the SD 1.5 per-concept figure from it. Writes
`benchmarks/out/r2moe_storage.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# The spec's figures (A.9) and the published parameter count of SD 1.5's UNet.
SPEC = {
    "unet_parameters": 859_520_964,
    "wrapped_layers": 32,
    "expert_a": 98_304,
    "expert_b": 99_840,
    "expert_total": 198_144,
    "custom_diffusion_kv": 19_169_280,
    "token_row": 768,
}
PAPER_PER_CONCEPT = 152_000  # 15.2M expert parameters after 100 concepts (spec A.9)
PAPER_FULL = SPEC["expert_total"]


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


def sd15_counts(num_tasks: int, concepts: int) -> dict[str, int]:
    from lightning_modules.nn.diffusion.experts import ExpertBank

    torch.manual_seed(0)
    unet = sd15_unet()
    unet_parameters = sum(p.numel() for p in unet.parameters())
    bank = ExpertBank(unet, num_tasks=num_tasks, rank=4)
    layers = bank.layers
    d_text = unet.config.cross_attention_dim
    counts = {
        "unet_parameters": unet_parameters,
        "wrapped_layers": len(layers),
        "expert_a": sum(layer.lora_down[0].numel() for layer in layers),
        "expert_b": sum(layer.lora_up[0].numel() for layer in layers),
        "router_slice_per_layer": layers[0].route[0].numel(),
        "router_slice_all_layers": sum(layer.route[0].numel() for layer in layers),
        # At inference only sum_s R_s is needed: d_text x (N+1) per layer for N concepts.
        "router_summed_inference": len(layers) * d_text * (concepts + 1),
        # The released code allocates a full d_text x (N+1) router per task.
        "router_allocated": concepts * len(layers) * d_text * (concepts + 1),
        "token_row": d_text,
        "custom_diffusion_kv": sum(layer.base_layer.weight.numel() for layer in layers),
    }
    counts["expert_total"] = counts["expert_a"] + counts["expert_b"]
    del bank, unet, layers
    gc.collect()
    return counts


def tiny_run(steps_per_task: int | None, root: str) -> dict:
    """Trains R2MoE on the tiny preset through the CLI; returns what redundancy removal kept."""
    import safetensors.torch

    from cli.main import QUIET, LifelongCLI

    args = [
        "fit",
        "-c",
        str(ROOT / "configs/trainer/cpu.yaml"),
        "-c",
        str(ROOT / "configs/diffusion/r2moe_concepts_tiny.yaml"),
        *QUIET,
        "--trainer.default_root_dir",
        root,
        *(["--task_switch.steps_per_task", str(steps_per_task)] if steps_per_task else []),
    ]
    start = time.perf_counter()
    cli = LifelongCLI(args=args)
    seconds = time.perf_counter() - start
    model = cli.model
    layers = model.experts.layers
    kept = [int(k) for k in model.kept_experts.tolist()]
    full = [sum(layer.lora_down[t].numel() + layer.lora_up[t].numel() for layer in layers) for t in range(len(kept))]
    return {
        "seconds": seconds,
        "steps": cli.trainer.global_step,
        "layers": len(layers),
        "kept_experts": kept,
        "kept_fraction": sum(kept) / (len(layers) * len(kept)),
        "expert_parameters": [model.expert_parameter_count(t) for t in range(len(kept))],
        "expert_parameters_full": full,
        "delta_bytes": len(safetensors.torch.save(model.delta_state_dict())),
    }


def check(value: float, expected: float, rel: float = 0.0) -> str:
    return "OK" if abs(value - expected) <= rel * abs(expected) else "MISMATCH"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1, help="tasks the SD 1.5 expert bank allocates")
    parser.add_argument("--concepts", type=int, default=101, help="N for the summed inference router")
    parser.add_argument("--steps_per_task", type=int, default=None, help="shorten the tiny run (preset: 30)")
    opts = parser.parse_args()

    start = time.perf_counter()
    counts = sd15_counts(opts.tasks, opts.concepts)
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as root:
        run = tiny_run(opts.steps_per_task, root)
    extrapolated = run["kept_fraction"] * counts["expert_total"]
    mb = lambda n, nbytes=4: n * nbytes / 1e6  # noqa: E731
    paper_removed = 1 - PAPER_PER_CONCEPT / PAPER_FULL
    checks = {k: check(counts[k], v) for k, v in SPEC.items()}

    from rich.console import Console
    from rich.table import Table

    table = Table(title="R2MoE storage per concept, SD 1.5 UNet (random weights), rank 4")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("spec A.9", justify="right")
    row = lambda what, value, key=None: table.add_row(  # noqa: E731
        what, value, "" if key is None else f"{checks[key]} ({SPEC[key]:,})"
    )
    row("UNet parameters", f"{counts['unet_parameters']:,}", "unet_parameters")
    row("wrapped attn2.to_k / to_v layers", f"{counts['wrapped_layers']}", "wrapped_layers")
    row("expert A (d_in x r), all layers", f"{counts['expert_a']:,}", "expert_a")
    row("expert B (r x d_out), all layers", f"{counts['expert_b']:,}", "expert_b")
    row("expert A + B per concept (before removal)", f"{counts['expert_total']:,}", "expert_total")
    row("  fp32 / bf16", f"{mb(counts['expert_total']):.2f} MB / {mb(counts['expert_total'], 2):.2f} MB")
    row(
        f"router slice per task (768 x (N+1), N={opts.tasks}): layer / all",
        f"{counts['router_slice_per_layer']:,} / {counts['router_slice_all_layers']:,}",
    )
    row(
        f"summed inference router, N={opts.concepts} (32 x 768 x {opts.concepts + 1})",
        f"{counts['router_summed_inference']:,} ({mb(counts['router_summed_inference']):.1f} MB fp32)",
    )
    row(
        f"routers as the released code allocates them, N={opts.concepts}",
        f"{counts['router_allocated']:,} ({mb(counts['router_allocated']):.0f} MB fp32)",
    )
    row("token row", f"{counts['token_row']} ({counts['token_row'] * 4 / 1e3:.1f} KB fp32)", "token_row")
    row(
        "Custom Diffusion full K/V delta per concept",
        f"{counts['custom_diffusion_kv']:,} ({mb(counts['custom_diffusion_kv']):.1f} MB fp32)",
        "custom_diffusion_kv",
    )
    table.add_section()
    row(
        f"tiny run: {len(run['kept_experts'])} concepts, {run['steps']} steps, kept layer-experts / {run['layers']}",
        " ".join(map(str, run["kept_experts"])),
    )
    row(
        "tiny run: expert_parameter_count(t) / before removal",
        " ".join(f"{a:,}/{b:,}" for a, b in zip(run["expert_parameters"], run["expert_parameters_full"], strict=True)),
    )
    row("tiny run: exported delta (safetensors, all concepts)", f"{run['delta_bytes']:,} B")
    row("tiny run: kept fraction", f"{run['kept_fraction']:.1%}")
    row(
        "SD 1.5 per concept after removal, EXTRAPOLATED from the tiny kept fraction",
        f"{extrapolated:,.0f} ({mb(extrapolated):.2f} MB fp32)",
    )
    row(
        "paper (spec A.9): per concept after removal",
        f"{PAPER_PER_CONCEPT:,} ({mb(PAPER_PER_CONCEPT):.2f} MB fp32, {paper_removed:.0%} removed)",
    )
    Console(width=150).print(table)
    print(f"SD 1.5 build + count: {build_seconds:.1f} s; tiny run: {run['seconds']:.1f} s")

    result = {
        "sd15": counts,
        "spec": SPEC,
        "checks": checks,
        "tasks_allocated": opts.tasks,
        "concepts": opts.concepts,
        "expert_bytes_fp32": counts["expert_total"] * 4,
        "expert_bytes_bf16": counts["expert_total"] * 2,
        "tiny_run": run,
        "sd15_per_concept_after_removal_extrapolated": extrapolated,
        "paper_per_concept_after_removal": PAPER_PER_CONCEPT,
        "build_seconds": build_seconds,
    }
    os.makedirs(ROOT / "benchmarks/out", exist_ok=True)
    (ROOT / "benchmarks/out/r2moe_storage.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
