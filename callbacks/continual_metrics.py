"""`ContinualMetrics`: after each task, score every task and fill the matrix R[i][j] (metric on task j
after training task i); before task 1, score the untrained model (the baseline FWT needs).

Scores are per-example values from the module's `eval_step` (for classification: class-IL and
task-IL correctness), averaged per task with counts summed over DDP ranks, so the figures cover
the whole evaluation sets. After each task the callback logs `eval/<metric>/task_<j>`, the summary
scalars and the primary metric's matrix as a heatmap to TensorBoard, and writes `continual_metrics.json` into the
run's log folder; at the end of fit it prints the matrices as rich tables. In `validate`/`test`
it scores a checkpoint on every task and writes `<stage>_metrics.json`.
"""

from __future__ import annotations

import json
import os
from statistics import mean
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import Metric

from callbacks.base import ContinualCallback

Matrix = list[list[float | None]]


class PerTaskMean(Metric):
    """Mean of per-example values for each task; sums and counts are reduced over ranks."""

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.add_state("total", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, task_id: int) -> None:
        self.total[task_id] += values.detach().double().sum()
        self.count[task_id] += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def summarize(matrix: Matrix, untrained: list[float] | None = None) -> dict[str, float | None]:
    """The standard summaries of a (possibly partly filled) matrix; the last filled row counts as final.

    average_accuracy: mean_j R[L][j] over tasks seen (L = last trained task).
    average_incremental_accuracy: mean over i <= L of mean_{j<=i} R[i][j] (Rebuffi et al.).
    forgetting: mean over j < L of max_{j<=i<=L} R[i][j] - R[L][j] (Chaudhry et al.; Mammoth).
    bwt: mean over j < L of R[L][j] - R[j][j]; fwt: mean over 1 <= i <= L of R[i-1][i] - b_i, with b_i
    the untrained model's score on task i (Lopez-Paz & Ranzato).
    """
    done = [i for i, row in enumerate(matrix) if row and all(v is not None for v in row[: i + 1])]
    empty = dict.fromkeys(("average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt"))
    if not done:
        return empty
    last = done[-1]
    R = matrix
    out = dict(empty)
    out["average_accuracy"] = mean(R[last][j] for j in range(last + 1))
    out["average_incremental_accuracy"] = mean(mean(R[i][j] for j in range(i + 1)) for i in done)
    if last > 0:
        out["forgetting"] = mean(max(R[i][j] for i in range(j, last + 1)) - R[last][j] for j in range(last))
        out["bwt"] = mean(R[last][j] - R[j][j] for j in range(last))
        if untrained is not None and all(R[i - 1][i] is not None for i in range(1, last + 1)):
            out["fwt"] = mean(R[i - 1][i] - untrained[i] for i in range(1, last + 1))
    return out


