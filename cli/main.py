"""`lifelong fit|validate|test|predict` (LightningCLI) and the suite's extra subcommands (`lifelong demo`).

Configs compose: `lifelong fit -c configs/trainer/cpu.yaml -c configs/classification/er_splitdigits.yaml`.
The continual callbacks are always present and configured under their own keys (`task_switch:`,
`continual_metrics:`); TensorBoard is the default logger and rich the progress bar (`callbacks.progress`: updated
20 times a second, not at every step).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import datamodules  # noqa: F401  (registers the datamodules)
import lightning_modules  # noqa: F401  (registers the methods)
from callbacks import ContinualMetrics, ExpertFreezing, TaskSwitch  # also registers them for short class names
from callbacks.checkpoint import LAST, ContinualCheckpoint
from callbacks.progress import RichProgressBar
from callbacks.task_switch import PORTABLE_STRATEGIES, deepspeed_refusal
from callbacks.throughput import Throughput
from cli.errors import ConfigError
from cli.files import check_output_folder, load_torch_file
from cli.runtime import StopRequested
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


#: settings a resumed run may change without changing what it learns: where the data lives and how it is
#: read, evaluation batch sizes, worker counts, the stream (filled from the data)
RESUME_FREE = (
    "data.init_args.root",
    "data.init_args.num_workers",
    "data.init_args.pin_memory",
    "data.init_args.eval_batch_size",
    "data.init_args.download",
    "model.init_args.rollout_workers",
    "model.init_args.stream",
)


#: strategies Lightning runs on CUDA GPUs only (PORTABLE_STRATEGIES: the ones every family runs anywhere)
GPU_STRATEGIES = ("deepspeed", "fsdp")


#: settings that shape training but not the scores of a trained model (free in `test` / `validate`)
SCORING_FREE = (
    "task_switch",
    "seed_everything",
    "data.init_args.batch_size",
    "data.init_args.seed",
    "data.init_args.train_on",
)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = json.loads(json.dumps(value, default=str))


def run_settings(config: Any) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed or scored under this config, as dotted keys: the
    method and its arguments, the data and its arguments, the task clock and the seed."""
    d = config.as_dict()
    flat: dict[str, Any] = {}
    _flatten(d.get("model"), "model", flat)
    _flatten(d.get("data"), "data", flat)
    for key in ("epochs_per_task", "steps_per_task"):
        flat[f"task_switch.{key}"] = (d.get("task_switch") or {}).get(key)
    flat["seed_everything"] = d.get("seed_everything")
    return {k: v for k, v in flat.items() if not k.startswith(RESUME_FREE)}


def settings_differences(saved: dict[str, Any], current: dict[str, Any], allowed: list[str]) -> list[str]:
    """'key (checkpoint A, config B)' for every setting that differs, except keys under an `allowed` prefix."""
    if "all" in allowed:
        return []
    out = []
    # Another class (method or data) differs in its arguments too: name the class alone.
    other_class = [k[: -len("class_path")] for k in saved if k.endswith("class_path") and saved[k] != current.get(k)]
    for key in sorted(set(saved) | set(current), key=lambda k: (not k.endswith("class_path"), k)):
        if key.startswith(RESUME_FREE) or any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        if any(key.startswith(prefix + "init_args.") for prefix in other_class):
            continue
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if a != b:
            out.append(f"{key} (checkpoint {a!r}, config {b!r})")
    return out


