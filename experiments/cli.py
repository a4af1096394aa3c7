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


def error_line(err: Exception, flags: dict[str, str], mesh: str | None = None) -> str:
    """``error: <message>`` for a library error whose message starts with the name of what it checked (``step:``,
    ``config field 'data.token_file':``), that name replaced by the command's flag for it (``flags``:
    {"step": "--step"}). ``mesh``: the --mesh value as given ("tensor=2"), named first ("--mesh tensor=2: ...")
    where the error is a dimension the mesh does not divide (a MeshError, or an error raised from one)."""
    from runtime.partitioning import MeshError

    message = str(err)
    for name, flag in flags.items():
        if message.startswith(f"{name}:"):
            message = flag + message[len(name):]
    if mesh and (isinstance(err, MeshError) or isinstance(err.__cause__, MeshError)):
        message = f"--mesh {mesh}: {message}"
    return f"error: {message}"


MESH_HELP = ("shard the model over the devices: AXIS=N[,AXIS=N...], axes data, fsdp, tensor (e.g. tensor=8: "
             "attention heads and MLP split over 8 devices; axes not named: data takes the devices left (1 where a "
             "named axis is -1, as in tensor=-1), fsdp and tensor 1; a batch's rows split over data and fsdp where "
             "they divide); default: one device for a Hugging Face directory, every device for a run (the "
             "parameters replicated, the rows split)")


def parse_mesh(flag: str, text: str | None):
    """``flag``'s ``AXIS=N[,AXIS=N...]`` (MESH_HELP) as a MeshConfig that fits jax.device_count(), checked before a
    model is loaded; None where the flag was not given. SystemExit naming ``flag`` otherwise."""
    if text is None:
        return None
    import jax

    from configs.schema import MESH_AXES, MeshConfig
    from experiments.mesh import mesh_shape

    sizes = {}
    for item in text.replace(",", " ").split() or [""]:
        axis, equals, size = item.partition("=")
        if not equals or axis not in MESH_AXES or axis in sizes:
            problem = f"{axis!r} twice" if axis in sizes and equals else repr(item)
            raise SystemExit(f"error: {flag}: expected AXIS=N items with AXIS one of {', '.join(MESH_AXES)}, each "
                             f"once, got {problem}")
        try:
            sizes[axis] = int(size)
        except ValueError:
            raise SystemExit(f"error: {flag}: expected {axis}=N with N a positive integer or -1, got {item!r}")
    if -1 in sizes.values() and "data" not in sizes:
        sizes["data"] = 1  # data takes the devices left only where no named axis does (tensor=-1: all of them)
    try:
        mesh = MeshConfig(**sizes)
        mesh_shape(mesh, jax.device_count())
    except ValueError as err:  # ConfigError, MeshError
        raise SystemExit(f"error: {flag} {text}: {err}")
    return mesh


def mesh_description(mesh) -> str:
    """"data=1, fsdp=1, tensor=8" of a MeshConfig, -1 resolved for this process's devices."""
    import jax

    from configs.schema import MESH_AXES
    from experiments.mesh import mesh_shape

    return ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, mesh_shape(mesh, jax.device_count())))

