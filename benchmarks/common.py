"""What the result-table benchmarks share: one `lifelong fit` run in this process, mean ± std cells, and
running one process per (method, seed) a few at a time."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def fit_run(
    config: Path, seed: int, then: Callable[[Any, str], Any] | None = None, extra: list[str] | tuple = ()
) -> tuple[Any, dict, float, Any]:
    """`lifelong fit -c cpu.yaml -c config [extra]` with `seed`, quiet, in a temporary folder: (cli, the run's
    continual_metrics.json, wall seconds, `then(cli, folder)` called before the folder is removed)."""
    from cli.main import QUIET, LifelongCLI

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cli = LifelongCLI(
            args=[
                "fit",
                "-c",
                str(ROOT / "configs/trainer/cpu.yaml"),
                "-c",
                str(config),
                f"--seed_everything={seed}",
                *QUIET,
                f"--trainer.default_root_dir={root}",
                *extra,
            ]
        )
        wall = time.perf_counter() - start
        with open(os.path.join(cli.trainer.log_dir, "continual_metrics.json")) as f:
            report = json.load(f)
        extra = then(cli, root) if then is not None else None
    return cli, report, wall, extra


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± sample std of the values that are not None (times `scale`), or "-"."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"


def run_jobs(script: str, todo: list[tuple[str, int]], out: Path, jobs: int, extra: list[str] | tuple = ()) -> None:
    """Runs `script --one METHOD SEED out/METHOD_seedSEED.json [extra]` for each pair, `jobs` at a time, one
    torch thread each; stops naming the runs that failed."""
    out.mkdir(parents=True, exist_ok=True)
    started: list[tuple[subprocess.Popen, str, int]] = []
    for method, seed in todo:
        while sum(p.poll() is None for p, _, _ in started) >= jobs:
            time.sleep(1)
        cmd = [sys.executable, script, "--one", method, str(seed), str(out / f"{method}_seed{seed}.json"), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        started.append((subprocess.Popen(cmd, env=env, cwd=ROOT), method, seed))
        print(f"started {method} seed {seed}", flush=True)
    failed = [(m, s) for p, m, s in started if p.wait() != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}")


def table_parser(
    doc: str, methods: list[str], markdown: str, choices: list[str] | None = None
) -> argparse.ArgumentParser:
    """The options of a result table run through `run_jobs`: --seeds, --methods, --jobs, --report, the
    hidden --one METHOD SEED OUT that `run_jobs` starts each run with, and --markdown (the committed table)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=methods, choices=choices or methods)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from earlier runs")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SEED", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--markdown", default=markdown)
    return parser


def mean_matrix(rows: list[dict], metric: str) -> list[list[float | None]]:
    """The element-wise mean over runs of metric `metric`'s matrix (None where the runs have none)."""
    mats = [r["metrics"][metric]["matrix"] for r in rows]
    n = len(mats[0])
    return [
        [None if mats[0][i][j] is None else statistics.mean(m[i][j] for m in mats) for j in range(n)] for i in range(n)
    ]


def markdown_table(corner: str, header: list[str], rows: dict[str, list[str]]) -> list[str]:
    """The lines of a markdown table: `corner` over the row names, `header` over the columns."""
    lines = ["| " + " | ".join([corner, *header]) + " |", "|---|" + "---|" * len(header)]
    return lines + ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows.items()]


def print_table(table: dict[str, dict[str, str]]) -> list[str]:
    """Prints a {row name: {column: cell}} table as " | "-separated lines; returns its header."""
    header = list(next(iter(table.values())))
    print(" | ".join(["method", *header]))
    for name, cells in table.items():
        print(" | ".join([name, *cells.values()]))
    return header


def matrix_sections(runs: dict[str, list[dict]], names: dict[str, str], tasks: list[str], metric: str, digits: int):
    """Markdown lines: per method (`names[m]`), the mean over its runs of metric `metric`'s matrix."""
    lines = []
    for m, rows in runs.items():
        mat = mean_matrix(rows, metric)
        cells = {tasks[i]: ["-" if v is None else f"{v:.{digits}f}" for v in row] for i, row in enumerate(mat)}
        lines += [f"{names[m]}:", "", *markdown_table("after \\ on", tasks, cells), ""]
    return lines
