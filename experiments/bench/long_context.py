"""Long-context benchmark: the two measurements of the Falcon Mamba release post, on this machine.

(1) Prompt length -> peak memory and time, for Falcon Mamba's sequential (chunked) prefill, its parallel
    (whole-prompt) prefill, and the Falcon transformer's prefill into a KV cache.
(2) Generation: the number of generated tokens (2^10 .. 2^17 after a 16-token prompt) -> time per generated
    token and peak memory, for Falcon Mamba and Falcon, through the jit-compiled decode loop
    (runtime.generation.generate, greedy, no stop token). Also the time per decode step after each prompt of (1),
    in the same loop (runtime.generation.decode from the prefilled state).

Each point runs in a fresh process (python -m experiments.bench.long_context --worker ...) that reports its
own peak memory, so points do not share allocator state: the device's peak where JAX reports one (GPU, TPU:
the arrays live there), else the peak resident memory (CPU). Writes CSV and PNG plots to --out.

    python -m experiments.bench.long_context --out results/long_context            # tiny models, CPU
    python -m experiments.bench.long_context --mamba-preset falcon_mamba_7b --falcon-preset falcon_7b \\
        --min-log2 14 --generate-max-log2 12 --out results/long_context_gpu  # 7B shapes (random weights), GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from experiments.bench import (DEVICE_KEYS, check_out_dir, check_preset, jax_device, non_negative_int, positive_int,
                               provenance, write_provenance)

MODES = ("mamba_sequential", "mamba_parallel", "falcon")
GENERATE_MODES = ("mamba_generate", "falcon_generate")
GENERATE_PROMPT = 16
DECODE_REPEATS = 3
COLORS = {"mamba_sequential": "C0", "mamba_parallel": "C1", "falcon": "C2", "mamba_generate": "C0",
          "falcon_generate": "C2"}  # one colour per model in every panel


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device_peak_mb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def peak_mb(row: dict) -> float:
    """A point's peak memory: the device's (where the arrays live on an accelerator; JAX reports it) or else the
    process's RSS (on CPU, where the arrays are in host memory)."""
    return row["device_peak_mb"] if row.get("device_peak_mb") is not None else row["peak_rss_mb"]


def memory_label(rows: list[dict]) -> str:
    return "device peak memory" if any(r.get("device_peak_mb") is not None for r in rows) else "peak RSS"


def _build(args):
    from configs import load_model_config
    from experiments.models import build_model

    family_preset = args.falcon_preset if args.mode.startswith("falcon") else args.mamba_preset
    config = load_model_config(family_preset)
    return config, build_model(config, seed=0)


def generate_worker(args) -> dict:
    """Generates args.length tokens after a GENERATE_PROMPT-token prompt, twice (the first call compiles the
    loop for this length), and times the second."""
    import numpy as np

    from runtime.generation import generate

    config, model = _build(args)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, GENERATE_PROMPT), dtype=np.int32)
    generate(model, ids, max_new_tokens=args.length, temperature=0.0)
    start = time.perf_counter()
    result = generate(model, ids, max_new_tokens=args.length, temperature=0.0)
    seconds = time.perf_counter() - start
    if result.steps != args.length:
        raise RuntimeError(f"generated {result.steps} tokens, expected {args.length}")
    return {"mode": args.mode, "generated_tokens": args.length, "generate_seconds": seconds,
            "generate_ms_per_token": 1000 * seconds / args.length, "peak_rss_mb": _peak_rss_mb(),
            "device_peak_mb": _device_peak_mb(), **jax_device()}


