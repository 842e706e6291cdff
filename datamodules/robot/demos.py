"""Demonstrations from Meta-World's scripted experts, written as LIBERO-like HDF5 files (one per task) that
`DemoWindows` reads like any robomimic / LIBERO file.

Episode e of a task starts from `make_env(spec, task, seed).reset(e)` (e = 0, 1, 2, ...; Meta-World draws
its 50 initial configurations from `seed`). The expert acts until the task is solved, then up to
`extra_steps` more steps while it stays solved (so the policy also sees how to stay at the goal; some
experts move on and undo the success a few steps later, which is cut off), all within `horizon`; an
episode is kept when it was solved, and always ends at a solved step, as the evaluation counts success
at any step. Episodes are tried until `demos` are kept (at most `max_attempts` x `demos` episodes).
With `noise` > 0, Gaussian noise of that std is added to the executed action (seeded per episode,
clipped to [-1, 1]) while `actions` stores the expert's clean action: the noise only widens the states
the demos visit, the labels stay the expert's (as in DART).

File `<out>/<env name>.hdf5`; `data` attributes `env_name`, `problem_info` (JSON with the language
instruction), `env_args` (JSON with the suite and the generation settings), `generator` (the settings
again, flat, to tell whether a file can be reused), `num_demos`, `total`, `macros_image_convention`
("opencv": camera rows run top to bottom, as MuJoCo frames come out of gymnasium's renderer);
`data/demo_i` attributes `num_samples`, `episode`, `init_state`, datasets `obs/<key>`, `actions`,
`states` (qpos and qvel), `rewards` and `dones` (uint8, 1 at the last step only, as LIBERO stores them).
Files are written to a temporary name and renamed when complete, so a file that exists is whole. A file
that is not a readable demonstration file, or one made elsewhere, is never replaced; nor is a stale one (ours,
made with other settings or fewer demos) unless the caller says so: the datamodule's own cache, or
`make-demos --replace_stale true`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cli.errors import ConfigError
from cli.files import check_output_file, folder_lock, temporary_name
from datamodules.robot.suites import CAMERA_KEYS, LOWDIM_KEYS, Suite


@dataclass(frozen=True)
class DemoSettings:
    """How demonstrations are made. Files made with the same settings (whatever their `demos`) are
    interchangeable: episodes are deterministic, so the first n demos of a larger file are the n demos."""

    demos: int = 50
    horizon: int = 150  # the Meta-World default of RobotDataModule: its cache is what make-demos writes
    noise: float = 0.0
    seed: int = 0
    extra_steps: int = 5
    image_size: int = 0
    max_attempts: int = 4

    def __post_init__(self):
        if self.demos < 1:
            raise ConfigError(f"--demos={self.demos}: must be at least 1")
        if self.horizon < 1:
            raise ConfigError(f"--horizon={self.horizon}: must be at least 1")
        if self.noise < 0:
            raise ConfigError(f"--noise={self.noise}: must be >= 0 (std of the action noise)")
        for option, value, least in (("extra_steps", self.extra_steps, 0), ("image_size", self.image_size, 0)):
            if value < least:
                raise ConfigError(f"--{option}={value}: must be >= {least}")
        if self.max_attempts < 1:
            raise ConfigError(f"--max_attempts={self.max_attempts}: must be at least 1 (episodes tried per demo)")

    def recipe(self) -> dict:
        """Everything that decides the episodes' content (not how many are kept)."""
        out = asdict(self)
        del out["demos"], out["max_attempts"]
        return out

    def folder_name(self) -> str:
        """A cache folder name that tells recipes apart: files of one recipe are shared by every suite."""
        r = self.recipe()
        return f"seed{r['seed']}_h{r['horizon']}_noise{r['noise']:g}_extra{r['extra_steps']}_img{r['image_size']}"


@dataclass
class TaskDemoReport:
    """What making one task's file did: `skipped` when a complete file was already there."""

    env_name: str
    path: Path
    demos: int = 0
    attempts: int = 0
    lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False

    @property
    def success_rate(self) -> float:
        return self.demos / self.attempts if self.attempts else float("nan")

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths)) if self.lengths else float("nan")


def env_spec(suite: Suite, settings: DemoSettings):
    """The EnvSpec the demonstrations of a Meta-World suite are recorded with."""
    from datamodules.robot.stream import EnvSpec

    if suite.kind != "metaworld":
        raise ConfigError(
            f"suite {suite.name}: LIBERO demonstrations are human recordings, not generated; download them "
            "(LIBERO's datasets) into data.root"
        )
    keys = LOWDIM_KEYS["metaworld"] + (CAMERA_KEYS["metaworld"] if settings.image_size > 0 else ())
    return EnvSpec(
        suite="metaworld",
        env_names=suite.env_names,
        horizon=settings.horizon,
        obs_keys=keys,
        image_size=settings.image_size,
    )


