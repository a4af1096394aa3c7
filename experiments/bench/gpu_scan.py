"""GPU (or TPU) benchmark of the selective scan at Falcon Mamba 7B layer shapes (dim 8192, dstate 16, bf16 inputs).

    python -m experiments.bench.gpu_scan --out DIR [--lengths 2048 4096 8192 16384] [--batches 1 2 4 8]
        [--variants TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS] ...] [--sweep]

Measures in one run, forward and forward+backward: our impls ("chunked", "pallas") through selective_scan_fn
(mamba_ssm's (batch, dim, seqlen) layout, so our times include its transposes to the channels-last layout the
models use natively) and mamba_ssm's CUDA selective_scan_fn (when it imports), plus the bytes-moved floor:
the timed function's inputs read once and its outputs written once (u, delta, z, out in bf16; B, C in bf16; A, D,
delta_bias fp32; forward+backward: the inputs and dout read, du, ddelta, dz, dB, dC, dA, dD, ddelta_bias written)
over the device-to-device copy bandwidth
measured in the same run. Prints a table with each time over the floor and over mamba_ssm's, and writes
DIR/gpu_scan.json.

--variants sweeps the Pallas kernel's tuning knobs (ssm.pallas_scan.selective_scan_pallas: sequence tile,
channels per program, warps per program, steps per load group (default 1), ":rows" for B and C laid out
(seqlen, n), ":pf" for loads issued a group of steps ahead) at the first batch and length, timing the kernel call
alone on channels-last inputs (no layout transposes), forward and forward+backward. On a TPU the same command times
the Mosaic kernels (only TILE matters there; mamba_ssm is absent).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import check_out_dir, positive_int, provenance, write_provenance
from experiments.timing import format_row, random_array, time_call, versions
from ssm.scan import IMPLS, selective_scan_fn, to_channels_last

DIM, DSTATE = 8192, 16
TIMED_BACKENDS = ("gpu", "tpu")  # where main() runs (a test adds "cpu", with the timer stubbed)
# The Triton kernel's knobs that the GPU tier sweeps (--sweep),
# TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS]; also what experiments/bench/triton_compile.py compiles
# offline by default. The sequence splits (s4, s8; forward and backward) are for small batches: ssm/pallas_scan.py.
SWEEP_VARIANTS = ("64:32:1", "64:32:1:rows", "64:32:1:rows:s4", "64:32:1:rows:s8", "64:32:1:rows:pf",
                  "16:32:1:rows:pf", "64:32:1:4:rows", "128:32:1:4:rows", "64:64:2:4:rows", "64:128:4:rows",
                  "64:16:1:4:rows")


# a sweep variant whose output or gradients differ from the chunked scan's by this much of their largest value is
# wrong, not rounded differently (bf16 outputs and input gradients round at ~4e-3 of it)
WRONG = 5e-2


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    x = random_array((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 0.0)
    return 2 * n_bytes / time_call(copy, x, repeats=10, warmup=2)


def floor_bytes(batch: int, length: int, backward: bool) -> int:
    """Bytes the timed function must move at least: its inputs read once, its outputs written once. Forward: u,
    delta, z, B, C, A, D, delta_bias in, out out. Forward+backward (the gradients of sum(out * dout)): the same
    inputs and dout in, du, ddelta, dz, dB, dC, dA, dD, ddelta_bias out. A backward that recomputes the states
    (ours and mamba_ssm's) reads u, delta, B and A twice, ~1.3x this; saved states and mamba_ssm's fp32 dB, dC are
    not counted. (Until 2026-12-01 the forward+backward floor counted a whole forward pass besides, ~18% more.)"""
    rows, cols = batch * length * DIM * 2, batch * length * DSTATE * 2 * 2  # bf16 (b,d,l); B and C (b,n,l)
    params = DIM * DSTATE * 4 + 2 * DIM * 4
    if not backward:
        return 4 * rows + cols + params  # u, delta, z in; out
    # u, delta, z, dout, B, C, A, D, delta_bias in; du, ddelta, dz, dB, dC, dA, dD, ddelta_bias out
    return (4 * rows + cols + params) + (3 * rows + cols + params)


def channels_last_shapes(batch: int, length: int, dim: int = DIM, groups: int = 1, dstate: int = DSTATE,
                         sharding=None) -> tuple:
    """selective_scan_pallas's arguments u, delta, A, B, C, D, z, delta_bias at a Falcon Mamba layer's dtypes (bf16
    u, delta, z, B, C; fp32 A, D, delta_bias), channels-last, as jax.ShapeDtypeStructs: what the offline
    compiles (triton_compile, tpu_compile) lower the kernels for."""
    def S(shape, dtype=jnp.bfloat16):  # noqa: N802
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    rows, bc, chan = S((batch, length, dim)), S((batch, length, groups, dstate)), S((dim,), jnp.float32)
    return rows, rows, S((dim, dstate), jnp.float32), bc, bc, chan, rows, chan


def inputs(batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    bf16 = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16)  # noqa: E731
    return dict(u=bf16(batch, DIM, length), delta=bf16(batch, DIM, length),
                A=-jnp.exp(jnp.asarray(rng.standard_normal((DIM, DSTATE), np.float32))),
                B=bf16(batch, DSTATE, length), C=bf16(batch, DSTATE, length),
                D=jnp.asarray(rng.standard_normal(DIM, np.float32)), z=bf16(batch, DIM, length),
                delta_bias=jnp.asarray(rng.standard_normal(DIM, np.float32)))


def jitted(forward, backward: bool):
    """``forward`` (inputs dict -> out) jitted, or with ``backward`` the gradients of sum(out) for every input:
    what a forward or forward+backward timing calls. The cotangent of sum(out) (ones like out, which has u's shape
    and dtype) is made once per shape and passed in, as mamba_ssm's timing passes its own: as a constant inside
    the jitted function XLA would fold it away and never read it."""
    if not backward:
        return jax.jit(forward)
    gradients = jax.jit(lambda a, dout: jax.vjp(forward, a)[1](dout)[0])
    douts = {}

    def call(a):
        key = (a["u"].shape, a["u"].dtype)
        if key not in douts:
            douts[key] = jnp.ones(*key)
        return gradients(a, douts[key])

    return call


def time_ours(impl: str, kw: dict, backward: bool, repeats: int) -> float:
    def forward(kw):
        return selective_scan_fn(**kw, delta_softplus=True, impl=impl)

    return time_call(jitted(forward, backward), kw, repeats=repeats)


def time_mamba(kw: dict, backward: bool, repeats: int) -> float:
    import torch
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

    t = {k: torch.from_numpy(np.asarray(v.astype(jnp.float32))).cuda().to(torch.bfloat16 if v.dtype == jnp.bfloat16
                                                                           else torch.float32) for k, v in kw.items()}
    inputs = [t[name].requires_grad_(backward) for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    # the cotangent of sum(out), made once: out.float().sum() would time an fp32 copy of out, its sum and the cast of
    # the cotangent back to bf16 on this side only (XLA fuses them on ours)
    dout = torch.ones_like(t["u"])

    def run():
        out = mamba_scan(*inputs, True)
        if backward:  # the gradients returned, not accumulated into .grad (no extra work per repeat)
            torch.autograd.grad(out, inputs, grad_outputs=dout)
        torch.cuda.synchronize()

    return time_call(run, repeats=repeats)  # run() synchronises CUDA itself


def parse_variant(variant: str, name: str = "variant") -> dict:
    """TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS] -> selective_scan_pallas's knobs (tile, block_dim,
    num_warps, unroll, bc_rows, prefetch, splits)."""
    parts = variant.split(":")
    split = re.fullmatch(r"s([1-9]\d*)", parts[-1])
    parts = parts[:-1] if split else parts
    prefetch = parts[-1:] == ["pf"]
    parts = parts[:-1] if prefetch else parts
    bc_rows = parts[-1:] == ["rows"]
    numbers = parts[:-1] if bc_rows else parts
    if len(numbers) not in (3, 4) or not all(p.isdigit() and int(p) > 0 for p in numbers):
        raise ValueError(f"{name}: expected TILE:BLOCK_DIM:NUM_WARPS[:UNROLL] positive integers, optionally :rows, "
                         f"then optionally :pf, then optionally :s<splits>, got {variant!r}")
    tile, block_dim, num_warps, unroll = (int(x) for x in numbers + ["1"] * (4 - len(numbers)))
    return dict(tile=tile, block_dim=block_dim, num_warps=num_warps, unroll=unroll, bc_rows=bc_rows,
                prefetch=prefetch, splits=int(split.group(1)) if split else 1)


def check_variants(parser: argparse.ArgumentParser, variants) -> None:
    """parser.error naming --variants where one of them does not parse."""
    for variant in variants:
        try:
            parse_variant(variant, "--variants")
        except ValueError as e:
            parser.error(str(e))


def sweep_shapes(batches, lengths) -> list[tuple[int, int]]:
    """Where the sweep times the variants: the first (batch, length), where a batch row's channel blocks are the
    only parallelism (at batch 1, 256 one-warp programs for 528 warp schedulers on an H100/H200), then the
    largest batch at that length, where every scheduler has programs and the backward's per-program workspaces
    (tile x dstate x block_dim fp32 each) exceed the L2 cache together."""
    return list(dict.fromkeys([(batches[0], lengths[0]), (max(batches), lengths[0])]))


def channels_last_args(kw: dict) -> dict:
    """inputs()'s (batch, dim, seqlen) arrays in the channels-last layout the kernels take."""
    return dict(kw, **dict(zip(("u", "delta", "B", "C", "z"),
                               to_channels_last(kw["u"], kw["delta"], kw["B"], kw["C"], kw["z"]))))


