"""The one error type for bad user input, and how it reaches the user: one line on stderr, exit code 2."""

from __future__ import annotations

import re
import sys
from typing import Any


class ConfigError(ValueError):
    """A setting, file or checkpoint the user handed in cannot be used; the message says which and what to do."""


def fail(message: str) -> None:
    """Prints `lifelong: error: <message>` and exits 2 (the subcommands' way out on bad input)."""
    print(f"lifelong: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(parser: Any, argv: list[str]) -> Any:
    """`parser.parse_args(argv)` of a jsonargparse parser built with `exit_on_error=False`, with its error (a
    traceback, or several lines) as one ConfigError line naming the option."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or ["invalid arguments"]
        missing = re.match(r"the following arguments are required: (.+)", lines[0])
        if missing:
            names = [f"--{n.strip()}" for n in missing.group(1).split(",")]
            raise ConfigError(f"{' and '.join(names)} missing: see {parser.prog} --help") from None
        key = re.match(r'Parser key "([^"]+)":', lines[0])
        if key and len(lines) > 1:
            raise ConfigError(f"--{key.group(1)}: {lines[1]}") from None
        raise ConfigError(lines[0]) from None
