"""The object-removal subcommands:

    lifelong check-data META [META ...] [--need_score] [--inputs]
    lifelong remove -c CONFIG [--ckpt_path CKPT] (--meta META | --source IMG --mask IMG ...) --out DIR
    lifelong score  -c CONFIG [--ckpt_path CKPT] (--meta META | --source IMG --mask IMG --edited IMG ...) --out FILE

`remove` writes a RORem folder (source/, mask/, GT/ = the removals, meta.json) that people can label and a
discriminator can train on; `score` writes D_phi's scores and success rates as JSON.

`check-data` lists every problem of RORem meta.json files (a file, the folder holding it, or a `.tar` shard
pattern), one line each on stdout naming the file and entry: a missing key or file, an image PIL cannot
decode, a score that is not a number. With problems it ends with one line `lifelong: error: N problem(s) in M
file(s)` on stderr and exit code 2; else it prints `ok: K entries in M file(s)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from cli.diffusion import _save_png
from cli.errors import ConfigError, fail, parse_args
from cli.files import atomic_write_text, check_output_file, check_output_folder


def check_data(argv: list[str]) -> None:
    """`lifelong check-data`: every problem of every meta.json given, then exit 2 if there was any."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lifelong check-data",
        description="List every problem of RORem meta.json files (or .tar shard patterns) at once.",
        exit_on_error=False,
    )
    parser.add_argument("meta", nargs="*", help="meta.json files, folders holding one, or .tar shard patterns")
    parser.add_argument("--need_score", action="store_true", help="every entry must carry a score (discriminator data)")
    parser.add_argument("--inputs", action="store_true", help="entries may lack GT (new inputs for the data engine)")
    try:
        cfg = parse_args(parser, argv)
    except ConfigError as err:
        fail(str(err))
    if not cfg.meta:
        fail("check-data: no file given; pass one or more meta.json files: lifelong check-data data/meta.json")
    from datamodules.removal import check_source

    entries, problems, bad_files = 0, [], 0
    for value in cfg.meta:
        count, found = check_source(value, need_score=cfg.need_score, allow_missing_gt=cfg.inputs)
        entries += count
        problems += found
        bad_files += bool(found)
        for line in found:
            print(line, flush=True)
    if problems:
        fail(f"{len(problems)} problem(s) in {bad_files} file(s); first: {problems[0]}")
    print(f"ok: {entries} entries in {len(cfg.meta)} file(s)")


# -- remove and score ------------------------------------------------------------------------------------


