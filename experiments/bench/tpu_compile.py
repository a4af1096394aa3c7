"""Compile the Pallas scan's TPU (Mosaic) kernels for a TPU on a machine without one; report the compiler's static
cycle estimates.

    python -m experiments.bench.tpu_compile [--chip v6e] [--batch 1] [--seqlen 256] [--dim 1024] [--dstate 16]
                                            [--tile 64] [--json PATH]

JAX compiles ahead of time for a TPU topology it does not have (``jax.experimental.topologies``) when libtpu is
installed: the kernels go through Mosaic's whole pipeline (layout inference, apply-vector-layout, lowering to LLO)
and XLA's TPU backend, so a kernel Mosaic rejects fails here, not in a TPU lease. libtpu's static LLO profile
(``--xla_jf_dump_static_llo_profile_to``) then gives each HLO op's estimated cycles; for a Pallas kernel (one
custom call) that covers its whole grid and its in-kernel loops, so it compares kernel variants. It is the
compiler's model, not a measurement: no memory stalls beyond what it models, no timing; XLA's own loops (the
"chunked" and "sequential" impls) are not multiplied by their trip counts, so they cannot be compared this way.
The estimate's cost grows with the grid (libtpu walks it), hence the small default shape: the kernels' cost per
program and step does not depend on it. EXTRA_LIBTPU_ARGS (e.g. "--xla_jf_dump_to=DIR --xla_jf_dump_llo_text=true",
which dumps the scheduled VLIW bundles) is appended to the flags libtpu starts with.

libtpu: the version the installed jax asks for (``jax[tpu]``), found as experiments/tpu_topology.py says.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from experiments.bench import positive_int, provenance, write_provenance
from experiments.cli import check_output_file
from experiments.tpu_topology import tpu_devices

ONE_CHIP = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1"}   # chip -> the topology of one chip


def start_tpu_compiler(chip: str, profile_dir: str):
    """Loads libtpu for a one-chip ``chip`` topology that dumps static profiles into ``profile_dir``; returns the
    topology's device. Call once per process, before anything else initialises the TPU plugin."""
    if chip not in ONE_CHIP:
        raise ValueError(f"chip: expected one of {sorted(ONE_CHIP)}, got {chip!r}")
    return tpu_devices(ONE_CHIP[chip], f"--xla_jf_dump_static_llo_profile_to={profile_dir}")[0]


def estimated_cycles(profile_dir: str) -> dict[str, int]:
    """HLO op name -> estimated cycles, from the static profiles in ``profile_dir``."""
    cycles = {}
    for path in glob.glob(os.path.join(profile_dir, "*static_llo_profile*")):
        text = Path(path).read_text()
        for name, count in re.findall(r'hlo_op_name: "([^"]+)"\s+estimated_cycles: (\d+)', text):
            cycles[name] = int(count)
    return cycles


def kernel_cycles(device, profile_dir, batch, seqlen, dim, dstate, tile) -> dict[str, int]:
    """Compiles the forward and the gradient of the Pallas TPU scan at a Falcon Mamba layer's options (bf16
    inputs, D, z, delta_bias, softplus, one B/C group) for ``device``; returns the kernels' estimated cycles."""
    import jax
    import jax.numpy as jnp

    from experiments.bench.gpu_scan import channels_last_shapes
    from ssm.pallas_scan import selective_scan_pallas

    args = channels_last_shapes(batch, seqlen, dim, 1, dstate, jax.sharding.SingleDeviceSharding(device))

    def scan(*a):
        return selective_scan_pallas(*a, True, tile=tile, kernel="mosaic_tpu", interpret=False)[0]

    def loss(*a):
        return scan(*a).astype(jnp.float32).sum()

    found = {}
    for fn in (scan, jax.grad(loss, argnums=tuple(range(len(args))))):
        for path in glob.glob(os.path.join(profile_dir, "*")):
            os.remove(path)
        jax.jit(fn).lower(*args).compile()
        for name, count in estimated_cycles(profile_dir).items():
            for kernel in ("selective_scan_fwd_tpu", "selective_scan_bwd_tpu"):
                if kernel in name:  # the forward kernel is in both compiles ("jvp_..." in the gradient's)
                    found[kernel] = count
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chip", default="v6e", choices=sorted(ONE_CHIP))
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seqlen", type=positive_int, default=256)
    parser.add_argument("--dim", type=positive_int, default=1024)
    parser.add_argument("--dstate", type=positive_int, default=16)
    parser.add_argument("--tile", type=positive_int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from ssm.pallas_scan_tpu import check_shapes

    try:  # the kernel's own limit and the output path, before libtpu starts
        check_shapes(args.dim, 1)
    except ValueError as err:
        parser.error(f"--{err}")
    if args.json is not None:
        try:
            check_output_file("--json", args.json)
        except ValueError as err:
            parser.error(str(err))
    with tempfile.TemporaryDirectory() as profile_dir:
        try:
            device = start_tpu_compiler(args.chip, profile_dir)
        except RuntimeError as err:  # no libtpu here
            print(f"error: {err}", file=sys.stderr)
            return 1
        cycles = kernel_cycles(device, profile_dir, args.batch, args.seqlen, args.dim, args.dstate, args.tile)
    lane_steps = args.batch * args.seqlen * args.dim / 128  # one step of 128 channels
    print(f"{args.chip} ({device.device_kind}), batch {args.batch}, seqlen {args.seqlen}, dim {args.dim}, "
          f"dstate {args.dstate}, tile {args.tile}; libtpu static estimates, not measurements")
    for kernel, count in sorted(cycles.items()):
        # under a cycle per step cannot be: libtpu's profile missed the kernel's loops (its v5p profile of the
        # backward does, while the compile itself succeeds)
        note = "  (implausible: the static profile missed the loops)" if count < lane_steps else ""
        print(f"  {kernel:24s} {count:>12,d} cycles  {count / lane_steps:7.2f} per step of 128 channels{note}")
    if args.json:
        args.json.write_text(json.dumps(dict(vars(args), json=None, device_kind=device.device_kind,
                                             cycles=cycles), indent=1))
        # the compile-only topology's device (this process's jax.devices() are not it)
        write_provenance(args.json, provenance("experiments.bench.tpu_compile", argv, device={
            "backend": "tpu (compile only)", "device_kind": device.device_kind, "device_count": 1}))
    missing = {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"} - set(cycles)
    if missing:
        print(f"no static estimate for {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
