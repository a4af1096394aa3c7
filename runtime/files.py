"""Small text files (config.yaml, config.json, an index, metrics.jsonl) written whole or not at all."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class WriteError(RuntimeError):
    """A command's output could not be written (a full disk, a read-only file system): the message names the file
    or directory."""


def write_failure(what: str, path: str | Path, err: Exception) -> WriteError:
    """WriteError ``output_dir: could not write <what> <path> (<reason>)``: an OSError's own message names a file
    at best ("[Errno 28] No space left on device" names none)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return WriteError(f"output_dir: could not write {what}{' ' if what else ''}{str(path)!r} ({reason})")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it over ``path``: a crash mid-write leaves
    the previous file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this: the write's error is the one
            tmp.unlink(missing_ok=True)