def _made_with(path: str | os.PathLike) -> dict | None:
    """The `env_name`, `recipe` and `num_demos` our generator stored in the file; None for a demo file made
    elsewhere (no `generator` attribute). A file that is not a readable demonstration file is a ConfigError
    naming it: it may be the user's, so nothing here ever replaces it."""
    import h5py

    def unreadable(why: str) -> ConfigError:
        return ConfigError(
            f"{path}: not a readable demonstration file ({why}); it is left as it is: move or delete it, or "
            "choose another folder"
        )

    try:
        f = h5py.File(path, "r")
    except OSError:
        raise unreadable("not HDF5, or truncated") from None
    with f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise unreadable("no `data` group")
        if "generator" not in data.attrs:
            return None
        try:
            return {
                "env_name": str(data.attrs["env_name"]),
                "recipe": json.loads(data.attrs["generator"]),
                "num_demos": int(data.attrs["num_demos"]),
            }
        except (KeyError, TypeError, ValueError):
            raise unreadable(
                "its `data` attributes env_name, generator and num_demos are missing or malformed"
            ) from None


def file_status(path: str | os.PathLike, env_name: str, settings: DemoSettings) -> str:
    """One of "missing"; "complete" (at least `settings.demos` demos of `env_name` made with the same recipe);
    "stale" (made by our generator with another recipe or fewer demos); "foreign" (a demo file made elsewhere,
    without our `generator` attribute: used as it is, never replaced). An unreadable file is a ConfigError."""
    if not os.path.isfile(path):
        return "missing"
    made = _made_with(path)
    if made is None:
        return "foreign"
    complete = (
        made["env_name"] == env_name and made["recipe"] == settings.recipe() and made["num_demos"] >= settings.demos
    )
    return "complete" if complete else "stale"


def stale_reason(path: str | os.PathLike, env_name: str, settings: DemoSettings) -> str:
    """Which setting a stale file was made with differs from `settings`, e.g. "made with horizon=200, not 120"."""
    made = _made_with(path) or {}
    if made.get("env_name") != env_name:
        return f"holds demonstrations of {made.get('env_name')}, not {env_name}"
    recipe = settings.recipe()
    for key, value in recipe.items():
        if made["recipe"].get(key) != value:
            return f"made with {key}={made['recipe'].get(key)}, not {value}"
    if made["recipe"] != recipe:
        return f"made with settings {sorted(set(made['recipe']) - set(recipe))} this version does not know"
    return f"holds num_demos={made['num_demos']}, {settings.demos} asked"


def _record_episode(env, episode: int, settings: DemoSettings) -> dict | None:
    """Plays episode `episode` with the expert: its arrays up to the last step of its first success streak
    (at most `extra_steps` past the first success), or None when it never succeeds within the horizon."""
    rng = np.random.default_rng([settings.seed, episode, 1])  # its own stream, apart from the reset's
    obs = env.reset(episode)
    steps: dict[str, list] = {"obs": [], "actions": [], "states": []}
    solved_at = last_solved = None
    for t in range(settings.horizon):
        steps["obs"].append(obs)
        steps["states"].append(env.sim_state())
        action = env.expert_action()
        executed = action
        if settings.noise > 0:
            executed = np.clip(action + rng.normal(0.0, settings.noise, action.shape), -1.0, 1.0).astype(np.float32)
        steps["actions"].append(action)
        obs, success = env.step(executed)
        if success:
            solved_at = t if solved_at is None else solved_at
            last_solved = t
        if solved_at is not None and (not success or t >= solved_at + settings.extra_steps):
            break
    if last_solved is None:
        return None
    return {k: v[: last_solved + 1] for k, v in steps.items()}


def _write_demo(group, steps: dict, episode: int) -> int:
    n = len(steps["actions"])
    obs = group.create_group("obs")
    for key in steps["obs"][0]:
        obs.create_dataset(key, data=np.stack([o[key] for o in steps["obs"]]))
    group.create_dataset("actions", data=np.stack(steps["actions"]).astype(np.float32))
    states = np.stack(steps["states"])
    group.create_dataset("states", data=states)
    done = np.zeros(n, dtype=np.uint8)
    done[-1] = 1
    group.create_dataset("rewards", data=done)
    group.create_dataset("dones", data=done)
    group.attrs["num_samples"] = n
    group.attrs["episode"] = episode
    group.attrs["init_state"] = states[0]
    return n


def check_demo_file(
    path: Path, env_name: str, settings: DemoSettings, replace_stale: bool = False, option: str = "--out"
) -> str:
    """`file_status` of a file about to be made, refusing (ConfigError) whatever must not be replaced: an
    unreadable file, one made elsewhere, a stale one without `replace_stale`, something that is not a file."""
    check_output_file(path, option)
    status = file_status(path, env_name, settings)
    if status == "foreign":
        raise ConfigError(
            f"{path}: a demonstration file not made by make-demos; it is left as it is: move it or choose another "
            f"folder ({option})"
        )
    if status == "stale" and not replace_stale:
        raise ConfigError(
            f"{path}: {stale_reason(path, env_name, settings)}; it is left as it is: delete it, choose another folder "
            f"({option}), or pass --replace_stale true to make-demos to make it again"
        )
    return status


