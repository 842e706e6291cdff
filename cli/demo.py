"""`lifelong demo`: Finetune and ER on Split-Digits (embedded data), each run's tables, then a comparison.

Extra arguments go to both runs, e.g. `lifelong demo --seed_everything 1`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from callbacks.continual_metrics import summary_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUNS = {"Finetune": "finetune_splitdigits.yaml", "ER": "er_splitdigits.yaml"}


def main(argv: list[str]) -> None:
    from rich.console import Console

    from cli.errors import ConfigError, fail
    from cli.main import LifelongCLI, one_line_errors

    console = Console()
    rows, log_dirs = {}, []
    for method, config in RUNS.items():
        console.rule(f"[bold]{method} on Split-Digits")
        start = time.perf_counter()
        args = ["fit", "-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "classification" / config)]
        try:
            with one_line_errors():
                cli = LifelongCLI(args=[*args, *argv])
        except ConfigError as err:
            fail(str(err))
        wall = time.perf_counter() - start
        log_dir = cli.trainer.log_dir
        log_dirs.append(log_dir)
        with open(os.path.join(log_dir, "continual_metrics.json")) as f:
            report = json.load(f)
        cil, til = report["metrics"]["accuracy"]["summary"], report["metrics"]["task_il_accuracy"]["summary"]
        rows[method] = {
            "class-IL accuracy": cil["average_accuracy"],
            "task-IL accuracy": til["average_accuracy"],
            "class-IL forgetting": cil["forgetting"],
            "class-IL bwt": cil["bwt"],
            "task-IL fwt": til["fwt"],
            "wall time (s)": wall,
        }
    console.rule("[bold]Comparison")
    console.print(summary_table(rows, "Split-Digits, 5 tasks: final average accuracy (%) and transfer"))
    root = os.path.commonpath([os.path.abspath(d) for d in log_dirs])
    console.print(f"TensorBoard logs and continual_metrics.json: {', '.join(log_dirs)}")
    console.print(f"View them with: tensorboard --logdir {os.path.relpath(root)}")


REMOVAL_RUNS = Path("runs") / "demo_removal"


def removal(argv: list[str]) -> None:
    """`lifelong demo-removal`: on the small pretrained inpainting base (built on first use), trains D_phi and
    RORem on the embedded removal set, then removes the objects of eight held-out images with the base model
    and with RORem: a table of their PSNR inside the mask, ground-truth judgement and D_phi's score, and
    `runs/demo_removal/before_after.png` (rows: source | mask | base | RORem | ground truth). Extra arguments
    go to both fits."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from cli.diffusion import _save_png
    from cli.errors import ConfigError, fail
    from cli.main import QUIET, LifelongCLI, one_line_errors
    from datamodules.removal import human_label, psnr_inside

    console = Console()
    fits = {}
    for name in ("discriminator", "rorem"):
        console.rule(f"[bold]{name} on the small pretrained base")
        args = ["fit", "-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / f"removal/{name}_pretrained.yaml")]
        args += [f"--trainer.default_root_dir={REMOVAL_RUNS / name}", *QUIET]
        if name == "rorem":
            args.append(f"--model.init_args.discriminator={REMOVAL_RUNS / 'discriminator/checkpoints/last.ckpt'}")
        try:
            with one_line_errors():
                fits[name] = LifelongCLI(args=[*args, *argv])
        except ConfigError as err:
            fail(str(err))
    trained = fits["rorem"].model.eval()
    base = LifelongCLI(args=[a for a in args[1:] if not a.startswith("--trainer.default_root_dir")] + argv, run=False)
    base = base.model.eval()  # the same config, not trained: the base inpainting model
    data = fits["rorem"].datamodule.eval_dataset(0)
    items = [data[i] for i in range(8)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("source", "mask", "target")}
    seeds = list(range(8))
    results = {"base": base.remove(batch["source"], batch["mask"], seeds)}
    results["RORem"] = trained.remove(batch["source"], batch["mask"], seeds)
    table = Table(title="Held-out removals: PSNR inside the mask (dB), ground-truth success, D_phi's score")
    table.add_column("image")
    for who in results:
        table.add_column(f"{who} PSNR")
        table.add_column(f"{who} good")
        table.add_column(f"{who} D")
    cells = {}
    for who, result in results.items():
        p = psnr_inside(result, batch["target"], batch["mask"])
        good = human_label(result, batch["target"], batch["mask"], trained.human_threshold_db)
        d = trained.score(batch["source"], batch["mask"], result, seeds)
        cells[who] = (p, good, d)
    for i in range(8):
        row = [str(i)]
        for p, good, d in cells.values():
            row += [f"{float(p[i]):.1f}", "yes" if good[i] else "no", f"{float(d[i]):.2f}"]
        table.add_row(*row)
    console.print(table)
    strips = [
        torch.cat([(batch["source"][i] + 1) / 2, batch["mask"][i].expand(3, -1, -1)]
                  + [(r[i] + 1) / 2 for r in results.values()] + [(batch["target"][i] + 1) / 2], dim=-1)
        for i in range(8)
    ]  # fmt: skip
    grid = torch.cat(strips, dim=-2)
    _save_png(grid.clamp(0, 1), REMOVAL_RUNS / "before_after.png", "demo")
    console.print(f"rows: source | mask | base | RORem | ground truth: {REMOVAL_RUNS / 'before_after.png'}")
    console.print(f"TensorBoard: tensorboard --logdir {REMOVAL_RUNS}")
