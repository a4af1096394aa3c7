"""TPU devices to compile for on a machine without a TPU: libtpu and jax.experimental.topologies.

With libtpu installed (``make test`` puts the version the installed jax asks for in .venv/libtpu, outside the
environment's site-packages, so that no other process sees a TPU plugin), ``tpu_devices("v5p:4x4x4")`` returns
the 64 devices of that slice. A computation placed on them (a mesh, NamedShardings) is lowered and compiled by
XLA's real TPU backend, Mosaic included; nothing runs, and this process keeps its CPU backend for everything
else. experiments/bench/tpu_compile.py compiles the Pallas scan kernels this way; experiments/plan.py
(``target=``) compiles a whole training step or prefill chunk for a slice and reads its memory use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_LIBTPU = ROOT / ".venv" / "libtpu" / "libtpu" / "libtpu.so"

# chip -> (TPU_ACCELERATOR_TYPE of its smallest slice, HBM a program may allocate per chip, in bytes: what libtpu
# 0.0.42.1's compiler allows, from its RESOURCE_EXHAUSTED message, "exceeds available HBM (15.75G)"; a little
# below the chips' 16, 32 and 96 GiB of Cloud TPU's pages, libtpu keeps the rest)
CHIPS = {"v5e": ("v5litepod-1", int(15.75 * 2**30)), "v6e": ("v6e-1", int(31.25 * 2**30)),
         "v5p": ("v5p-8", int(95.74 * 2**30))}
# v5p slices are 3-D tori of chips, v5e and v6e slices 2-D grids
CHIP_GRID_DIMS = {"v5e": 2, "v6e": 2, "v5p": 3}
# chips per host as the compile groups them into processes: v5p's hosts have 4; v5e and v6e also come in 8-chip
# hosts, which changes the process grouping, not a chip's memory
CHIPS_PER_HOST = (2, 2, 1)


def libtpu_requirement() -> str:
    """The libtpu requirement of the installed jax's "tpu" extra, e.g. 'libtpu==0.0.42.*'."""
    from importlib import metadata

    for requirement in metadata.requires("jax") or []:
        spec, _, marker = requirement.partition(";")
        if spec.strip().startswith("libtpu") and "tpu" in marker:
            return spec.strip().replace(" ", "")
    raise RuntimeError(f"jax {metadata.version('jax')} names no libtpu in its 'tpu' extra")


def libtpu_path() -> str | None:
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    if BUNDLED_LIBTPU.is_file():
        return str(BUNDLED_LIBTPU)
    try:
        import libtpu
    except ImportError:
        return None
    return libtpu.get_library_path()


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); the chip kind and its grid of chips, checked."""
    match = re.fullmatch(r"(\w+):(\d+(?:x\d+){1,2})", str(topology))
    chip = match.group(1) if match else None
    if chip not in CHIPS:
        raise ValueError(f"topology: expected CHIP:AxB or CHIP:AxBxC with CHIP one of {sorted(CHIPS)} "
                         f"(e.g. v5p:4x4x4, v6e:2x4), got {topology!r}")
    grid = tuple(int(n) for n in match.group(2).split("x"))
    if min(grid) < 1:
        raise ValueError(f"topology: expected a grid of positive sizes, got {topology!r}")
    if len(grid) != CHIP_GRID_DIMS[chip]:  # named here, before libtpu is loaded
        raise ValueError(f"topology: expected a {CHIP_GRID_DIMS[chip]}-D grid of {chip} chips (e.g. "
                         f"{chip}:{'x'.join(['2'] * CHIP_GRID_DIMS[chip])}), got {topology!r}")
    return chip, grid


def tpu_devices(topology: str, libtpu_args: str = "") -> list:
    """The devices of a TPU slice of ``topology`` (e.g. 'v6e:1x1', 'v5p:4x4x4'), for ahead-of-time compilation.
    ``libtpu_args`` are libtpu's start-up flags, put before those of EXTRA_LIBTPU_ARGS (e.g. XLA TPU flags whose
    effect on memory a plan should show). libtpu starts once per process: call this before anything else loads it,
    with the same arguments each time."""
    chip, grid = parse_topology(topology)
    path = libtpu_path()
    if path is None:
        raise RuntimeError("libtpu is not installed: `make test` puts it in .venv/libtpu, or pip install "
                           f"'{libtpu_requirement()}' (or set TPU_LIBRARY_PATH)")
    os.environ.update(TPU_LIBRARY_PATH=path, TPU_ACCELERATOR_TYPE=CHIPS[chip][0], TPU_WORKER_HOSTNAMES="localhost",
                      TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                      LIBTPU_INIT_ARGS=f"{libtpu_args} {os.environ.get('EXTRA_LIBTPU_ARGS', '')}".strip())
    from jax.experimental import topologies

    per_host = tuple(min(a, b) for a, b in zip(CHIPS_PER_HOST, grid + (1,) * (3 - len(grid))))
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                               chips_per_host_bounds=per_host, num_slices=1)
    return list(description.devices)


def hbm_bytes(topology: str) -> int:
    """The HBM one chip of ``topology`` lets a program allocate."""
    return CHIPS[parse_topology(topology)[0]][1]
