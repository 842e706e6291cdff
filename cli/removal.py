"""The object-removal subcommands:

    lifelong check-data META [META ...] [--need_score] [--inputs]

`check-data` lists every problem of RORem meta.json files (a file, the folder holding it, or a `.tar` shard
pattern), one line each on stdout naming the file and entry: a missing key or file, an image PIL cannot
decode, a score that is not a number. With problems it ends with one line `lifelong: error: N problem(s) in M
file(s)` on stderr and exit code 2; else it prints `ok: K entries in M file(s)`.
"""

from __future__ import annotations

from cli.errors import ConfigError, fail, parse_args


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
