"""The command line shared by the commands that take ``CONFIG [key=value ...]`` (experiments.train,
experiments.plan, experiments.bench.collectives): usage on -h/--help or no argument, and a bad config or
argument reported on one ``error:`` line with exit status 1 instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable


def run_config_command(doc: str, argv: list[str] | None, command: Callable[[list[str]], int],
                       errors: tuple[type[Exception], ...] = ()) -> int:
    """``command(argv)``'s exit status; ``doc`` printed for -h/--help (status 0) or no argument (status 2);
    ValueError (ConfigError is one) and ``errors`` printed as ``error: ...`` to stderr (status 1)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return 0 if argv else 2
    try:
        return command(argv)
    except (ValueError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