def _write_json(path: str, payload: dict) -> None:
    """Writes atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


class ContinualMetrics(ContinualCallback):
    """Args:
    scale: multiply the per-example means (100 reports accuracy in percent, as Mammoth does).
    filename: name of the JSON written into the run's log folder.
    print_tables: print the matrices with rich at the end of fit / test.
    """

    def __init__(self, scale: float = 100.0, filename: str = "continual_metrics.json", print_tables: bool = True):
        self.scale = scale
        self.filename = filename
        self.print_tables = print_tables
        self.matrix: dict[str, Matrix] = {}
        self.untrained: dict[str, list[float]] = {}
        self.task_names: list[str] = []
        self._stage_metrics: dict[str, PerTaskMean] = {}

    # -- fit: evaluate at task boundaries -----------------------------------------------------
    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        if task_id == 0 and not self.untrained:
            self.task_names = list(trainer.datamodule.task_names)
            self.untrained = self.evaluate(trainer, pl_module)

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task_id: int) -> None:
        scores = self.evaluate(trainer, pl_module)
        n = len(self.task_names)
        for name, row in scores.items():
            self.matrix.setdefault(name, [[None] * n for _ in range(n)])[task_id] = row
        self._log(trainer, task_id)
        log_dir = trainer.log_dir or "."  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            _write_json(os.path.join(log_dir, self.filename), self.report())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.print_tables and trainer.is_global_zero and self.matrix:
            self.print_report(type(pl_module).__name__)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list[float]]:
        """Scores of the module on every task's evaluation set: {metric: [score per task]}. All ranks call it."""
        dm = trainer.datamodule
        metrics: dict[str, PerTaskMean] = {}
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for j, loader in enumerate(dm.eval_dataloaders()):
                for batch in loader:
                    # Evaluation items are model-ready: move them without the datamodule's train-time hooks.
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, j)
                    for name, values in pl_module.eval_step(batch, j).items():
                        if name not in metrics:
                            metrics[name] = PerTaskMean(dm.num_tasks).to(pl_module.device)
                        metrics[name].update(values, j)
        pl_module.train(was_training)
        return {name: (m.compute() * self.scale).tolist() for name, m in metrics.items()}

    # -- reporting ----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The `continual_metrics.json` payload; the first metric is the primary one."""
        per_metric = {
            name: {
                "matrix": mat,
                "untrained": self.untrained.get(name),
                "summary": summarize(mat, self.untrained.get(name)),
            }
            for name, mat in self.matrix.items()
        }
        primary = next(iter(per_metric))
        return {
            "metric": primary,
            "scale": self.scale,
            "tasks": self.task_names,
            "matrix": per_metric[primary]["matrix"],
            "untrained": per_metric[primary]["untrained"],
            "summary": per_metric[primary]["summary"],
            "metrics": per_metric,
        }

    def _log(self, trainer: L.Trainer, task_id: int) -> None:
        if trainer.logger is None:
            return
        scalars = {}
        for name, mat in self.matrix.items():
            for j, v in enumerate(mat[task_id]):
                scalars[f"eval/{name}/task_{j}"] = v
            for key, v in summarize(mat, self.untrained.get(name)).items():
                if v is not None:
                    scalars[f"eval/{name}/{key}"] = v
        trainer.logger.log_metrics(scalars, step=task_id)
        if isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            name, mat = next(iter(self.matrix.items()))  # the primary metric (a figure costs ~50 ms)
            trainer.logger.experiment.add_figure(f"eval/{name}/matrix", heatmap(mat, name), global_step=task_id)

    def print_report(self, run: str = "") -> None:
        from rich.console import Console

        console = Console()
        for name, mat in self.matrix.items():
            console.print(
                matrix_table(mat, self.task_names, f"{run} {name}: R(i, j) = score on task j after training task i")
            )
            console.print(summary_table({run: summarize(mat, self.untrained.get(name))}, f"{run} {name}: summary"))

    # -- validate / test: one row for a checkpoint --------------------------------------------
    def _stage_start(self, trainer: L.Trainer) -> None:
        self._stage_metrics = {}

    def _stage_batch(self, pl_module: L.LightningModule, outputs: Any, dataloader_idx: int) -> None:
        num_tasks = pl_module.num_tasks
        for name, values in outputs.items():
            if name not in self._stage_metrics:
                self._stage_metrics[name] = PerTaskMean(num_tasks).to(pl_module.device)
            self._stage_metrics[name].update(values, dataloader_idx)

    def _stage_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        names = list(trainer.datamodule.task_names)
        rows = {name: (m.compute() * self.scale).tolist() for name, m in self._stage_metrics.items()}
        for name, row in rows.items():
            for j, v in enumerate(row):
                pl_module.log(f"{stage}/{name}/task_{j}", v, add_dataloader_idx=False)
            pl_module.log(f"{stage}/{name}/average", mean(row), add_dataloader_idx=False)
        log_dir = trainer.log_dir or "."  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            payload = {
                "tasks": names,
                "trained_tasks": pl_module.current_task + 1,
                "scores": rows,
                "scale": self.scale,
            }
            _write_json(os.path.join(log_dir, f"{stage}_metrics.json"), payload)
            if self.print_tables:
                from rich.console import Console

                Console().print(matrix_table(list(rows.values()), names, f"{stage}: score on each task", list(rows)))

    def on_validation_epoch_start(self, trainer, pl_module):
        self._stage_start(trainer)

    def on_test_epoch_start(self, trainer, pl_module):
        self._stage_start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stage_batch(pl_module, outputs, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stage_batch(pl_module, outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._stage_end(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module):
        self._stage_end(trainer, pl_module, "test")

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"matrix": self.matrix, "untrained": self.untrained, "task_names": self.task_names}

    def load_state_dict(self, state_dict: dict) -> None:
        self.matrix = state_dict["matrix"]
        self.untrained = state_dict["untrained"]
        self.task_names = state_dict["task_names"]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def matrix_table(rows: list[list[float | None]], task_names: list[str], title: str, row_names: list[str] | None = None):
    """A rich table of a matrix: one row per trained task (or per name), one column per task."""
    from rich.table import Table

    caption = "; ".join(f"T{j + 1}: {name}" for j, name in enumerate(task_names))
    table = Table(title=title, caption=caption)
    table.add_column("")
    for j in range(len(task_names)):
        table.add_column(f"T{j + 1}", justify="right")
    for i, row in enumerate(rows):
        if row is None or all(v is None for v in row):
            continue
        table.add_row(row_names[i] if row_names else f"after T{i + 1}", *[_fmt(v) for v in row])
    return table


def summary_table(summaries: dict[str, dict[str, float | None]], title: str):
    """A rich table with one row per run and one column per summary scalar."""
    from rich.table import Table

    table = Table(title=title)
    keys = list(next(iter(summaries.values())))
    table.add_column("run")
    for k in keys:
        table.add_column(k.replace("_", " "), justify="right")
    for run, s in summaries.items():
        table.add_row(run, *[_fmt(s[k]) for k in keys])
    return table


def heatmap(matrix: Matrix, name: str):
    """The matrix as a matplotlib figure with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [[float("nan") if v is None else v for v in row] for row in matrix]
    n = len(data)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * n, 1 + 0.6 * n))
    ax.imshow(data, cmap="viridis", vmin=0)
    for i in range(n):
        for j in range(n):
            if matrix[i][j] is not None:
                ax.text(j, i, f"{matrix[i][j]:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
    ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
    ax.set_title(name)
    fig.subplots_adjust(left=0.2, bottom=0.2, right=0.95, top=0.88)
    return fig
