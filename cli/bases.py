"""`lifelong pretrain-bases`: builds the small pretrained bases (digit classifier, CLIP, text-to-image,
inpainting) from the embedded data into the cache folder, a progress bar per model.

    lifelong pretrain-bases [--cache DIR] [--models '[clip, text-to-image]'] [--seed 0]

Models already in the cache are kept; the preset `tiny-pretrained` (`pretrained_model_name_or_path`,
`clip_model`) builds what it needs on first use, so this command only builds ahead of time. The cache is
`--cache`, else `LIFELONG_CACHE`, else `~/.cache/lifelong` (`$XDG_CACHE_HOME/lifelong`).
"""

from __future__ import annotations

from cli.errors import ConfigError, fail, parse_args


def _parser():
    from jsonargparse import ArgumentParser

    from lightning_modules.nn.bases.cache import MODELS

    parser = ArgumentParser(
        prog="lifelong pretrain-bases",
        description="Train the small pretrained bases on the embedded data into the cache folder.",
        exit_on_error=False,
    )
    parser.add_argument("--cache", type=str | None, default=None, help="cache folder (default: LIFELONG_CACHE)")
    parser.add_argument("--models", type=list[str], default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data stream")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every training phase's steps (below 1: a quick, poor build in its own folder, for "
        "trying the command; the presets read only the full one)",
    )
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar per model")
    return parser


def pretrain_bases(argv: list[str]) -> None:
    """Builds the missing bases; one line and exit 2 on bad input (an unwritable cache, an unknown model)."""
    from lightning_modules.nn.bases.cache import build_bases

    try:
        cfg = parse_args(_parser(), argv)
        report = build_bases(cfg.models, root=cfg.cache, seed=cfg.seed, scale=cfg.scale, progress=cfg.progress)
    except ConfigError as err:
        fail(str(err))
    for row in report.values():
        if row["seconds"] is None:
            print(f"{row['path']}: already built")
