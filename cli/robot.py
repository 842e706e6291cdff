"""The robot subcommands: demonstrations from Meta-World's scripted experts, one LIBERO-like HDF5 per task,
and one episode of a trained policy as a GIF or a state-trajectory figure.

    lifelong make-demos --suite cw10 --demos 50 --out DIR [--noise 0.1] [--horizon 150] [--image_size 0]
    lifelong make-demos --tasks reach-v3 --tasks push-v3 --out DIR
    lifelong rollout -c CONFIG --ckpt_path CKPT --task faucet-close-v3 [--episode 0] --out episode.gif|.png

Files are `DIR/<env name>.hdf5` (the layout `datamodules.robot.demos` describes); a task whose file is
already complete for these settings is skipped, so an interrupted run resumes where it stopped. A file in DIR
is never replaced unless `--replace_stale true` is given and it is one this command made with other settings
or fewer demos; an unreadable file, or one made elsewhere, is reported and left as it is. Training
runs make the same files on first use (`RobotDataModule.prepare_data`), so this command is only needed to
make them ahead of time or elsewhere.

`rollout` plays episode `--episode` (an initial state of the evaluation set) of `--task` with the checkpoint's
policy as `lifelong fit` evaluates it, and writes its camera frames as a GIF where MuJoCo renders offscreen
(`MUJOCO_GL=egl|osmesa`), or its low-dimensional states over the episode as a PNG figure.
"""

from __future__ import annotations

from cli.errors import ConfigError, fail, parse_args


def _parser():
    from jsonargparse import ArgumentParser

    from datamodules.robot.demos import DemoSettings
    from datamodules.robot.suites import SUITE_NAMES

    d = DemoSettings()
    parser = ArgumentParser(
        prog="lifelong make-demos",
        description="Record successful scripted-expert episodes of Meta-World tasks as HDF5 demonstration files.",
        exit_on_error=False,
    )
    parser.add_argument("--suite", type=str | None, default=None, help=f"one of {', '.join(SUITE_NAMES[:3])}")
    parser.add_argument(
        "--tasks",
        action="append",
        default=None,
        help="a Meta-World env name instead of a suite (repeat for several, or give a list: '[reach-v3, push-v3]')",
    )
    parser.add_argument("--out", type=str, required=True, help="folder the files go to")
    parser.add_argument("--demos", type=int, default=d.demos, help="successful episodes kept per task")
    parser.add_argument("--horizon", type=int, default=d.horizon, help="most steps per episode")
    parser.add_argument("--noise", type=float, default=d.noise, help="std of Gaussian noise on executed actions")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the initial states and the noise")
    parser.add_argument("--extra_steps", type=int, default=d.extra_steps, help="steps recorded after success")
    parser.add_argument("--image_size", type=int, default=d.image_size, help="corner camera size (0: no images)")
    parser.add_argument("--max_attempts", type=int, default=d.max_attempts, help="give up after this x demos episodes")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_argument(
        "--replace_stale",
        type=bool,
        default=False,
        help="make again the files in --out that this command made with other settings or fewer demos "
        "(default: refuse and name them); other files are never replaced",
    )
    return parser


def _task_names(given: list[str] | None) -> list[str] | None:
    """`--tasks a --tasks b` or `--tasks '[a, b]'` (or both) as one list of env names."""
    if given is None:
        return None
    import yaml

    names: list[str] = []
    for item in given:
        value = yaml.safe_load(item) if item.strip().startswith("[") else item
        names += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return names


def make_demos(argv: list[str]) -> None:
    """`lifelong make-demos`: writes the missing demo files of a suite; one line and exit 2 on bad input."""
    from datamodules.robot.demos import DemoSettings, make_suite_demos
    from datamodules.robot.suites import resolve_suite

    try:
        cfg = parse_args(_parser(), argv)
        suite = resolve_suite(cfg.suite, _task_names(cfg.tasks), options=("--suite", "--tasks"))
        settings = DemoSettings(
            demos=cfg.demos,
            horizon=cfg.horizon,
            noise=cfg.noise,
            seed=cfg.seed,
            extra_steps=cfg.extra_steps,
            image_size=cfg.image_size,
            max_attempts=cfg.max_attempts,
        )
        make_suite_demos(suite, cfg.out, settings, progress=cfg.progress, replace_stale=cfg.replace_stale)
    except ConfigError as err:
        fail(str(err))


def _task_index(names: list[str], task: str) -> int:
    if task in names:
        return names.index(task)
    if task.isdigit() and int(task) < len(names):
        return int(task)
    raise ConfigError(f"--task {task!r} is not one of {names} (or their index)")


def rollout(argv: list[str]) -> None:
    """`lifelong rollout`: one evaluation episode of a checkpoint's policy to a GIF or PNG; one line on bad input."""
    import numpy as np

    from cli.main import _read_checkpoint, build_model, config_parser
    from datamodules.robot.media import write_rollout
    from lightning_modules.robot.base import RobotImitationModule

    parser = config_parser("lifelong rollout", "Play one episode of a trained robot policy and save what it did.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="a fit checkpoint (last.ckpt)")
    parser.add_argument("--task", type=str, required=True, help="task name or index in the stream")
    parser.add_argument("--episode", type=int, default=0, help="initial state number (the evaluation's 0, 1, ...)")
    parser.add_argument("--out", type=str, required=True, help="a .gif (camera frames) or .png (state trajectory)")
    try:
        cfg = parse_args(parser, argv)
        if cfg.episode < 0:
            raise ConfigError(f"--episode must be 0 or more, got {cfg.episode}")
        model, _, settings = build_model(cfg.config, cfg.set, RobotImitationModule, "a robot method")
        checkpoint = _read_checkpoint(cfg.ckpt_path)
        saved = ((checkpoint.get("lifelong") or {}).get("settings") or {}).get("model.class_path")
        if saved is not None and saved != settings.get("model.class_path"):
            raise ConfigError(
                f"--ckpt_path {cfg.ckpt_path} was trained with model {saved}, the config gives "
                f"{settings.get('model.class_path')}; use the config it was trained with"
            )
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        model.eval()
        names = list(model.stream.task_names)
        task = _task_index(names, cfg.task)
        try:
            result = model.play(task, [cfg.episode], record=1)
        finally:
            model.close_runner()
        solved = bool(result.success[0])
        frames = result.frames[0] if result.frames else None
        outcome = f"{'solved' if solved else 'not solved'} in {int(result.steps[0])} steps"
        title = f"{names[task]} episode {cfg.episode}: {outcome}"
        path = write_rollout(cfg.out, frames, np.asarray(result.trajectories[0]), solved, title)
    except ConfigError as err:
        fail(str(err))
    print(f"{title}; wrote {path}")
