"""LMSRR at the paper's size: two ViT-B/16 (random weights of the `base` preset, nothing downloaded).

    python benchmarks/lmsrr_size.py [--batch 4] [--steps 2] [--device cpu|cuda] [--precision 32|bf16]

Prints the parameter counts that the spec derives from the released code (about 42.5 M trainable in
the ViTs, 3 blocks x 2 backbones; an 18-weight + 2-bias fusion; 3 fusion weights; 12 switch logits),
and the time of a task-1 training step (drift and replay terms on) at 224x224, then writes
`benchmarks/out/lmsrr_size.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    opts = parser.parse_args()

    from datamodules.base import TaskStream
    from lightning_modules import LMSRR

    torch.manual_seed(0)
    stream = TaskStream(tuple(f"t{i}" for i in range(5)), (opts.classes // 5,) * 5, (3, 32, 32))
    sources = [{"name": "hf_vit", "args": {"preset": "base", "trainable_blocks": 3}}] * 2
    model = LMSRR(stream=stream, backbone_args={"sources": sources}, buffer_size=500, minibatch_size=opts.batch)
    model.log = lambda *a, **k: None
    model.to(opts.device)
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    counts = {
        "trainable ViT blocks, per backbone": trainable(model.backbone.sources[0]),
        "trainable ViT blocks, all": sum(trainable(s) for s in model.backbone.sources),
        "MSIDF conv weights + biases": sum(p.numel() for p in model.backbone.fusion.branches.parameters()),
        "MSIDF fusion weights": model.backbone.fusion.weights.numel(),
        "ARO switch logits": model.switch_logits.numel(),
        "classifier": sum(p.numel() for p in model.head.parameters()),
        "trainable, total": trainable(model),
        "frozen copy of the trainable blocks": sum(p.numel() for p in model.reference.parameters()),
        "all parameters (incl. frozen)": sum(p.numel() for p in model.parameters()),
    }
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.03)
    model.on_task_start(1)
    model.buffer.add(
        x=torch.rand(opts.batch, 3, 32, 32),
        y=torch.zeros(opts.batch, dtype=torch.long),
        logits=torch.zeros(opts.batch, opts.classes),
        task=torch.zeros(opts.batch, dtype=torch.long),
    )
    model.buffer.data = {k: v.to(opts.device) for k, v in model.buffer.data.items()}
    batch = {
        "x": torch.randn(opts.batch, 3, 32, 32, device=opts.device),
        "y": torch.randint(2, 4, (opts.batch,), device=opts.device),
        "task": torch.ones(opts.batch, dtype=torch.long, device=opts.device),
    }
    dtype = torch.bfloat16 if opts.precision == "bf16" else None
    times = []
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(opts.steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast(opts.device, dtype=dtype, enabled=dtype is not None):
            loss = model.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if opts.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "counts": counts,
        "device": opts.device,
        "precision": opts.precision,
        "batch": opts.batch,
        "seconds_per_step": sum(times[1:]) / opts.steps,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if opts.device == "cuda" else None,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title="LMSRR, two ViT-B/16, 3 trainable blocks each")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in counts.items():
        table.add_row(k, f"{v:,}")
    table.add_row(
        f"step time, batch {opts.batch} + replay {opts.batch}, {opts.device} {opts.precision}",
        f"{result['seconds_per_step']:.2f} s",
    )
    Console(width=120).print(table)
    os.makedirs(ROOT / "benchmarks/out", exist_ok=True)
    (ROOT / "benchmarks/out/lmsrr_size.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
