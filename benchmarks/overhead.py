"""Suite overhead on Mammoth's small steps: `lifelong fit` against a plain PyTorch loop doing the same work.

Main setting (a user's comparison with Mammoth): Split-Digits (scikit-learn's 8x8 digits, 80/20 split, 5 tasks
of 2 classes), Finetune (`configs/classification/finetune_splitdigits.yaml`) with an MLP (256, 256), SGD lr 0.1,
batch 32, 5 epochs per task: 230 steps of about a millisecond, where a fixed cost per step shows.

Both arms train the same model (same initialisation, same batches in the same order, a fresh SGD at each task)
and evaluate the same way: every task's test set before task 0 (the untrained baseline) and after each task,
class-IL (arg-max over the classes seen so far) and task-IL (arg-max within the task's classes), as
`ContinualMetrics` does; the table says whether the two arms' accuracy matrices agree. The suite arm is
`trainer.fit` with the CLI's default callbacks (task switch, continual metrics, checkpoints, TensorBoard
logger, rich progress bar) and `configs/trainer/cpu.yaml`; it is timed once more without the progress bar.
The suite's own extra evaluations (Mammoth's FWT points: the next task before and after its start) count as
its overhead. A third arm, bare Lightning (the plain loop's model, loss and evaluations in a LightningModule,
one `Trainer.fit` without logger, checkpoints, bar or summary), measures the floor of any Lightning-based fit.

    python benchmarks/overhead.py [--repeats 5] [--wide]

The arms alternate in one process (warm-up run first, then the median of the repeats), so drifts in machine
load hit both alike. Startup (imports, config parsing, building model, data and trainer, reading the data)
is a one-off cost, reported apart from the ratio. `--wide` adds the old setting with steps of realistic
size (MLP 2048-2048, batch 256, 100 steps per task; about two minutes). Prints a table, writes
benchmarks/out/overhead.json; the last line is `ratio: X.XX` (suite fit wall time / plain wall time in the
main setting, default callbacks; goal <= 1.5, below bare Lightning's own ratio on this machine).
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
MAIN = "Mammoth digits: MLP (256,256), batch 32, 5 epochs/task"
SETTINGS = {
    # name: (hidden widths, per-step batch, epochs per task, steps per task or None)
    MAIN: ([256, 256], 32, 5, None),
}
WIDE = {"wide MLP (2048,2048), batch 256, 100 steps/task": ([2048, 2048], 256, 1, 100)}


def suite_cli(hidden: list[int], batch: int, epochs: int, steps: int | None, root: str, bar: bool):
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
        f"--trainer.enable_progress_bar={str(bar).lower()}",
        f"--trainer.default_root_dir={root}",
    ]
    return LifelongCLI(args=args, run=False)


def run_suite(hidden: list[int], batch: int, epochs: int, steps: int | None, bar: bool = True) -> dict:
    """`trainer.fit` timed alone; building the CLI and reading the data (as `lifelong fit` does before fit)
    is the startup."""
    from callbacks import ContinualMetrics

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        cli = suite_cli(hidden, batch, epochs, steps, root, bar)
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")
        built = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        done = time.perf_counter()
    metrics = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ContinualMetrics))
    matrices = {name: [metrics.untrained[name], *metrics.matrix[name]] for name in metrics.matrix}
    return {"fit_s": done - built, "startup_s": built - start, "steps": cli.trainer.global_step, "matrices": matrices}


def plain_parts(hidden: list[int], batch: int, steps: int | None):
    """The data, the model (the suite's initialisation) and the evaluation both hand-made arms share."""
    from datamodules import SplitDigits
    from lightning_modules.nn.backbones import MLP
    from lightning_modules.nn.init import initialise

    dm = SplitDigits(num_tasks=5, batch_size=batch, seed=0)
    dm.setup()
    dm.train_batches_per_epoch = steps
    torch.manual_seed(0)  # the suite's seed_everything: the same initial weights
    backbone = MLP(dm.input_shape, hidden)
    head = initialise(torch.nn.Linear(backbone.out_features, dm.num_classes), backbone.init)
    model = torch.nn.Sequential(backbone, head)
    offsets = dm.stream.class_offsets

    def evaluate(loaders, task: int) -> dict[str, list[float]]:
        """Accuracy on every task's test set after task `task`: class-IL and task-IL, in percent."""
        was_training = model.training
        model.eval()
        rows = {"accuracy": [], "task_il_accuracy": []}
        with torch.no_grad():
            for j, loader in enumerate(loaders):
                correct, correct_til, n = 0, 0, 0
                for b in loader:
                    scores, y = model(b["x"]), b["y"]
                    correct += int((scores[:, : offsets[task + 1]].argmax(1) == y).sum())
                    correct_til += int((scores[:, offsets[j] : offsets[j + 1]].argmax(1) + offsets[j] == y).sum())
                    n += len(y)
                rows["accuracy"].append(100.0 * correct / n)
                rows["task_il_accuracy"].append(100.0 * correct_til / n)
        model.train(was_training)
        return rows

    return dm, model, evaluate


def run_plain(hidden: list[int], batch: int, epochs: int, steps: int | None) -> dict:
    """The same model, loaders and optimizer in a hand-written loop, with the same evaluations; no logging,
    checkpoints or progress bar."""
    dm, model, evaluate = plain_parts(hidden, batch, steps)
    n = 0
    start = time.perf_counter()
    test_loaders = dm.eval_dataloaders()
    rows = [evaluate(test_loaders, 0)]
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
                n += 1
        rows.append(evaluate(test_loaders, t))
    seconds = time.perf_counter() - start
    return {"fit_s": seconds, "steps": n, "matrices": {name: [r[name] for r in rows] for name in rows[0]}}


def run_bare_lightning(hidden: list[int], batch: int, epochs: int, steps: int | None) -> dict:
    """Lightning's own loop with nothing of the suite: a LightningModule with the plain loop's model, loss and
    evaluations, one `fit` over every task (data reloaded each epoch, the task advanced at its last epoch's
    end), no logger, checkpoints, progress bar or summary. The floor a Lightning-based fit starts from.
    Plain SGD keeps no state, so one optimizer for the stream trains as a fresh one per task would."""
    import lightning as L

    dm, model, evaluate = plain_parts(hidden, batch, steps)
    test_loaders = dm.eval_dataloaders()
    rows: list[dict] = []

    class Bare(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, b, batch_idx):
            return F.cross_entropy(self.model(b["x"]), b["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):  # reloaded each epoch: the current task's
            return dm.train_dataloader()

        def on_train_epoch_end(self):
            if (self.current_epoch + 1) % epochs == 0:
                t = self.current_epoch // epochs
                rows.append(evaluate(test_loaders, t))
                if t + 1 < dm.num_tasks:
                    dm.set_task(t + 1)

    dm.set_task(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=dm.num_tasks * epochs,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Bare()
    start = time.perf_counter()
    rows.append(evaluate(test_loaders, 0))
    trainer.fit(module)
    seconds = time.perf_counter() - start
    return {
        "fit_s": seconds,
        "steps": trainer.global_step,
        "matrices": {name: [r[name] for r in rows] for name in rows[0]},
    }


def same_matrices(a: dict, b: dict, tol: float = 1e-6) -> bool:
    """Whether both arms scored every task alike (untrained row first), metric by metric."""
    if a.keys() != b.keys():
        return False
    return all(
        abs(x - y) <= tol
        for name in a
        for row_a, row_b in zip(a[name], b[name], strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    )


def measure(setting: tuple, repeats: int, warmup: int) -> dict:
    hidden, batch, epochs, steps_per_task = setting
    runs: dict[str, list[dict]] = {"plain": [], "bare_lightning": [], "suite": [], "suite_no_bar": []}
    for i in range(warmup + repeats):  # alternate, so drifts in machine load hit every arm alike
        done = {
            "plain": run_plain(hidden, batch, epochs, steps_per_task),
            "bare_lightning": run_bare_lightning(hidden, batch, epochs, steps_per_task),
            "suite": run_suite(hidden, batch, epochs, steps_per_task),
            "suite_no_bar": run_suite(hidden, batch, epochs, steps_per_task, bar=False),
        }
        if i >= warmup:
            for arm, run in done.items():
                runs[arm].append(run)
    steps = {r["steps"] for arm in runs.values() for r in arm}
    if len(steps) != 1:
        raise SystemExit(f"step counts differ between the arms: {sorted(steps)}")
    (n,) = steps
    median = {arm: statistics.median(r["fit_s"] for r in arm_runs) for arm, arm_runs in runs.items()}
    p = median["plain"]
    return {
        "steps": n,
        "plain_s": p,
        "suite_s": median["suite"],
        "suite_no_bar_s": median["suite_no_bar"],
        "bare_lightning_s": median["bare_lightning"],
        "ratio_bare_lightning": median["bare_lightning"] / p,
        "suite_over_bare_lightning": median["suite"] / median["bare_lightning"],
        "ratio": median["suite"] / p,
        "ratio_no_bar": median["suite_no_bar"] / p,
        "overhead_ms_per_step": 1000 * (median["suite"] - p) / n,
        "overhead_ms_per_step_no_bar": 1000 * (median["suite_no_bar"] - p) / n,
        "startup_s": statistics.median(r["startup_s"] for r in runs["suite"]),
        "same_results": all(
            same_matrices(runs["plain"][0]["matrices"], runs[arm][0]["matrices"]) for arm in runs if arm != "plain"
        ),
        "runs_s": {arm: [r["fit_s"] for r in arm_runs] for arm, arm_runs in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (first-use imports, caches)")
    parser.add_argument("--wide", action="store_true", help="add the wide-MLP setting (about two minutes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/overhead.json"))
    opts = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    settings = {**SETTINGS, **(WIDE if opts.wide else {})}
    results = {name: measure(setting, opts.repeats, opts.warmup) for name, setting in settings.items()}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lifelong fit vs plain PyTorch, Split-Digits 5 tasks, median of {opts.repeats}")
    columns = ("setting", "steps", "plain (s)", "suite (s)", "ratio", "overhead/step (ms)")
    columns += ("no bar (s)", "ratio no bar", "bare Lightning (s)", "ratio bare", "startup (s)", "same results")
    for col in columns:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, r in results.items():
        table.add_row(
            name,
            str(r["steps"]),
            f"{r['plain_s']:.2f}",
            f"{r['suite_s']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['overhead_ms_per_step']:.2f}",
            f"{r['suite_no_bar_s']:.2f}",
            f"{r['ratio_no_bar']:.2f}",
            f"{r['bare_lightning_s']:.2f}",
            f"{r['ratio_bare_lightning']:.2f}",
            f"{r['startup_s']:.1f}",
            "yes" if r["same_results"] else "no",
        )
    Console(width=170).print(table)
    os.makedirs(os.path.dirname(opts.out), exist_ok=True)
    payload = {"torch_threads": torch.get_num_threads(), "repeats": opts.repeats, "main": MAIN, "results": results}
    with open(opts.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"ratio: {results[MAIN]['ratio']:.2f}")


if __name__ == "__main__":
    main()