class LifelongCLI(LightningCLI):
    """LightningCLI with the task stream linked from data to model and the continual callbacks built in.

    `--ckpt_path` is checked before anything is built: `last` means `<checkpoint folder>/last.ckpt` and must
    exist; the file must be a checkpoint of this suite; and its method, data and task-clock settings must
    equal the config's (LightningCLI's own behaviour, silently taking the checkpoint's method arguments over
    the config's, is replaced by this check). `--allow_changes KEY` accepts a listed difference (`all`: any).
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
        kwargs.setdefault("auto_configure_optimizers", False)  # each module builds its own (per task)
        # The task-switch callback sets the epoch budget from the stream (num_tasks x epochs_per_task).
        kwargs.setdefault("trainer_defaults", {"max_epochs": -1})
        self._settings: dict[str, Any] | None = None
        super().__init__(
            ContinualModule,
            ContinualDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (a continual method has no `predict`: it is scored on every task)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TaskSwitch, "task_switch")
        parser.add_lightning_class_args(ContinualMetrics, "continual_metrics")
        parser.add_lightning_class_args(ExpertFreezing, "expert_freezing")
        parser.add_lightning_class_args(ContinualCheckpoint, "checkpoint")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_argument(
            "--allow_changes",
            type=list[str],
            default=[],
            help="settings a resumed or scored checkpoint may differ in, e.g. [model.init_args.buffer_size]; [all]",
        )
        parser.link_arguments("data.stream", "model.init_args.stream", apply_on="instantiate")

    # -- the checkpoint a run starts from -----------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        check_run_config(config)
        self._settings = run_settings(config)
        for key in config.get("allow_changes") or []:
            if key != "all" and not any(k == key or k.startswith(key + ".") for k in self._settings):
                raise ConfigError(
                    f"--allow_changes: {key!r} is not a setting of this run; name keys as the resume error lists "
                    "them (e.g. model.init_args.optimizer.init_args.lr), or [all]"
                )
        path = config.get("ckpt_path")
        if path is None:
            if sub in ("test", "validate"):
                raise ConfigError(
                    f"lifelong {sub} scores a trained model: pass --ckpt_path (a checkpoint file, or last)"
                )
            return
        path = self._resolve_ckpt_path(config, str(path))
        checkpoint = _read_checkpoint(path)
        saved = (checkpoint.get("lifelong") or {}).get("settings")
        if saved is not None:
            if config.get("seed_everything") is True and "seed_everything" in saved:
                config.seed_everything = saved["seed_everything"]  # a random seed: keep the checkpoint's
                self._settings["seed_everything"] = saved["seed_everything"]
            allowed = list(config.get("allow_changes") or [])
            if sub in ("test", "validate"):
                allowed += list(SCORING_FREE)
            changed = settings_differences(saved, self._settings, allowed)
            if changed:
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                raise ConfigError(
                    f"--ckpt_path {path} was written with other settings: {'; '.join(changed[:4])}{more}; use the "
                    "config it was trained with, or accept the change with --allow_changes '[KEY, ...]'"
                )
        config.ckpt_path = path

    @staticmethod
    def _resolve_ckpt_path(config: Any, path: str) -> str:
        """`last` -> the checkpoint folder's last.ckpt, which must exist; any other value must be a file."""
        if path == "last":
            root = (config.get("trainer") or {}).get("default_root_dir") or os.getcwd()
            folder = (config.get("checkpoint") or {}).get("dirpath") or os.path.join(root, "checkpoints")
            found = Path(folder) / LAST
            if not found.exists():
                raise ConfigError(
                    f"--ckpt_path last: no checkpoint at {found} (trainer.default_root_dir {root}); point "
                    "trainer.default_root_dir at the trained run or pass its .ckpt file (fit: or start without it)"
                )
            return str(found)
        if not os.path.exists(path):
            raise ConfigError(f"--ckpt_path {path}: not found; pass a checkpoint file (checkpoints/last.ckpt) or last")
        return path

    def _run_subcommand(self, subcommand: str) -> None:
        """Runs it; if bad input stops it before it produced anything, the log folder it started is removed."""
        created = [p for p in _log_folders(self.trainer) if not p.exists()]
        try:
            super()._run_subcommand(subcommand)
        except ConfigError:
            if self.trainer.is_global_zero:
                _remove_if_unused(created)
            raise

    def before_fit(self) -> None:
        for cb in self.trainer.callbacks:  # settings that contradict the data, before any of it is made or read
            if isinstance(cb, ContinualMetrics):
                cb.check_data(self.datamodule)
        self._read_data("fit")

    def before_validate(self) -> None:
        self._read_data("validate")

    def before_test(self) -> None:
        self._read_data("test")

    def _read_data(self, stage: str) -> None:
        """Prepares and reads the data before Lightning starts its logger, so a missing or bad file stops the
        run before anything is written. Done by a single process, or by the one that starts the DDP ranks;
        ranks started by SLURM or torchrun read it in Lightning's own setup. Datamodules keep what they read,
        so Lightning's later `setup` costs nothing."""
        if "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
            return
        self.datamodule.prepare_data()
        self.datamodule.setup(stage)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        for cb in getattr(self.trainer, "callbacks", []):
            if isinstance(cb, ContinualCheckpoint):
                cb.settings = self._settings

    def _instantiate_trainer(self, config: dict[str, Any], extra_callbacks: list) -> Any:
        config = dict(config)
        if config.get("enable_checkpointing") is False:
            extra_callbacks = [c for c in extra_callbacks if not isinstance(c, ContinualCheckpoint)]
        given = list(config.get("callbacks") or []) + list(extra_callbacks)
        # None (not given) means on, as in Lightning
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            config["callbacks"] = list(config.get("callbacks") or []) + [RichProgressBar()]
        strategy = config.get("strategy")
        model = getattr(self, "model", None)
        if isinstance(strategy, str) and strategy.startswith("deepspeed") and isinstance(model, ContinualModule):
            line = deepspeed_refusal(model, strategy)  # before the trainer: DeepSpeed's own checks need CUDA
            if line:
                raise ConfigError(line)
        try:
            return super()._instantiate_trainer(config, extra_callbacks)
        except (MisconfigurationException, ValueError, TypeError) as err:  # Lightning checks the trainer's settings
            reason = " ".join(str(err).split())
            if isinstance(strategy, str) and strategy.startswith(GPU_STRATEGIES):
                raise ConfigError(
                    f"trainer.strategy {strategy}: {reason} It runs on CUDA GPUs only; here use "
                    f"{', '.join(PORTABLE_STRATEGIES)} (with trainer.devices > 1 for several processes)"
                ) from None
            raise ConfigError(f"trainer: {reason} (fix the trainer settings)") from None