def make_task_demos(
    suite: Suite,
    task_id: int,
    out: str | os.PathLike,
    settings: DemoSettings,
    on_episode: Callable[[int, int], None] | None = None,
    replace_stale: bool = False,
    option: str = "--out",
) -> TaskDemoReport:
    """Writes `<out>/<env name>.hdf5` for task `task_id` unless a complete one is there.
    `on_episode(kept, tried)` is called after every episode (progress display). A stale file (ours, made with
    other settings) is replaced only with `replace_stale`; `option` names the folder in errors. Processes making
    the same folder's files take turns (`folder_lock`), so each file is made once."""
    name = suite.env_names[task_id]
    path = Path(out) / f"{name}.hdf5"
    report = TaskDemoReport(name, path)
    if check_demo_file(path, name, settings, replace_stale, option) == "complete":
        report.skipped = True
        return report
    new_folder = not path.parent.exists()  # removed again if nothing is written into it
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path.parent):  # runs started together (a table's jobs, several nodes) make each file once
        if check_demo_file(path, name, settings, replace_stale, option) == "complete":
            report.skipped = True  # another process made it while this one waited
            return report
        _make_file(suite, task_id, path, settings, report, new_folder, on_episode)
    return report


def _make_file(
    suite: Suite,
    task_id: int,
    path: Path,
    settings: DemoSettings,
    report: TaskDemoReport,
    new_folder: bool,
    on_episode: Callable[[int, int], None] | None,
) -> None:
    """Records the demonstrations of `make_task_demos` into a temporary file, then renames it to `path`."""
    import h5py

    from datamodules.robot.envs import make_env

    spec = env_spec(suite, settings)
    name = suite.env_names[task_id]
    tmp = temporary_name(path)
    start = time.perf_counter()
    env = make_env(spec, task_id, settings.seed)
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            limit = settings.max_attempts * settings.demos
            while report.demos < settings.demos:
                if report.attempts >= limit:
                    raise ConfigError(
                        f"{name}: the scripted expert solved {report.demos} of {report.attempts} episodes "
                        f"(horizon {settings.horizon}, noise {settings.noise:g}), {settings.demos} needed: raise "
                        "the horizon, lower the noise or drop the task"
                    )
                steps = _record_episode(env, report.attempts, settings)
                if steps is not None:
                    n = _write_demo(data.create_group(f"demo_{report.demos}"), steps, report.attempts)
                    report.lengths.append(n)
                    report.demos += 1
                report.attempts += 1
                if on_episode is not None:
                    on_episode(report.demos, report.attempts)
            recipe = settings.recipe()
            data.attrs["env_name"] = name
            data.attrs["problem_info"] = json.dumps(
                {"problem_name": name, "domain_name": "metaworld", "language_instruction": suite.instructions[task_id]}
            )
            data.attrs["env_args"] = json.dumps(
                {"type": "metaworld", "env_name": name, "suite": suite.name, "env_kwargs": recipe}
            )
            data.attrs["generator"] = json.dumps(recipe)
            data.attrs["num_demos"] = report.demos
            data.attrs["total"] = int(sum(report.lengths))
            data.attrs["macros_image_convention"] = "opencv"
        os.replace(tmp, path)
    finally:
        env.close()
        if tmp.exists():
            tmp.unlink()
        if new_folder and not any(path.parent.iterdir()):
            path.parent.rmdir()
    report.seconds = time.perf_counter() - start


def make_suite_demos(
    suite: Suite,
    out: str | os.PathLike,
    settings: DemoSettings,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    replace_stale: bool = False,
    option: str = "--out",
) -> list[TaskDemoReport]:
    """Makes the missing demo files of every task of `suite` under `out`, with a rich progress bar (stale ones
    too with `replace_stale`; see `make_task_demos`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    env_spec(suite, settings)  # a LIBERO suite fails here, before anything is written
    for name in suite.env_names:  # and a file that must not be replaced, before any episode runs
        check_demo_file(Path(out) / f"{name}.hdf5", name, settings, replace_stale, option)
    reports = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        for t, name in enumerate(suite.env_names):
            row = bar.add_task(name, total=settings.demos, note="")

            def advance(kept: int, tried: int, row=row) -> None:
                bar.update(row, completed=kept, note=f"{tried} episodes")

            report = make_task_demos(suite, t, out, settings, advance, replace_stale, option)
            if report.skipped:
                bar.update(row, completed=settings.demos, note="already there")
            reports.append(report)
    if log is not None:
        for r in reports:
            if r.skipped:
                log(f"{r.path}: complete, skipped")
            else:
                log(
                    f"{r.path}: {r.demos} demos from {r.attempts} episodes (expert success {r.success_rate:.0%}), "
                    f"mean length {r.mean_length:.1f}, {r.seconds:.1f} s"
                )
    return reports
