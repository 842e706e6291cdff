"""Suite overhead: the same MLP, data and number of optimizer steps, trained in a plain PyTorch loop
and through `lifelong fit` with every default callback (task switch, continual metrics with its
evaluations, checkpoints, TensorBoard, rich progress bar), measured alternately in one process.

    python benchmarks/overhead.py [--repeats 3]

Prints a table, writes benchmarks/out/overhead.json; the last line is `ratio: X.XX` (suite wall
time / plain wall time for the main setting; goal <= 1.10). Startup (imports, config parsing,
building the trainer) is a one-off cost reported apart from the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    # name: (hidden widths, per-step batch, epochs per task, steps per task or None)
    # The demo's setting: ~29 tiny steps (~0.3 ms each) per epoch, so fixed per-step costs dominate.
    "demo MLP (100,100), batch 10, 3 epochs/task": ([100, 100], 10, 3, None),
    # Steps of a realistic size (tens of ms) and 100 steps per task.
    "wide MLP (2048,2048), batch 256, 100 steps/task": ([2048, 2048], 256, 1, 100),
}
MAIN = "wide MLP (2048,2048), batch 256, 100 steps/task"


def suite_cli(hidden: list[int], batch: int, epochs: int, steps: int | None, root: str):
    from cli.main import LifelongCLI

    args = [
        "-c",
        str(ROOT / "configs/trainer/cpu.yaml"),
        "-c",
        str(ROOT / "configs/classification/finetune_splitdigits.yaml"),
        f"--model.init_args.backbone_args={json.dumps({'hidden': hidden})}",
        f"--data.init_args.batch_size={batch}",
        f"--task_switch.epochs_per_task={epochs}",
        *([f"--task_switch.steps_per_task={steps}"] if steps else []),
        "--continual_metrics.print_tables=false",
        f"--trainer.default_root_dir={root}",
    ]
    return LifelongCLI(args=args, run=False)


def run_suite(hidden: list[int], batch: int, epochs: int, steps: int | None) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cli = suite_cli(hidden, batch, epochs, steps, root)
        built = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        done = time.perf_counter()
    return done - built, built - start, cli.trainer.global_step


def run_plain(hidden: list[int], batch: int, epochs: int, steps: int | None) -> tuple[float, int]:
    """The same model, loaders and optimizer in a hand-written loop: no evaluation, logging or checkpoints."""
    from datamodules import SplitDigits
    from lightning_modules.nn.backbones import MLP

    torch.manual_seed(0)
    dm = SplitDigits(num_tasks=5, batch_size=batch, seed=0)
    dm.setup()
    dm.train_batches_per_epoch = steps
    backbone = MLP(dm.input_shape, hidden)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, dm.num_classes))
    steps = 0
    start = time.perf_counter()
    for t in range(dm.num_tasks):
        dm.set_task(t)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(epochs):
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(t * epochs + epoch)
            for b in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(b["x"]), b["y"]).backward()
                optimizer.step()
                steps += 1
    return time.perf_counter() - start, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/overhead.json"))
    opts = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    results = {}
    for name, (hidden, batch, epochs, steps_per_task) in SETTINGS.items():
        plain, suite, startup = [], [], []
        for _ in range(opts.repeats):  # alternate, so drifts in machine load hit both arms alike
            p, plain_steps = run_plain(hidden, batch, epochs, steps_per_task)
            s, boot, suite_steps = run_suite(hidden, batch, epochs, steps_per_task)
            plain.append(p)
            suite.append(s)
            startup.append(boot)
        if plain_steps != suite_steps:
            raise SystemExit(f"step counts differ: plain {plain_steps}, suite {suite_steps}")
        p, s = statistics.median(plain), statistics.median(suite)
        results[name] = {
            "steps": plain_steps,
            "plain_s": p,
            "suite_s": s,
            "ratio": s / p,
            "overhead_ms_per_step": 1000 * (s - p) / plain_steps,
            "startup_s": statistics.median(startup),
            "plain_runs": plain,
            "suite_runs": suite,
        }

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lifelong fit vs plain PyTorch, Split-Digits 5 tasks, median of {opts.repeats}")
    for col in ("setting", "steps", "plain (s)", "suite (s)", "ratio", "overhead/step (ms)", "startup (s)"):
        table.add_column(col, justify="right" if col != "setting" else "left")
    for name, r in results.items():
        table.add_row(
            name,
            str(r["steps"]),
            f"{r['plain_s']:.2f}",
            f"{r['suite_s']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['overhead_ms_per_step']:.2f}",
            f"{r['startup_s']:.1f}",
        )
    Console(width=150).print(table)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump({"torch_threads": torch.get_num_threads(), "main": MAIN, "results": results}, f, indent=2)
    print(f"ratio: {results[MAIN]['ratio']:.2f}")


if __name__ == "__main__":
    main()
