"""`lifelong fit|validate|test|predict` (LightningCLI) and the suite's extra subcommands (`lifelong demo`).

Configs compose: `lifelong fit -c configs/trainer/cpu.yaml -c configs/classification/er_splitdigits.yaml`.
The continual callbacks are always present and configured under their own keys (`task_switch:`,
`continual_metrics:`); TensorBoard is the default logger and rich the progress bar.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import datamodules  # noqa: F401  (registers the datamodules)
import lightning_modules  # noqa: F401  (registers the methods)
from callbacks import ContinualMetrics, ExpertFreezing, TaskSwitch  # also registers them for short class names
from cli.errors import ConfigError
from datamodules.base import ContinualDataModule
from lightning_modules.base import ContinualModule


class _NoTips(logging.Filter):
    """Drops Lightning's advertising tips, which say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


# Lightning's pytree helper uses an API that torch deprecates; the warning repeats every epoch.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# `lifelong demo` and the benchmarks build LifelongCLI(args=...) while sys.argv holds their own arguments.
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")

for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
    logging.getLogger(_name).addFilter(_NoTips())


#: arguments that keep a run's terminal quiet (no progress bar, model summary or metric tables), for
#: runs started from code: tests and benchmarks
QUIET = (
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--continual_metrics.print_tables=false",
)


class LifelongCLI(LightningCLI):
    """LightningCLI with the task stream linked from data to model and the continual callbacks built in."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        kwargs.setdefault("auto_configure_optimizers", False)  # each module builds its own (per task)
        # The task-switch callback sets the epoch budget from the stream (num_tasks x epochs_per_task).
        kwargs.setdefault("trainer_defaults", {"max_epochs": -1})
        super().__init__(
            ContinualModule,
            ContinualDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TaskSwitch, "task_switch")
        parser.add_lightning_class_args(ContinualMetrics, "continual_metrics")
        parser.add_lightning_class_args(ExpertFreezing, "expert_freezing")
        parser.link_arguments("data.stream", "model.init_args.stream", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict[str, Any], extra_callbacks: list) -> Any:
        config = dict(config)
        given = list(config.get("callbacks") or []) + list(extra_callbacks)
        if config.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in given):
            config["callbacks"] = list(config.get("callbacks") or []) + [RichProgressBar()]
        trainer = super()._instantiate_trainer(config, extra_callbacks)
        # Lightning's default checkpoint callback, adapted: one folder per experiment (not per logger
        # version), so `--ckpt_path last` finds the previous run's checkpoint, and only `last.ckpt`,
        # rewritten each epoch (a numbered copy per epoch doubles the writes and buys no resume
        # safety). SLURM requeue checkpoints go to default_root_dir too.
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None and cb.monitor is None:
                cb.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
                cb.save_last = True
                cb.save_top_k = 0
        return trainer


EXTRA_COMMANDS = {
    "demo": "cli.demo:main",
    "sample": "cli.diffusion:sample",
    "export": "cli.diffusion:export",
    "make-reg": "cli.diffusion:make_reg",
    "make-demos": "cli.robot:make_demos",
}


_NOISE = (
    "Expected a <class 'NoneType'>",
    "Expected a path",
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value",
)


def _subclass_names(base: type) -> list[str]:
    found, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if not sub.__name__.startswith("_"):
                found.add(f"{sub.__module__.split('.')[0]}.{sub.__name__}")
    return sorted(found)


def _one_line(err: BaseException) -> str:
    """The informative line of a jsonargparse error (they nest the reason several levels deep)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    prefix = f"{key.group(1)}: " if key else ""
    base = {"model": ContinualModule, "data": ContinualDataModule}.get(key.group(1) if key else "")
    choices = f"; choose one of: {', '.join(_subclass_names(base))}" if base else ""
    for i, line in enumerate(lines):
        unknown = re.search(r"Expected a dot import path string: (\S+)", line)
        if unknown:
            return f"{prefix}unknown class_path {unknown.group(1)!r}{choices}"
        bad = re.match(r"- Problem with given class_path '([^']+)':", line)
        if bad and i + 1 < len(lines):
            reason = lines[i + 1]
            if "has no attribute" in reason or "No module named" in reason:
                return f"{prefix}unknown class_path {bad.group(1)!r}{choices}"
            return f"{prefix}{bad.group(1)}: {reason}"
    for line in lines[1:]:
        text = line.lstrip("- ").strip()
        if line.startswith("-") and not text.startswith(_NOISE):
            return text if key and text.startswith(key.group(1)) else prefix + text
    return lines[0]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: dispatches extra subcommands, else runs LightningCLI; bad input -> one line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[args[0]].split(":")
        getattr(__import__(module, fromlist=[func]), func)(args[1:])
        return
    try:
        LifelongCLI(args=argv)
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        print(f"lifelong: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException) -> str | None:
    """One line for a user's mistake (ours: ConfigError; jsonargparse's: ArgumentError), else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConfigError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    if type(err).__name__ == "ArgumentError":
        return _one_line(err)
    return None


if __name__ == "__main__":
    main()