def worker(args) -> dict:
    """Runs one point in this process and returns its measurements."""
    import jax
    import numpy as np

    if args.mode in GENERATE_MODES:
        return generate_worker(args)
    config, model = _build(args)
    rng = np.random.default_rng(0)
    length = args.length
    ids = rng.integers(0, config.vocab_size, (1, length), dtype=np.int32)
    chunk = args.chunk_size if args.mode == "mamba_sequential" else None
    max_len = length + args.decode_tokens + 1

    # warm-up: the timed call itself, once. A prefix of one chunk left compiles in the timed call: the slice of the
    # prompt into chunks (the prompt's shape is part of its key) and, where the length is no multiple of the
    # chunk size, the last chunk's shape
    jax.block_until_ready(model.prefill(ids, model.init_state(1, max_len=max_len), chunk_size=chunk)[0])
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    logits, state = model.prefill(ids, model.init_state(1, max_len=max_len), chunk_size=chunk)
    jax.block_until_ready(logits)
    prefill_seconds = time.perf_counter() - start
    row = {"mode": args.mode, "length": length, "chunk_size": chunk, "prefill_seconds": prefill_seconds,
           "prefill_tokens_per_s": length / prefill_seconds, "peak_rss_mb": _peak_rss_mb(),
           "baseline_rss_mb": baseline, "device_peak_mb": _device_peak_mb(), **jax_device()}
    if args.decode_tokens:
        # decode_tokens greedy tokens from the prefilled state in the jit-compiled loop (runtime.generation.decode);
        # the first call compiles it, then the median of DECODE_REPEATS calls from the same state is reported
        from experiments.models import decode_read_bytes, param_bytes
        from runtime.generation import decode

        decode(model, logits, state, max_new_tokens=args.decode_tokens, temperature=0.0)
        times = []
        for _ in range(DECODE_REPEATS):
            start = time.perf_counter()
            result = decode(model, logits, state, max_new_tokens=args.decode_tokens, temperature=0.0)
            times.append(time.perf_counter() - start)
        if result.steps != args.decode_tokens:
            raise RuntimeError(f"decoded {result.steps} tokens, expected {args.decode_tokens}")
        # per model step: decode_tokens tokens run decode_tokens - 1 of them (the last token is not fed)
        row["decode_ms_per_token"] = 1000 * sorted(times)[len(times) // 2] / (args.decode_tokens - 1)
        # batch-1 decode reads every weight once per token: its floor is weight_bytes / memory bandwidth
        row["weight_bytes"] = param_bytes(model)
        row["decode_read_bytes"] = decode_read_bytes(model)  # an untied input embedding is gathered, not read
        row["decode_weight_read_gb_per_s"] = row["decode_read_bytes"] / row["decode_ms_per_token"] / 1e6
        row["peak_rss_after_decode_mb"] = _peak_rss_mb()
    return row


def worker_argv(args, mode: str, length: int, decode_tokens: int) -> list[str]:
    """The arguments of main() that run one point (``--worker``) and print its row as the last line of JSON."""
    return ["--worker", "--mode", mode, "--length", str(length), "--decode-tokens", str(decode_tokens),
            "--chunk-size", str(args.chunk_size), "--mamba-preset", args.mamba_preset,
            "--falcon-preset", args.falcon_preset]


def run_point(args, mode: str, length: int, decode_tokens: int) -> dict | None:
    command = [sys.executable, "-m", "experiments.bench.long_context", *worker_argv(args, mode, length, decode_tokens)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {mode} at {length}: over {args.point_timeout} s, skipped", flush=True)
        return None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"  {mode} at {length}: failed ({tail[0][:160]})", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_csv(rows: list[dict], out: Path, argv=None) -> None:
    """long_context.csv of the points measured so far: rewritten after every point, so that a run stopped by a time
    limit (scripts/gpu_tier.sh's step) keeps what it measured; never written with no row (the last run's stays).
    With the first row, long_context.provenance.json (``argv``: the command's), its device the first point's: this
    process leaves the accelerator to the workers (starting JAX here would take its memory on a GPU)."""
    with open(out / "long_context.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    if len(rows) == 1:
        write_provenance(out / "long_context.csv", provenance("experiments.bench.long_context", argv, device={
            key: rows[0].get(key) for key in DEVICE_KEYS}))


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Writes the plots of ``rows`` to ``out``; returns their paths (none without matplotlib: the demo extra)."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[demo]')")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode in MODES:
        points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["length"])
        if not points:
            continue
        lengths = [p["length"] for p in points]
        axes[0].plot(lengths, [peak_mb(p) for p in points], "o-", label=mode, color=COLORS[mode])
        axes[1].plot(lengths, [p["prefill_seconds"] for p in points], "o-", label=mode, color=COLORS[mode])
        decode = [p for p in points if p.get("decode_ms_per_token")]
        if decode:
            axes[2].plot([p["length"] for p in decode], [p["decode_ms_per_token"] for p in decode], "o-", label=mode,
                         color=COLORS[mode])
    titles = (f"{memory_label(rows)} (MB)", "prefill time (s)", "decode time per token (ms) vs context")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt / context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "long_context.png", dpi=120)
    plt.close(fig)
    generated = [r for r in rows if r["mode"] in GENERATE_MODES]
    if not generated:
        return [out / "long_context.png"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in GENERATE_MODES:
        points = sorted((r for r in generated if r["mode"] == mode), key=lambda r: r["generated_tokens"])
        if points:
            counts = [p["generated_tokens"] for p in points]
            axes[0].plot(counts, [p["generate_ms_per_token"] for p in points], "o-", label=mode, color=COLORS[mode])
            axes[1].plot(counts, [peak_mb(p) for p in points], "o-", label=mode, color=COLORS[mode])
    for ax, title in zip(axes, ("time per generated token (ms)", f"{memory_label(generated)} (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "generation.png", dpi=120)
    plt.close(fig)
    return [out / "long_context.png", out / "generation.png"]


def sweep(args, mode: str) -> range:
    """The log2 lengths measured for ``mode``: every other power of two of the prompt up to the mode's limit, every
    power of the generated tokens (none where --generate-max-log2 is 0)."""
    if mode in GENERATE_MODES:
        limit = args.generate_max_log2 if mode == "mamba_generate" else \
            min(args.falcon_generate_max_log2, args.generate_max_log2)
        return range(args.generate_min_log2, limit + 1) if args.generate_max_log2 else range(0)
    limit = {"mamba_sequential": args.max_log2, "mamba_parallel": min(args.parallel_max_log2, args.max_log2),
             "falcon": min(args.falcon_max_log2, args.max_log2)}[mode]
    return range(args.min_log2, limit + 1, 2)


def check_args(parser: argparse.ArgumentParser, args, modes: list[str]) -> None:
    """parser.error, before any point runs or anything is written, for what would measure the wrong model or
    nothing: a preset of the other family (a transformer preset as --mamba-preset was timed under Falcon Mamba's
    labels) for the modes that use it, a sweep's upper end below its lower end, and modes with no point at all."""
    if any(m.startswith("mamba") for m in modes):
        check_preset(parser, "--mamba-preset", args.mamba_preset, "falcon_mamba")
    if any(m.startswith("falcon") for m in modes):
        check_preset(parser, "--falcon-preset", args.falcon_preset, "falcon")
    if set(modes) & set(MODES) and args.max_log2 < args.min_log2:
        parser.error(f"--max-log2: expected at least --min-log2 ({args.min_log2}), got {args.max_log2}")
    if set(modes) & set(GENERATE_MODES) and 0 < args.generate_max_log2 < args.generate_min_log2:
        parser.error(f"--generate-max-log2: expected 0 (no generation) or at least --generate-min-log2 "
                     f"({args.generate_min_log2}), got {args.generate_max_log2}")
    if args.decode_tokens == 1:
        parser.error("--decode-tokens: expected 0 (no decode) or at least 2 (N tokens run N - 1 model steps, the "
                     "last token is not fed: 1 token runs none to time), got 1")
    if not any(sweep(args, mode) for mode in modes):
        parser.error(f"--modes: expected a mode with a point to measure, got {','.join(modes)} with no point "
                     f"(prompt lengths up to each mode's --*max-log2, generation off at --generate-max-log2 0)")
    check_out_dir(parser, args.out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES + GENERATE_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mamba-preset", default="tiny_falcon_mamba")
    parser.add_argument("--falcon-preset", default="tiny_falcon")
    parser.add_argument("--min-log2", type=non_negative_int, default=10)
    parser.add_argument("--max-log2", type=non_negative_int, default=20)
    parser.add_argument("--falcon-max-log2", type=non_negative_int, default=14,
                        help="largest prompt for the transformer (its KV cache and prefill grow with length)")
    parser.add_argument("--parallel-max-log2", type=non_negative_int, default=18,
                        help="largest prompt for Falcon Mamba's whole-prompt (parallel) prefill")
    parser.add_argument("--chunk-size", type=positive_int, default=4096)
    parser.add_argument("--decode-tokens", type=non_negative_int, default=512,
                        help="tokens decoded after each prefill, timed per model step (N tokens run N - 1; "
                             "one jit-compiled loop); 0 skips them")
    parser.add_argument("--generate-min-log2", type=non_negative_int, default=10)
    parser.add_argument("--generate-max-log2", type=non_negative_int, default=17,
                        help="most tokens generated in measurement (2); 0 skips it")
    parser.add_argument("--falcon-generate-max-log2", type=non_negative_int, default=14,
                        help="most tokens the transformer generates in (2): each step attends over its whole KV "
                             "cache, so the sweep costs the square of this")
    parser.add_argument("--modes", default=",".join(MODES + GENERATE_MODES),
                        help="comma-separated subset of " + ", ".join(MODES + GENERATE_MODES))
    parser.add_argument("--point-timeout", type=positive_int, default=1800)
    parser.add_argument("--out", default="results/long_context")
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES + GENERATE_MODES))
    if unknown or not modes:
        parser.error(f"--modes: expected names from {', '.join(MODES + GENERATE_MODES)}, got "
                     f"{', '.join(unknown) if unknown else repr(args.modes)}")
    check_args(parser, args, modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in (m for m in MODES if m in modes):
        for log2 in sweep(args, mode):
            decode = args.decode_tokens if mode != "mamba_parallel" else 0
            row = run_point(args, mode, 2**log2, decode)
            if row is None:
                break  # longer prompts will not fit either
            rows.append(row)
            write_csv(rows, out, argv)
            extra = (f", decode {row['decode_ms_per_token']:.3f} ms/token (weights read at "
                     f"{row['decode_weight_read_gb_per_s']:.1f} GB/s)" if "decode_ms_per_token" in row else "")
            print(f"  {mode:17s} 2^{log2:<2d} tokens: prefill {row['prefill_seconds']:8.2f} s, "
                  f"{memory_label([row])} {peak_mb(row):8.0f} MB{extra}", flush=True)
    for mode in (m for m in GENERATE_MODES if m in modes):
        for log2 in sweep(args, mode):
            row = run_point(args, mode, 2**log2, 0)
            if row is None:
                break
            rows.append(row)
            write_csv(rows, out, argv)
            print(f"  {mode:17s} 2^{log2:<2d} generated: {row['generate_ms_per_token']:.3f} ms/token, "
                  f"{memory_label([row])} {peak_mb(row):8.0f} MB", flush=True)
    if not rows:  # a CSV of no rows would replace the last run's results with nothing
        raise SystemExit(f"error: no point was measured (each failed or ran out of time: see above); nothing "
                         f"written to {out}")
    plots = plot(rows, out)
    sequential = {r["length"]: r for r in rows if r["mode"] == "mamba_sequential"}
    if 2**14 in sequential and 2 ** args.max_log2 in sequential:
        ratio = peak_mb(sequential[2 ** args.max_log2]) / peak_mb(sequential[2**14])
        print(f"Falcon Mamba sequential prefill: {memory_label(rows)} at 2^{args.max_log2} / at 2^14 = {ratio:.3f}")
    decode = [r["decode_ms_per_token"] for r in sequential.values() if "decode_ms_per_token" in r]
    if decode:
        print(f"Falcon Mamba decode ms/token across contexts: min {min(decode):.4f}, max {max(decode):.4f} "
              f"(spread {max(decode) / min(decode) - 1:.1%})")
    for mode in GENERATE_MODES:
        points = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["generated_tokens"])
        if len(points) > 1:
            first, last = points[0], points[-1]
            print(f"{mode}: {first['generated_tokens']} -> {last['generated_tokens']} generated tokens: ms/token "
                  f"{first['generate_ms_per_token']:.3f} -> {last['generate_ms_per_token']:.3f}, "
                  f"{memory_label(points)} {peak_mb(first):.0f} -> {peak_mb(last):.0f} MB")
    print(f"wrote {', '.join(map(str, [out / 'long_context.csv', *plots]))}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
