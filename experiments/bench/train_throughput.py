"""Training throughput and model FLOPs utilisation (MFU) of the jitted train step, either family.

    python -m experiments.bench.train_throughput tiny_falcon_mamba tiny_falcon [key=value ...] \\
        [--steps 5] [--peak-tflops 989]

For each preset the real train step of experiments.train (same mesh, shardings, optimizer and remat) is
compiled and timed on random-token batches. FLOPs per step come from XLA's own cost analysis of the
compiled step (forward, backward and optimizer); MFU = FLOPs per second / (peak FLOP/s of one device x
devices). --peak-tflops is the device's dense peak in the compute dtype (H100 SXM bf16: 989), or "measured":
the FLOP/s of a large square matmul in the compute dtype timed in the same run on one device (what this
machine's XLA reaches at best; the figure to use on a CPU, whose datasheet peak XLA does not approach).
Without it no MFU is printed. Also printed: 6 x params x tokens, the usual model-FLOPs estimate.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from configs import load_config
from experiments.mesh import put_global_batch
from experiments.timing import random_array, time_call, versions
from experiments.train import jit_train_step, prepare


def matmul_tflops(dtype: str, size: int = 4096, repeats: int = 5) -> float:
    """Measured TFLOP/s of a (size x size) @ (size x size) matmul in ``dtype`` on the default device."""
    a = random_array((size, size), dtype)
    seconds = time_call(jax.jit(lambda x: x @ x), a, repeats=repeats)
    return 2 * size ** 3 / seconds / 1e12


def bench(preset: str, overrides: list[str], steps: int, peak_tflops: float | None) -> dict:
    run = load_config(preset, overrides)
    setup = prepare(run)
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    step_fn = jit_train_step(setup, run, donate=False)
    shape = (run.data.grad_accum, run.data.batch_size // run.data.grad_accum, run.data.seq_len)
    rng = np.random.default_rng(0)
    host = {"inputs": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
            "targets": rng.integers(0, run.model.vocab_size, shape, dtype=np.int32),
            "mask": np.ones(shape, np.float32)}
    batch = {name: put_global_batch(array, setup.batch_sharding) for name, array in host.items()}
    compiled = step_fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    seconds = time_call(lambda: compiled(state, batch), repeats=steps)
    tokens = run.data.batch_size * run.data.seq_len
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    devices = setup.mesh.devices.size
    row = {"preset": preset, "overrides": overrides, "params": n_params, "devices": devices,
           "compute_dtype": run.model.compute_dtype, "tokens_per_step": tokens, "step_seconds": seconds,
           "tokens_per_s": tokens / seconds, "xla_flops_per_step": flops, "six_n_flops_per_step": 6 * n_params * tokens,
           "backend": jax.default_backend()}
    if peak_tflops:
        row["mfu_xla_flops"] = flops / seconds / (peak_tflops * 1e12 * devices)
        row["mfu_6n"] = 6 * n_params * tokens / seconds / (peak_tflops * 1e12 * devices)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+", help="preset names or YAML paths, then key=value overrides")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", default=None,
                        help='dense peak TFLOP/s of one device, or "measured" (a large matmul, timed here)')
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets if "=" not in p]
    overrides = [p for p in args.presets if "=" in p]
    peak, peak_source = args.peak_tflops, "given"
    if peak == "measured":
        dtype = load_config(presets[0], overrides).model.compute_dtype
        peak, peak_source = matmul_tflops(dtype), f"measured: {dtype} 4096^3 matmul on one device"
    elif peak is not None:
        try:
            peak = float(peak)
        except ValueError:
            parser.error(f'--peak-tflops: expected a number or "measured", got {peak!r}')
    rows = [bench(preset, overrides, args.steps, peak) for preset in presets]
    if args.json:
        print(json.dumps({"versions": versions(), "peak_tflops": peak, "peak_source": peak_source, "rows": rows},
                         indent=2))
        return
    print(f"versions: {versions()}")
    if peak is not None:
        print(f"peak: {peak:.3f} TFLOP/s per device ({peak_source})")
    for r in rows:
        mfu = f", MFU {r['mfu_xla_flops']:.1%} (XLA FLOPs) / {r['mfu_6n']:.1%} (6N)" if "mfu_xla_flops" in r else ""
        print(f"{r['preset']:24s} {r['params'] / 1e6:8.2f}M params on {r['devices']} {r['backend']} device(s), "
              f"{r['compute_dtype']}: {r['step_seconds'] * 1000:8.1f} ms/step, {r['tokens_per_s']:10,.0f} tokens/s, "
              f"{r['xla_flops_per_step'] / r['step_seconds'] / 1e9:7.1f} GFLOP/s (XLA count){mfu}")


if __name__ == "__main__":
    main()