#: what a run writes into its log folder before it has produced anything
_STARTUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.")


def _log_folders(trainer: Any) -> list[Path]:
    """The run's log folder and its parents, innermost first."""
    if trainer is None or trainer.logger is None or trainer.log_dir is None:
        return []
    folder = Path(trainer.log_dir).resolve()
    return [folder, *folder.parents]


def _remove_if_unused(created: list[Path]) -> None:
    """Removes folders this run created, innermost first, while they hold only what a start writes."""
    for folder in created:
        if not folder.is_dir():
            continue
        entries = list(folder.iterdir())
        if any(e.is_dir() or not e.name.startswith(_STARTUP_FILES) for e in entries):
            return
        for entry in entries:
            entry.unlink()
        folder.rmdir()


def check_run_config(config: Any) -> None:
    """Settings that would otherwise fail late, be overridden silently, or write where nothing can be written."""
    trainer = config.get("trainer") or {}
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value not in (None, -1):
            raise ConfigError(
                f"trainer.{key}={value}: the task clock sets how long a run is; use task_switch.epochs_per_task, "
                "task_switch.steps_per_task or task_switch.stop_after_task"
            )
    if trainer.get("limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 trains nothing; leave it unset (or use a fraction above 0)")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be at least 1, got {accumulate}")
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed < 2**32:
        raise ConfigError(f"seed_everything={seed}: choose a seed from 0 to {2**32 - 1} (or true for a random one)")
    if trainer.get("default_root_dir"):
        check_output_folder(trainer["default_root_dir"], "trainer.default_root_dir")
    if (config.get("checkpoint") or {}).get("dirpath"):
        check_output_folder(config["checkpoint"]["dirpath"], "checkpoint.dirpath")


def check_config_files(args: list[str]) -> None:
    """Each `-c FILE` exists and is YAML with settings: otherwise one line with the file (and line) at fault."""
    import yaml

    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith(("-c=", "--config="))]
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"-c {path}: not found; pass an experiment YAML such as configs/classification/...")
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as err:
            mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            if context is not None and mark is not None and context.line != mark.line:
                problem += f", in what starts at line {context.line + 1}"
            raise ConfigError(f"-c {path}{where}: not valid YAML ({problem}); fix the file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"-c {path}: cannot be read ({err}); pass a YAML text file") from None
        if content is None:
            raise ConfigError(f"-c {path}: empty; write the experiment's settings there (key: value lines)")
        if not isinstance(content, dict):
            raise ConfigError(f"-c {path}: holds a {type(content).__name__}, not settings (key: value lines)")


def _read_checkpoint(path: str) -> dict:
    """A checkpoint loaded as plain data (no code runs), or ConfigError naming the file and what it is not."""
    checkpoint = load_torch_file(path, "--ckpt_path")
    needed = ("state_dict", "continual", "pytorch-lightning_version")
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in needed):
        raise ConfigError(f"--ckpt_path {path}: not a checkpoint written by lifelong fit (no {'/'.join(needed)})")
    return checkpoint


EXTRA_COMMANDS = {
    "demo": "cli.demo:main",
    "demo-removal": "cli.demo:removal",
    "sample": "cli.diffusion:sample",
    "export": "cli.diffusion:export",
    "make-reg": "cli.diffusion:make_reg",
    "make-demos": "cli.robot:make_demos",
    "rollout": "cli.robot:rollout",
    "pretrain-bases": "cli.bases:pretrain_bases",
    "check-data": "cli.removal:check_data",
    "remove": "cli.removal:remove",
    "score": "cli.removal:score",
}