def kernel_call(backward: bool, **knobs):
    """The jitted scan on channels-last args: forward, out; with ``backward``, the gradients of sum(out) for every
    input. knobs: selective_scan_pallas's (a variant), or impl= for ssm.scan.selective_scan (the reference)."""
    from ssm.pallas_scan import selective_scan_pallas
    from ssm.scan import selective_scan

    scan = selective_scan if "impl" in knobs else selective_scan_pallas

    def forward(a):
        out, _ = scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True, **knobs)
        return out

    return jitted(forward, backward)


def max_rel_diff(got, want) -> float:
    """The largest max|got - want| / max|want| over the arrays of two results (an output, or a gradient dict)."""
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                     / jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32))), 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def time_variant(variant: str, args: dict, backward: bool, repeats: int, reference=None) -> dict:
    """The Pallas kernel alone with tuning knobs TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS], on
    channels-last ``args``: {"pallas_kernel_s"}, and with ``reference`` (kernel_call(impl="chunked")'s result on
    the same args) also {"max_rel_diff"}: a variant is checked before it is timed, so that a fast wrong one (a
    race in the backward's workspace, say) cannot pass for a speed-up."""
    fn = kernel_call(backward, **parse_variant(variant))
    row = {}
    if reference is not None:
        row["max_rel_diff"] = max_rel_diff(fn(args), reference)
    row["pallas_kernel_s"] = time_call(fn, args, repeats=repeats)
    return row


