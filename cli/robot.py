"""The robot subcommand: demonstrations from Meta-World's scripted experts, one LIBERO-like HDF5 per task.

    lifelong make-demos --suite cw10 --demos 50 --out DIR [--noise 0.1] [--horizon 150] [--image_size 0]
    lifelong make-demos --tasks reach-v3 --tasks push-v3 --out DIR

Files are `DIR/<env name>.hdf5` (the layout `datamodules.robot.demos` describes); a task whose file is
already complete for these settings is skipped, so an interrupted run resumes where it stopped. A file in DIR
is never replaced unless `--replace_stale true` is given and it is one this command made with other settings
or fewer demos; an unreadable file, or one made elsewhere, is reported and left as it is. Training
runs make the same files on first use (`RobotDataModule.prepare_data`), so this command is only needed to
make them ahead of time or elsewhere.
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