def _read_inputs(cfg, resolution: int, edited: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, item) per input, pre-processed as the data are (resized to the data's resolution, the mask soft):
    from `--meta` (a RORem meta.json; for `score` its GT is the removal judged) or the repeated `--source` /
    `--mask` (/ `--edited`) files."""
    from datamodules.removal import EncodedTriplets, Triplet, image_problem, read_meta

    files = {"--source": cfg.source, "--mask": cfg.mask, **({"--edited": cfg.edited} if edited else {})}
    if cfg.meta is not None:
        if any(files.values()):
            raise ConfigError(f"--meta and {' / '.join(files)}: pass one or the other")
        triplets = read_meta(cfg.meta, allow_missing_gt=not edited, option="--meta")
    else:
        if not cfg.source or len({len(v) for v in files.values()}) != 1:
            raise ConfigError(f"{', '.join(files)}: give each once per image, as many times each (or --meta META)")
        for option, paths in files.items():
            for path in paths:
                problem = image_problem(Path(path))
                if problem is not None:
                    raise ConfigError(f"{option} {path}: {problem}")
        targets = cfg.edited if edited else [None] * len(cfg.source)
        triplets = [
            Triplet(Path(s), Path(m), None if t is None else Path(t), None)
            for s, m, t in zip(cfg.source, cfg.mask, targets, strict=True)
        ]
    data = EncodedTriplets(triplets, resolution)
    return [(f"{i:04d}_{t.source.stem}", data[i]) for i, t in enumerate(triplets)]


def _batches(items: list[tuple[str, dict[str, Any]]], size: int):
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for _, it in chunk]) for k in chunk[0][1]}
        yield [name for name, _ in chunk], batch


def _parser(prog: str, description: str, edited: bool):
    """The YAML-driven subcommand parser (-c, --set) with the removal inputs and outputs."""
    from jsonargparse.typing import PositiveInt

    from cli.main import config_parser

    parser = config_parser(prog, description)
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="a fit checkpoint (last.ckpt)")
    parser.add_argument("--meta", type=str | None, default=None, help="a RORem meta.json of the inputs")
    parser.add_argument("--source", action="append", default=[], help="an image with the object (repeatable)")
    parser.add_argument("--mask", action="append", default=[], help="its mask, white = remove (repeatable)")
    if edited:
        parser.add_argument("--edited", action="append", default=[], help="the removal to judge (repeatable)")
    parser.add_argument("--out", type=str, required=True)
    parser.add_argument("--batch_size", type=PositiveInt, default=8)
    parser.add_argument("--seed", type=int, default=0, help="image i is seeded with seed + i")
    return parser


def _model(cfg, family: tuple[type, ...], what: str):
    from cli.diffusion import build, load_weights

    model, datamodule, settings = build(cfg.config, cfg.set, family, what)
    if cfg.ckpt_path is not None:
        load_weights(model, cfg.ckpt_path, None, settings)
    return model.eval(), datamodule


#: `lifelong remove --sampler auto` takes the LCM student for this many steps or fewer
FAST_STEPS = 8


def _sampler(model, choice: str, steps: int | None) -> dict[str, str]:
    """The `sampler` argument of the model's `remove` ({} for a plain RORem, which has one sampler)."""
    has_fast = "lcm" in getattr(model, "adapters", ())
    if choice == "fast" and not has_fast:
        raise ConfigError(
            f"--sampler fast: {type(model).__name__} has no LCM student; use a LCMDistill or RemovalStages config "
            "with an lcm stage, or --sampler full"
        )
    if not hasattr(model, "adapters"):
        return {}
    if choice == "auto":
        choice = "fast" if has_fast and steps is not None and steps <= FAST_STEPS else "full"
    return {"sampler": choice}


def remove(argv: list[str]) -> None:
    """`lifelong remove`: RORem's removal of the masked objects, written as a RORem folder (source/, mask/, GT/
    = the removals, meta.json) that can be labelled and used as discriminator data; with a ground truth (a
    --meta with GT) each entry's `score` is the ground-truth judgement, and scores.json has D_phi's scores
    (with model.discriminator) and the PSNR inside the mask."""
    from jsonargparse.typing import PositiveInt

    from datamodules.removal import human_label, psnr_inside

    parser = _parser("lifelong remove", "Remove the masked objects with a trained RORem.", edited=False)
    parser.add_argument("--steps", type=PositiveInt | None, default=None, help="sampling steps (RORem: 50)")
    parser.add_argument("--strength", type=float | None, default=None, help="RORem: 0.99")
    parser.add_argument("--mask_dilation", type=int | None, default=None, help="grow the mask by a square this wide")
    parser.add_argument(
        "--sampler",
        type=Literal["auto", "full", "fast"],
        default="auto",
        help="full: RORem's pipeline; fast: the LCM student (a model with an lcm adapter); auto: fast when the model "
        f"has one and --steps is at most {FAST_STEPS}",
    )
    try:
        cfg = parse_args(parser, argv)
        out = check_output_folder(cfg.out, "--out")
        from lightning_modules.removal import RORem

        model, datamodule = _model(cfg, RORem, "an object remover (RORem)")
        if cfg.mask_dilation is not None:
            if cfg.mask_dilation < 0:
                raise ConfigError(f"--mask_dilation must be 0 or more, got {cfg.mask_dilation}")
            model.mask_dilation = cfg.mask_dilation
        if cfg.strength is not None and not 0 < cfg.strength <= 1:
            raise ConfigError(f"--strength must be in (0, 1], got {cfg.strength}")
        sampler = _sampler(model, cfg.sampler, cfg.steps)
        items = _read_inputs(cfg, datamodule.stream.resolution, edited=False)
        entries, scores = [], {}
        for k, (names, batch) in enumerate(_batches(items, cfg.batch_size)):
            seeds = [cfg.seed + k * cfg.batch_size + i for i in range(len(names))]
            result = model.remove(batch["source"], batch["mask"], seeds, cfg.steps, cfg.strength, **sampler)
            d = model.score(batch["source"], batch["mask"], result, seeds) if model.scorer is not None else None
            for i, name in enumerate(names):
                for sub, image in (("source", batch["source"][i]), ("mask", batch["mask"][i]), ("GT", result[i])):
                    _save_png(
                        ((image + 1) / 2) if sub != "mask" else image.expand(3, -1, -1),
                        out / sub / f"{name}.png",
                        "--out",
                    )
                entry = {k2: f"{k2}/{name}.png" for k2 in ("source", "mask", "GT")}
                score: dict[str, Any] = {}
                if bool(batch["has_target"][i]):
                    one = (result[i : i + 1], batch["target"][i : i + 1], batch["mask"][i : i + 1])
                    entry["score"] = float(human_label(*one, model.human_threshold_db)[0])
                    score["psnr_inside"] = float(psnr_inside(*one)[0])
                if d is not None:
                    score["d_score"] = float(d[i])
                entries.append(entry)
                scores[name] = score
        atomic_write_text(out / "meta.json", json.dumps(entries, indent=1), "--out")
        if any(scores.values()):
            atomic_write_text(out / "scores.json", json.dumps(scores, indent=1), "--out")
    except ConfigError as err:
        fail(str(err))
    print(f"wrote {len(entries)} removals and meta.json to {out}")


def score(argv: list[str]) -> None:
    """`lifelong score`: D_phi's score of each removal (`--edited`, or a --meta's GT), with a trained
    `RemovalDiscriminator` (its config and last.ckpt) or a RORem whose config names a discriminator; writes a
    JSON of the scores, the success rates at 0.5 and 0.9 and, where the entries carry labels, the agreement."""
    parser = _parser("lifelong score", "Score removals with RORem's discriminator.", edited=True)
    try:
        cfg = parse_args(parser, argv)
        out = check_output_file(cfg.out, "--out")
        from lightning_modules.removal import RemovalDiscriminator, RORem

        model, datamodule = _model(cfg, (RemovalDiscriminator, RORem), "a discriminator or a RORem with one")
        if isinstance(model, RORem) and model.scorer is None:
            raise ConfigError("model.discriminator is not set: scoring with a RORem config needs one")
        items = _read_inputs(cfg, datamodule.stream.resolution, edited=True)
        names, values, labels = [], [], []
        with torch.no_grad():
            for k, (chunk, batch) in enumerate(_batches(items, cfg.batch_size)):
                seeds = [cfg.seed + k * cfg.batch_size + i for i in range(len(chunk))]
                if isinstance(model, RORem):
                    s = model.score(batch["source"], batch["mask"], batch["target"], seeds)
                else:
                    s = model.scores(batch, [torch.Generator().manual_seed(x) for x in seeds])
                names += chunk
                values += s.tolist()
                labels += batch["score"].tolist()
        scores = torch.tensor(values)
        report: dict[str, Any] = {
            "scores": dict(zip(names, values, strict=True)),
            "success_0.5": float((scores >= 0.5).float().mean()),
            "success_0.9": float((scores >= 0.9).float().mean()),
            "mean_score": float(scores.mean()),
        }
        known = [(v, y) for v, y in zip(values, labels, strict=True) if y == y]  # labels that are not NaN
        if known:
            report["agreement_0.5"] = sum((v >= 0.5) == (y >= 0.5) for v, y in known) / len(known)
            report["labelled"] = len(known)
        atomic_write_text(out, json.dumps(report, indent=1), "--out")
    except ConfigError as err:
        fail(str(err))
    print(f"scored {len(values)} removals: success {report['success_0.5']:.3f} at 0.5; wrote {out}")