def mamba_available() -> bool:
    try:
        import torch
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--impls", nargs="+", default=["chunked", "pallas"], choices=IMPLS)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--variants", nargs="*", default=[],
                        metavar="TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS]",
                        help="Pallas tuning knobs to sweep at the first batch and length (kernel call alone)")
    parser.add_argument("--sweep", action="store_true", help=f"--variants {' '.join(SWEEP_VARIANTS)}")
    args = parser.parse_args(argv)
    if args.sweep:
        args.variants = list(SWEEP_VARIANTS) + args.variants
    check_variants(parser, args.variants)  # every argument is checked before anything is timed
    check_out_dir(parser, args.out)
    if jax.default_backend() not in TIMED_BACKENDS:
        raise SystemExit(f"error: backend: expected a GPU or TPU (this benchmark times kernels at 7B shapes), got "
                         f"{jax.default_backend()!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    with_mamba = mamba_available()
    rows, sweep, environment = [], [], versions()
    origin = provenance("experiments.bench.gpu_scan", argv)

    def save():  # after every row: a run cut short by its time limit keeps what it measured
        result = dict(versions=environment, dim=DIM, dstate=DSTATE, copy_bandwidth_bytes_per_s=bandwidth,
                      mamba_ssm=with_mamba, rows=rows, pallas_sweep=sweep,
                      date=time.strftime("%Y-%m-%d %H:%M:%S %z"))
        (args.out / "gpu_scan.json").write_text(json.dumps(result, indent=2) + "\n")
        write_provenance(args.out / "gpu_scan.json", origin)

    for batch in args.batches:  # the table against mamba_ssm first, the sweep after it
        for length in args.lengths:
            kw = inputs(batch, length)
            for backward in (False, True):
                floor = floor_bytes(batch, length, backward) / bandwidth
                row = dict(batch=batch, length=length, pass_="fwd+bwd" if backward else "fwd", floor_s=floor)
                if with_mamba:
                    try:
                        row["mamba_ssm_s"] = time_mamba(kw, backward, args.repeats)
                    except Exception as error:  # noqa: BLE001 - recorded in the results, the run goes on
                        row["mamba_ssm_error"] = f"{type(error).__name__}: {error}"[:500]
                for impl in args.impls:
                    try:
                        row[f"{impl}_s"] = time_ours(impl, kw, backward, args.repeats)
                    except Exception as error:  # noqa: BLE001 - recorded in the results, the run goes on
                        row[f"{impl}_error"] = f"{type(error).__name__}: {error}"[:500]
                rows.append(row)
                save()
                print(format_row(row), flush=True)
            del kw
    for batch, length in sweep_shapes(args.batches, args.lengths) if args.variants else ():
        kw = channels_last_args(inputs(batch, length))
        for backward in (False, True):
            reference = kernel_call(backward, impl="chunked")(kw)
            for variant in args.variants:
                row = dict(batch=batch, length=length, pass_="fwd+bwd" if backward else "fwd", variant=variant,
                           floor_s=floor_bytes(batch, length, backward) / bandwidth)
                try:
                    row.update(time_variant(variant, kw, backward, args.repeats, reference))
                except Exception as error:  # noqa: BLE001 - recorded in the results, the sweep goes on
                    row["pallas_kernel_error"] = f"{type(error).__name__}: {error}"[:500]
                sweep.append(row)
                save()
                print(format_row(row), flush=True)
            del reference
        del kw
    names = (["mamba_ssm"] if with_mamba else []) + list(args.impls)
    print(f"\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s; times as ratios (lower is better)")
    print(f"{'batch':>5} {'len':>6} {'pass':>8} " + " ".join(f"{n + '/floor':>16}" for n in names)
          + (" " + " ".join(f"{n + '/mamba':>16}" for n in args.impls) if with_mamba else ""))
    for row in rows:
        def ratio(key, ref):
            return f"{row[key] / row[ref]:16.2f}" if key in row and ref in row else f"{'error':>16}"

        line = f"{row['batch']:>5} {row['length']:>6} {row['pass_']:>8} "
        line += " ".join(ratio(f"{n}_s", "floor_s") for n in names)
        if with_mamba:
            line += " " + " ".join(ratio(f"{n}_s", "mamba_ssm_s") for n in args.impls)
        print(line)
    if sweep:
        print(f"\nPallas kernel sweep (kernel alone); rel diff: max |variant - chunked| / max |chunked| over the "
              f"output or every gradient (WRONG from {WRONG:g})")
        print(f"{'batch':>5} {'len':>6} {'variant':>16} {'pass':>8} {'ms':>9} {'x floor':>8} {'rel diff':>9}")
        for row in sweep:
            ms = f"{row['pallas_kernel_s'] * 1e3:9.3f}" if "pallas_kernel_s" in row else f"{'error':>9}"
            ratio = f"{row['pallas_kernel_s'] / row['floor_s']:8.2f}" if "pallas_kernel_s" in row else f"{'':8}"
            diff = f"{row['max_rel_diff']:9.1e}" if "max_rel_diff" in row else ""
            wrong = " WRONG" if row.get("max_rel_diff", 0) >= WRONG else ""
            print(f"{row['batch']:>5} {row['length']:>6} {row['variant']:>16} {row['pass_']:>8} {ms} {ratio} "
                  f"{diff}{wrong}")
    save()
    print(f"wrote {args.out / 'gpu_scan.json'}")


if __name__ == "__main__":
    main()
