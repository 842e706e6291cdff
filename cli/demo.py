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