_NOISE = (
    "Expected a <class 'NoneType'>",
    "Expected a path",
    "Expected a dot import path string",
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


def _type_name(text: str) -> str:
    """What a jsonargparse type reads as: "a <class 'int'>" -> "an int", "a typing.Literal['a', 'b']" ->
    "one of 'a', 'b'"; anything else unchanged."""
    literal = re.search(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    match = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    if not match:
        return text
    name = match.group(1)
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _one_line(err: BaseException) -> str:
    """The informative line of a jsonargparse error, which nests the reason several levels deep: the full
    key (`model.init_args.optimizer.init_args.lr`), what was expected and what was given."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    top = re.match(r'Parser key "([^"]+)"', lines[0])
    base = {"model": ContinualModule, "data": ContinualDataModule}.get(top.group(1) if top else "")
    choices = f"; choose one of: {', '.join(_subclass_names(base))}" if base else ""
    prefix = f"{top.group(1)}: " if top else ""
    nested = "Problem with given class_path" in str(err)
    for i, line in enumerate(lines):
        unknown = re.search(r"Expected a dot import path string: (\S+)", line)
        if unknown and not nested:
            return f"{prefix}unknown class_path {unknown.group(1)!r}{choices}"
        bad = re.match(r"- Problem with given class_path '([^']+)':", line)
        if bad:
            reason = lines[i + 1] if i + 1 < len(lines) else ""
            if "has no attribute" in reason or "No module named" in reason:
                return f"{prefix}unknown class_path {bad.group(1)!r}{choices}"
            break
    # The key path: the top key, then each nested key (arguments of a class sit under init_args).
    path = [top.group(1)] if top else []
    for line in lines[1:]:
        if "Problem with given class_path" in line and path:
            path.append("init_args")
        if "callable class" in line:  # a class given by class_path/init_args, e.g. the optimizer
            path.append("init_args")
        path.extend(re.findall(r'Parser key "([^"]+)"', line))
    while path and path[-1] == "init_args":
        path.pop()
    where = ".".join(path)
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
    given = None if given is None else given.split(". Got value:")[0]
    for line in lines[1:]:
        text = line.lstrip("- ").strip()
        called = re.search(r"expects a function or a callable class: (.+?)(?:\. Got value: (.+))?$", text)
        if called and not called.group(1).startswith("Parser key"):
            reason = called.group(1)
            if "has no attribute" in reason or "No module named" in reason:
                reason = f"unknown class {called.group(2)!r}"
            return f"{where}: {reason}"
        typed = re.match(r"Expected (a <class '[^']+'>|.+?)\. Got value: (.+)$", text)
        if typed:
            return f"{where}: expected {_type_name(typed.group(1))}, got {typed.group(2)!r}"
        if re.match(r"Option '([^']+)' is not accepted", text):
            return f"{where}: {text}" if where else text
    expected = [re.match(r"Expected (a <class '[^']+'>|a typing\.Literal\[.*\])$", ln.lstrip("- ")) for ln in lines]
    expected = [m.group(1) for m in expected if m and "NoneType" not in m.group(1)]
    if expected and given is not None:
        return f"{where}: expected {' or '.join(_type_name(e) for e in expected)}, got {given!r}"
    for line in lines[1:]:
        text = line.lstrip("- ").strip()
        if line.startswith("-") and not text.startswith(_NOISE):
            return text if top and text.startswith(top.group(1)) else prefix + text
    return lines[0]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: dispatches extra subcommands, else runs LightningCLI; bad input -> one line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[args[0]].split(":")
        getattr(__import__(module, fromlist=[func]), func)(args[1:])
        return
    try:
        check_config_files(args)
        LifelongCLI(args=argv)
    except StopRequested as stop:
        if _is_rank_zero():
            print(f"lifelong: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        if _is_rank_zero():
            print(f"lifelong: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns a user's mistake raised inside the block (a ConfigError, or jsonargparse's nested parse error) into
    a ConfigError holding its one line; anything else passes unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        raise ConfigError(message) from None


def build_cli(args: list[str]) -> LifelongCLI:
    """The model, data and trainer that `lifelong fit <args>` would build, without running anything (for the
    subcommands that sample, export or generate); bad input raises ConfigError with one line."""
    with one_line_errors():
        check_config_files(args)
        return LifelongCLI(args=args, run=False)


def config_parser(prog: str, description: str):
    """The parser of a subcommand driven by the experiment's YAML: `-c CONFIG` (repeatable) and `--set` overrides;
    the subcommand adds its own options."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("-c", "--config", action="append", required=True, help="the experiment's YAML (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="extra CLI overrides, e.g. --set=--data.root=x")
    return parser


def build_model(configs: list[str], extra: list[str], family: type, what: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, datamodule, settings) as `lifelong fit -c ...` would build them, on CPU, without training, for
    the subcommands that load a checkpoint into a fresh model; the settings are what that checkpoint must
    agree with (`run_settings`). A model that is not a `family` is one line saying it is not `what`."""
    args = [a for c in configs for a in ("-c", c)]
    args += ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1", *extra]
    cli = build_cli(args)
    if not isinstance(cli.model, family):
        raise ConfigError(f"model: {type(cli.model).__name__} is not {what}")
    return cli.model, cli.datamodule, run_settings(cli.config)


def _is_rank_zero() -> bool:
    """Whether this process is the run's first (other ranks stay quiet, so a message is printed once)."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


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
