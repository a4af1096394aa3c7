"""Training throughput and model FLOPs utilisation (MFU) of the jitted train step, either family.

    python -m experiments.bench.train_throughput tiny_falcon_mamba tiny_falcon [key=value ...] \\
        [--steps 5] [--peak-tflops 989]

For each preset the real train step of experiments.train (same mesh, shardings, optimizer and remat) is
compiled and timed on random-token batches. MFU = model FLOPs per second / (peak FLOP/s of one device x
devices), with PaLM's model FLOPs (``model_flops_per_token``): 6 x the matmul weights per token, plus, for a
transformer, 12 x layers x d_model x seq_len for attention. --peak-tflops is the device's dense peak in the
compute dtype (H100 SXM bf16: 989), or "measured": the FLOP/s of a large square matmul in the compute dtype
timed in the same run on one device (what this machine's XLA reaches at best; the figure to use on a CPU,
whose datasheet peak XLA does not approach). Without it no MFU is printed. Also printed, for information,
XLA's cost analysis of the compiled step (per device, times devices), which counts a loop's body once: it
under-counts a lax.scan over grad_accum microbatches, the chunked scan's chunks and blockwise attention, and
sees no FLOPs inside Pallas kernels.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np

from configs import load_config
from configs.schema import is_number
from experiments.bench import check_runs, positive_int, positive_number, provenance
from experiments.mesh import put_global_batch
from experiments.timing import random_array, time_call, versions
from experiments.train import jit_train_step, prepare


def matmul_tflops(dtype: str, size: int = 4096, repeats: int = 5) -> float:
    """Measured TFLOP/s of a (size x size) @ (size x size) matmul in ``dtype`` on the default device."""
    a = random_array((size, size), dtype)
    seconds = time_call(jax.jit(lambda x: x @ x), a, repeats=repeats)
    return 2 * size ** 3 / seconds / 1e12


def model_flops_per_token(model_config, n_params: int, seq_len: int) -> float:
    """PaLM's model FLOPs per trained token (forward and backward): 6 x the weights a token is multiplied by (the
    parameters but an untied input embedding, which is a lookup; tied, it is the output projection) plus, for a
    transformer, 12 x layers x d_model x seq_len (attention scores and values, counted whole as PaLM does, not
    halved for causality). Elementwise work and Mamba's scan (about 0.5% of a 7B step) are not counted."""
    embedding = model_config.vocab_size * model_config.hidden_size
    matmul_params = n_params - (0 if model_config.tie_word_embeddings else embedding)
    attention = 12 * model_config.num_hidden_layers * model_config.hidden_size * seq_len
    return 6 * matmul_params + (attention if model_config.family == "falcon" else 0)


def bench(preset: str, overrides: list[str], steps: int, peak_tflops: float | None) -> dict:
    """One preset's step timed; the MFU against ``peak_tflops`` per device (None: no MFU)."""
    if peak_tflops is not None and not (is_number(peak_tflops) and 0 < peak_tflops < math.inf):
        raise ValueError(f"peak_tflops: expected a finite number > 0 or None, got {peak_tflops!r}")  # 0 gave no MFU
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
    devices = setup.mesh.devices.size
    xla_flops = float(cost.get("flops", 0.0)) * devices if cost else 0.0  # the SPMD program is one device's
    seconds = time_call(lambda: compiled(state, batch), repeats=steps)
    tokens = run.data.batch_size * run.data.seq_len
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    flops = model_flops_per_token(run.model, n_params, run.data.seq_len) * tokens
    row = {"preset": preset, "overrides": overrides, "params": n_params, "devices": devices,
           "compute_dtype": run.model.compute_dtype, "tokens_per_step": tokens, "step_seconds": seconds,
           "tokens_per_s": tokens / seconds, "model_flops_per_step": flops, "xla_flops_per_step": xla_flops,
           "backend": jax.default_backend()}
    if peak_tflops is not None:
        row["mfu"] = flops / seconds / (peak_tflops * 1e12 * devices)
    return row


def peak_tflops(text: str) -> float | str:
    """argparse type of --peak-tflops: "measured" or a finite number > 0 (0, a negative or nan gave no MFU, a
    negative one or nan)."""
    if text == "measured":
        return text
    try:
        return positive_number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected a finite number > 0 or "measured", got {text!r}') from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+", help="preset names or YAML paths, then key=value overrides")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--peak-tflops", default=None, type=peak_tflops,
                        help='dense peak TFLOP/s of one device, or "measured" (a large matmul, timed here)')
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets if "=" not in p]
    overrides = [p for p in args.presets if "=" in p]
    runs = check_runs(parser, presets, overrides)
    peak, peak_source = args.peak_tflops, "given"
    if peak == "measured":
        dtype = runs[0].model.compute_dtype
        peak, peak_source = matmul_tflops(dtype), f"measured: {dtype} 4096^3 matmul on one device"
    rows = [bench(preset, overrides, args.steps, peak) for preset in presets]
    if args.json:
        print(json.dumps({"versions": versions(), "peak_tflops": peak, "peak_source": peak_source, "rows": rows,
                          "provenance": provenance("experiments.bench.train_throughput", argv)}, indent=2))
        return
    print(f"versions: {versions()}")
    if peak is not None:
        print(f"peak: {peak:.3f} TFLOP/s per device ({peak_source})")
    for r in rows:
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
        print(f"{r['preset']:24s} {r['params'] / 1e6:8.2f}M params on {r['devices']} {r['backend']} device(s), "
              f"{r['compute_dtype']}: {r['step_seconds'] * 1000:8.1f} ms/step, {r['tokens_per_s']:10,.0f} tokens/s, "
              f"{r['model_flops_per_step'] / r['step_seconds'] / 1e9:7.1f} model GFLOP/s{mfu} "
              f"(XLA's count: {r['xla_flops_per_step'] / r['step_seconds'] / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
