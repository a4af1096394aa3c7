"""The command line shared by the commands that take ``CONFIG [key=value ...]`` (experiments.train,
experiments.plan, experiments.bench.collectives): usage on -h/--help or no argument, and a bad config or
argument reported on one ``error:`` line with exit status 1 instead of a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
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


def check_output_file(name: str, path: str) -> None:
    """ValueError naming ``name`` unless ``path`` can be written: a file (not a directory) in an existing
    directory this process can write (checked before the model is loaded, not after it has been evaluated)."""
    path = Path(path)
    parent = path.parent
    problem = ("is a directory" if path.is_dir() else
               f"its directory {str(parent)!r} does not exist" if not parent.is_dir() else
               f"its directory {str(parent)!r} is not writable" if not os.access(parent, os.W_OK | os.X_OK) else
               "is not writable" if path.exists() and not os.access(path, os.W_OK) else None)
    if problem:
        raise ValueError(f"{name}: expected a file path in a writable directory, got {str(path)!r} ({problem})")


def error_line(err: Exception, flags: dict[str, str]) -> str:
    """``error: <message>`` for a library error whose message starts with the name of what it checked (``step:``,
    ``config field 'data.token_file':``), that name replaced by the command's flag for it (``flags``:
    {"step": "--step"})."""
    message = str(err)
    for name, flag in flags.items():
        if message.startswith(f"{name}:"):
            message = flag + message[len(name):]
    return f"error: {message}"
