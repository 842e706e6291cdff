"""Result table: the robot methods on the 3-task Meta-World sequence (CW3) with seeds 0 and 1.

    python benchmarks/robot.py [--seeds 0 1] [--methods sequential dmpel ...] [--jobs 2]

Runs `configs/robot/<method>_cw3.yaml` through `lifelong fit` (one process per run, `--jobs` at a time,
one torch thread each), prints a table, writes `benchmarks/out/robot_cw3.json` and the committed
`docs/results/metaworld_cw3.md`: the final success on each task, FWT, NBT and AUC (LIBERO's
definitions, from the per-task success curves), trainable parameters added per task, and wall time.
The rollout throughput with 0, 1 and 2 worker processes comes from `benchmarks/rollout_speed.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["sequential", "er", "ewc", "packnet", "tail", "dmpel"]
NAMES = {
    "sequential": "Sequential",
    "er": "ER",
    "ewc": "EWC",
    "packnet": "PackNet",
    "tail": "TAIL",
    "dmpel": "DMPEL",
    "l2m": "L2M",
    "iscil": "IsCiL",
}
SUMMARY = [("final success", "average_accuracy"), ("FWT", "fwt"), ("NBT", "nbt"), ("AUC", "auc")]


def run_one(method: str, seed: int, out: str) -> None:
    """One run in this process; writes its summary row as JSON to `out`."""
    import torch

    torch.set_num_threads(1)
    from cli.main import QUIET, LifelongCLI

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cli = LifelongCLI(
            args=[
                "fit",
                "-c",
                str(ROOT / "configs/trainer/cpu.yaml"),
                "-c",
                str(ROOT / f"configs/robot/{method}_cw3.yaml"),
                f"--seed_everything={seed}",
                *QUIET,
                f"--trainer.default_root_dir={root}",
            ]
        )
        wall = time.perf_counter() - start
        with open(os.path.join(cli.trainer.log_dir, "continual_metrics.json")) as f:
            report = json.load(f)
    model = cli.model
    added = [model.added_parameters(t) for t in range(model.num_tasks)] if hasattr(model, "added_parameters") else []
    row = {
        "matrix": report["matrix"],
        "summary": report["summary"],
        "curves": report.get("curves"),
        "added_parameters": added,
        "total_parameters": sum(p.numel() for p in model.policy.parameters()),
        "wall_s": wall,
    }
    Path(out).write_text(json.dumps(row, indent=2))


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=list(NAMES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SEED", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--markdown", default=str(ROOT / "docs/results/metaworld_cw3.md"))
    opts = parser.parse_args()
    if opts.one:
        run_one(opts.one[0], int(opts.one[1]), opts.one[2])
        return

    os.makedirs(ROOT / "benchmarks/out/robot", exist_ok=True)
    todo = [(m, s) for m in opts.methods for s in opts.seeds]
    running: list[tuple[subprocess.Popen, str, int]] = []
    for method, seed in todo:
        while len(running) >= opts.jobs:
            running = [r for r in running if r[0].poll() is None]
            time.sleep(1)
        out = str(ROOT / f"benchmarks/out/robot/{method}_seed{seed}.json")
        cmd = [sys.executable, __file__, "--one", method, str(seed), out]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        running.append((subprocess.Popen(cmd, env=env, cwd=ROOT), method, seed))
        print(f"started {method} seed {seed}", flush=True)
    failed = [(m, s) for p, m, s in running if p.wait() != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}")

    runs = {
        m: [json.loads((ROOT / f"benchmarks/out/robot/{m}_seed{s}.json").read_text()) for s in opts.seeds]
        for m in opts.methods
    }
    task_names = None
    table = {}
    for m, rows in runs.items():
        n = len(rows[0]["matrix"])
        cells = {}
        for j in range(n):
            cells[f"T{j + 1} final"] = fmt([r["matrix"][-1][j] for r in rows], digits=0)
        for label, key in SUMMARY:
            cells[label] = fmt([r["summary"].get(key) for r in rows], scale=0.01)
        added = rows[0]["added_parameters"]
        cells["params added / task"] = f"{round(statistics.mean(added)):,}" if added else "-"
        cells["wall time (s)"] = fmt([r["wall_s"] for r in rows], digits=0)
        table[NAMES[m]] = cells
    header = list(next(iter(table.values())))

    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"Meta-World CW3, seeds {opts.seeds}: mean ± std")
    out.add_column("method")
    for h in header:
        out.add_column(h, justify="right")
    for name, cells in table.items():
        out.add_row(name, *cells.values())
    Console(width=180).print(out)
    (ROOT / "benchmarks/out/robot_cw3.json").write_text(json.dumps({"seeds": opts.seeds, "runs": runs}, indent=2))

    speed_path = ROOT / "benchmarks/out/rollout_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
    lines = [
        "# Meta-World CW3 results",
        "",
        "Lifelong imitation on three Continual World tasks in order, 50 scripted-expert demonstrations per",
        "task (Meta-World v3, MuJoCo), low-dimensional states, the small foundation policy of",
        "`configs/robot/<method>_cw3.yaml`; success rates from rollouts in the simulator after each task.",
        f"Mean ± std over seeds {', '.join(map(str, opts.seeds))}; written by `python benchmarks/robot.py`",
        "on 2 CPU cores (two runs at a time, one thread each).",
        "",
        "Columns: `Tj final` = success (%) on task j after the last task; FWT, NBT, AUC as LIBERO defines them",
        "(FWT from each task's success curve while it trains, NBT = average drop from a task's best success,",
        "lower is better; AUC combines both), as fractions; parameters added per task = what each new task",
        "trains and keeps (replay data and masks are not parameters).",
        "",
        "| method | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    lines += [f"| {name} | " + " | ".join(cells.values()) + " |" for name, cells in table.items()]
    if speed:
        lines += ["", "Rollout throughput (`benchmarks/rollout_speed.py`):", "", "```", speed.get("table", ""), "```"]
    Path(opts.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.markdown).write_text("\n".join(lines) + "\n")
    print(f"wrote {os.path.relpath(opts.markdown, ROOT)}")
    del task_names


if __name__ == "__main__":
    main()
