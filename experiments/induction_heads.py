"""Induction heads, the Mamba paper's length-extrapolation experiment (Gu & Dao 2023, section 4.1.2, Table 2).

    python -m experiments.induction_heads                       # what `make demo` runs (2-core CPU: about 20 minutes)
    python -m experiments.induction_heads --steps 3000 --eval-sequences 256 --min-sequences 16

Trains a 2-layer Falcon Mamba (d_model 64, configs/induction_heads_falcon_mamba.yaml) and a 2-layer Falcon
transformer with RoPE of about the same size (configs/induction_heads_falcon.yaml) on the induction task at
sequence length 256 (vocabulary 16, loss only on the final answer token), through experiments.train, under
OUTPUT_DIR/falcon_mamba and OUTPUT_DIR/falcon (a run that already has its checkpoint is not retrained). Then
measures the accuracy of the answer predicted from the last-position logits at lengths 2^MIN_LOG2 ..
2^MAX_LOG2: Falcon Mamba by chunked prefill (constant memory whatever the length), the transformer by
chunked prefill into a KV cache of the sequence's length, up to 2^FALCON_MAX_LOG2 (attention is quadratic).

Writes OUTPUT_DIR/summary.json ({"train_length": 256, "falcon_mamba": {"<length>": accuracy, ...},
"falcon": {...}}), details.json (sequences, seconds and tokens/s per point, the training runs), summary.md
(the table, also printed) and accuracy.png (accuracy against log2 length).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import load_config
from configs.schema import ConfigError, DataConfig
from experiments.checkpointing import Checkpointer
from experiments.data import TRIGGER_TOKEN, batch_at
from experiments.evaluate import EVAL_SEED_OFFSET
from experiments.models import n_params
from experiments.train import load_trained_model, train

MODELS = ("falcon_mamba", "falcon")


def model_label(name: str, model_config=None) -> str:
    """The label of run ``name`` in the log, the table and the plot: "Falcon Mamba", or the transformer with the
    position encoding of its ``model_config`` ("Falcon (RoPE attention)", "Falcon (ALiBi attention)"; "Falcon"
    without one). An ALiBi --falcon-preset was labelled RoPE."""
    if name == "falcon_mamba":
        return "Falcon Mamba"
    if model_config is None:
        return "Falcon"
    return f"Falcon ({'ALiBi' if model_config.alibi else 'RoPE'} attention)"


def curriculum_stages(text: str) -> list[list[int]]:
    """--curriculum's value: 'LEN:STEPS,...' -> [[LEN, STEPS], ...], 'none' -> [] (argparse reports the error)."""
    if text == "none":
        return []
    try:
        stages = [[int(x) for x in stage.split(":")] for stage in text.split(",")]
    except ValueError:
        stages = []
    if not stages or any(len(stage) != 2 for stage in stages):
        raise argparse.ArgumentTypeError(f"expected LEN:STEPS,... (e.g. 32:1000,64:1000) or 'none', got {text!r}")
    return stages


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="results/induction_heads")
    p.add_argument("--falcon-mamba-preset", default="induction_heads_falcon_mamba")
    p.add_argument("--falcon-preset", default="induction_heads_falcon")
    p.add_argument("--steps", type=int, default=None, help="training steps of both models (default: presets)")
    p.add_argument("--falcon-steps", type=int, default=None, help="training steps of the transformer only")
    p.add_argument("--batch-size", type=int, default=None, help="default: the presets'")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the presets'")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: the presets'")
    p.add_argument("--train-length", type=int, default=256)
    p.add_argument("--curriculum", type=curriculum_stages, default=None, metavar="LEN:STEPS,...",
                   help="shorter-sequence stages trained first, e.g. 32:1000,64:1000 ('none': train at "
                        "--train-length throughout; default: the presets' data.length_curriculum)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override for both runs (repeatable)")
    p.add_argument("--min-log2", type=int, default=6)
    p.add_argument("--max-log2", type=int, default=20)
    p.add_argument("--falcon-max-log2", type=int, default=12,
                   help="longest transformer evaluation (its prefill slows with length: on a 2-core CPU "
                        "2.2k tokens/s at 2^12, 0.9k at 2^14; docs/EXPERIMENTS.md)")
    p.add_argument("--eval-sequences", type=int, default=64, help="sequences per point (short lengths)")
    p.add_argument("--eval-tokens", type=int, default=1 << 22,
                   help="token budget per point: long lengths use max(min-sequences, eval-tokens / length)")
    p.add_argument("--falcon-eval-tokens", type=int, default=1 << 16,
                   help="token budget per point of the transformer")
    p.add_argument("--min-sequences", type=int, default=4, help="fewest sequences at any length")
    p.add_argument("--eval-batch", type=int, default=32, help="rows per prefill call")
    p.add_argument("--chunk-size", type=int, default=1 << 15, help="prefill chunk (Falcon Mamba)")
    p.add_argument("--falcon-chunk-size", type=int, default=1024, help="prefill chunk (transformer)")
    p.add_argument("--skip-falcon", action="store_true", help="train and evaluate Falcon Mamba only")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "falcon_steps"):  # -3 was a ConfigError naming optim.warmup_steps, 0 one naming steps
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    for name in ("train_length", "eval_sequences", "eval_tokens", "falcon_eval_tokens", "min_sequences", "eval_batch",
                 "chunk_size",
                 "falcon_chunk_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not 2 <= args.min_log2 <= args.max_log2:
        p.error(f"--min-log2/--max-log2: expected 2 <= min <= max, got {args.min_log2}, {args.max_log2}")
    if args.falcon_max_log2 < args.min_log2 and not args.skip_falcon:  # the transformer would evaluate nothing
        p.error(f"--falcon-max-log2: expected >= --min-log2 ({args.min_log2}), got {args.falcon_max_log2}")
    return args


def run_config(preset: str, args: argparse.Namespace, name: str, steps: int | None):
    overrides = [f"output_dir={Path(args.output_dir) / name}", f"seed={args.seed}", "data.task=induction",
                 f"data.seq_len={args.train_length}"] + list(args.set)
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.learning_rate is not None:
        overrides.append(f"optim.learning_rate={args.learning_rate}")
    if args.warmup_steps is not None:
        overrides.append(f"optim.warmup_steps={args.warmup_steps}")
    if args.curriculum is not None:
        overrides.append(f"data.length_curriculum={json.dumps(args.curriculum)}")
    if steps is not None:  # the preset's step counts that no longer fit scale with steps
        run = load_config(preset, overrides)
        scale = steps / run.steps
        warmup = run.optim.warmup_steps if run.optim.warmup_steps < steps else steps // 10
        overrides += [f"steps={steps}", f"optim.warmup_steps={warmup}"]
        if run.optim.decay_steps > steps - warmup:
            overrides.append(f"optim.decay_steps={min(int(run.optim.decay_steps * scale), steps - warmup)}")
        if args.curriculum is None and sum(n for _, n in run.data.length_curriculum) >= steps:
            # each stage at least a step, and only the first stages that leave a step at data.seq_len: --steps 1
            # and 2 were a ConfigError on the preset's stages (1 step each), which the user never set
            stages = []
            for length, n in run.data.length_curriculum:
                n = max(1, int(n * scale))
                if sum(m for _, m in stages) + n >= steps:
                    break
                stages.append([length, n])
            overrides.append(f"data.length_curriculum={json.dumps(stages)}")
    return load_config(preset, overrides)


def checkpoint_step(run) -> int:
    """The newest checkpoint's step of ``run``'s output_dir (0: none), where train() resumes."""
    directory = Path(run.output_dir) / "checkpoints"
    if not directory.is_dir():
        return 0
    checkpointer = Checkpointer(directory, run.keep_checkpoints, create=False)
    try:
        return checkpointer.latest_step() or 0
    finally:
        checkpointer.close()


def sequences_at(length: int, args: argparse.Namespace, name: str = "falcon_mamba") -> int:
    budget = args.eval_tokens if name == "falcon_mamba" else args.falcon_eval_tokens
    return max(args.min_sequences, min(args.eval_sequences, budget // length))


def induction_batch(vocab_size: int, length: int, batch: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids (batch, length), answers (batch,)) of the induction task at ``length``."""
    data = batch_at(DataConfig(task="induction", seq_len=length, batch_size=batch), vocab_size, seed, index)
    return data["inputs"][0], data["targets"][0, :, -1]


def evaluate(model, length: int, n_sequences: int, *, seed: int, eval_batch: int, chunk_size: int,
             kv_cache: bool) -> dict:
    """Accuracy of argmax(last-position logits) == answer over ``n_sequences`` sequences of ``length``, with
    the answer's logit margin (its logit minus the best other logit; negative = a miss): the smallest and the
    median, and the misses by distance from the remembered token to the end (the sequences split in halves:
    nearer, farther)."""
    margins, distances = [], []
    done, index = 0, 0
    start = time.perf_counter()
    vocab = model.config.vocab_size
    while done < n_sequences:
        rows = min(eval_batch, n_sequences - done)
        ids, answers = induction_batch(vocab, length, rows, seed + EVAL_SEED_OFFSET + length, index)
        state = model.init_state(rows, max_len=length if kv_cache else None)
        logits, _ = model.prefill(ids, state, chunk_size=min(chunk_size, length))
        logits = np.array(logits, np.float32)
        right = logits[np.arange(rows), answers]
        logits[np.arange(rows), answers] = -np.inf
        margins.append(right - logits.max(axis=-1))
        distances.append(length - np.argmax(ids == TRIGGER_TOKEN, axis=1))  # the remembered token is p + 1
        done, index = done + rows, index + 1
    seconds = time.perf_counter() - start
    margins, distances = np.concatenate(margins), np.concatenate(distances)
    farther = np.argsort(distances, kind="stable")[n_sequences // 2:]
    return {"accuracy": float(np.mean(margins > 0)), "sequences": n_sequences, "seconds": round(seconds, 3),
            "tokens_per_s": round(n_sequences * length / seconds),
            "min_margin": round(float(margins.min()), 3), "median_margin": round(float(np.median(margins)), 3),
            "misses_farther_half": int(np.sum(margins[farther] <= 0)),
            "misses": int(np.sum(margins <= 0))}


# ----------------------------------------------------------------------------------------------------------
# Analysis helpers (the notebook uses them): SSM state norms along a long prompt, and the mixers' dt.


def ssm_state_norms(model, input_ids, chunk_size: int) -> dict:
    """Runs ``input_ids`` (batch, seq) through Falcon Mamba chunk by chunk with prefill and returns, after each
    chunk, the Frobenius norm of every layer's SSM state (state.layers[i].ssm), averaged over the batch:
    {"positions": (n_chunks,), "norms": (n_layers, n_chunks)}."""
    batch, length = input_ids.shape
    state = model.init_state(batch)
    positions, norms = [], []
    for begin in range(0, length, chunk_size):
        _, state = model.prefill(input_ids[:, begin:begin + chunk_size], state)
        positions.append(min(begin + chunk_size, length))
        norms.append([float(jnp.mean(jnp.linalg.norm(layer.ssm.reshape(batch, -1), axis=-1)))
                      for layer in state.layers])
    return {"positions": np.asarray(positions), "norms": np.asarray(norms).T}


@nnx.jit
def _dt_per_layer(model, input_ids):
    h = model.embeddings(input_ids)
    dts = []
    for layer in model.layers:
        dts.append(layer.mixer.step_sizes(layer.norm(h)))
        h, _ = layer(h)
    return jnp.stack(dts)


def mixer_dt(model, input_ids) -> np.ndarray:
    """The selective step size dt = softplus(dt_proj(x) + bias) of every layer's mixer along a plain forward
    (ssm.model.MambaMixer.step_sizes): float32 (n_layers, batch, seq, d_inner)."""
    return np.asarray(_dt_per_layer(model, jnp.asarray(input_ids, jnp.int32)))


# ----------------------------------------------------------------------------------------------------------


def run_labels(details: dict) -> dict[str, str]:
    """name -> label of each model, as its run recorded it in ``details``."""
    return {name: details["runs"].get(name, {}).get("label", model_label(name)) for name in MODELS}


def markdown_table(summary: dict, details: dict) -> str:
    lengths = sorted({int(k) for name in MODELS for k in summary.get(name, {})})
    lines = ["| length | log2 | " + " | ".join(f"{label} | sequences" for label in run_labels(details).values()) + " |",
             "|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        cells = [f"{length:,}", str(int(math.log2(length)))]
        for name in MODELS:
            point = details["points"].get(name, {}).get(str(length))
            cells += ([f"{100 * point['accuracy']:.1f}%", str(point["sequences"])] if point else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, labels: dict[str, str]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, label in labels.items():
        points = sorted((int(k), v) for k, v in summary.get(name, {}).items())
        if points:
            ax.plot([math.log2(k) for k, _ in points], [100 * v for _, v in points], "o-", label=label)
    ax.axvline(math.log2(summary["train_length"]), color="gray", ls="--", lw=1, label="train length")
    ax.set_xlabel("log2 sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Induction heads: length extrapolation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = ["falcon_mamba"] + ([] if args.skip_falcon else ["falcon"])
    presets = {"falcon_mamba": args.falcon_mamba_preset, "falcon": args.falcon_preset}
    steps_of = {"falcon_mamba": args.steps, "falcon": args.steps if args.falcon_steps is None else args.falcon_steps}
    try:  # every run's config checked before the first one trains
        runs = {name: run_config(presets[name], args, name, steps_of[name]) for name in names}
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    for name, run in runs.items():  # a preset of the other family would train, then be evaluated as this one
        if run.model.family != name:
            raise SystemExit(f"error: --{name.replace('_', '-')}-preset: expected a preset of model.family "
                             f"{name!r}, got {presets[name]!r} (model.family {run.model.family!r})")
    # the length actually trained (both runs have it): --set data.seq_len=... comes after --train-length in the
    # overrides and wins, where the summary, the table and the plot said --train-length's
    train_length = runs["falcon_mamba"].data.seq_len
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    details: dict = {"train_length": train_length, "runs": {}, "points": {}, "eval": {
        k: getattr(args, k) for k in ("min_log2", "max_log2", "falcon_max_log2", "eval_sequences", "eval_tokens",
                                      "falcon_eval_tokens", "min_sequences", "eval_batch", "chunk_size",
                                      "falcon_chunk_size")},
        "backend": jax.default_backend(), "jax": jax.__version__}
    summary: dict = {"train_length": train_length, "falcon_mamba": {}, "falcon": {}}
    for name in names:
        run = runs[name]
        t0 = time.perf_counter()
        curriculum = [list(stage) for stage in run.data.length_curriculum]
        stages = "".join(f"{steps_} x {length}, " for length, steps_ in curriculum)
        print(f"== training {model_label(name, run.model)}: {run.steps} steps ({stages}then {run.data.seq_len}), "
              f"batch {run.data.batch_size}, lr {run.optim.learning_rate} -> {run.output_dir}", flush=True)
        start = checkpoint_step(run)  # a resumed run trains (and is timed on) only the steps from there
        try:
            rows = train(run)
        except ConfigError as err:  # a resume refused (fewer --steps than its checkpoint, another config)
            raise SystemExit(f"error: {err}") from None
        train_seconds = time.perf_counter() - t0
        model, step = load_trained_model(run.output_dir)
        final = rows[-1] if rows else None
        tokens = run.data.batch_size * sum(run.data.seq_len_at(s) for s in range(start, run.steps))
        details["runs"][name] = {"output_dir": run.output_dir, "preset": presets[name],
                                 "label": model_label(name, run.model), "steps": step,
                                 "length_curriculum": curriculum, "train_length": run.data.seq_len,
                                 "batch_size": run.data.batch_size, "learning_rate": run.optim.learning_rate,
                                 "parameters": n_params(model), "train_seconds": round(train_seconds, 1),
                                 "final_loss": None if final is None else final["loss"],
                                 "train_tokens_per_s": round(tokens / train_seconds) if rows else None}
        loss = "(already trained)" if final is None else f"{final['loss']:.4f}"
        print(f"   {n_params(model):,} parameters; {train_seconds:.0f} s; last logged loss {loss}", flush=True)
        top = args.max_log2 if name == "falcon_mamba" else min(args.max_log2, args.falcon_max_log2)
        details["points"][name] = {}
        for log2 in range(args.min_log2, top + 1):
            length = 1 << log2
            point = evaluate(model, length, sequences_at(length, args, name), seed=args.seed,
                             eval_batch=args.eval_batch,
                             chunk_size=args.chunk_size if name == "falcon_mamba" else args.falcon_chunk_size,
                             kv_cache=name == "falcon")
            summary[name][str(length)] = point["accuracy"]
            details["points"][name][str(length)] = point
            print(f"   length 2^{log2:<2d} {length:>9,}: accuracy {100 * point['accuracy']:5.1f}% over "
                  f"{point['sequences']} sequences, smallest margin {point['min_margin']:.1f}, misses "
                  f"{point['misses']} ({point['misses_farther_half']} in the farther half) "
                  f"({point['seconds']:.1f} s, {point['tokens_per_s']:,} tokens/s)",
                  flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    details["total_seconds"] = round(time.perf_counter() - began, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    table = markdown_table(summary, details)
    (out / "summary.md").write_text(f"# Induction heads (trained at length {train_length})\n\n{table}")
    plotted = not args.no_plot and plot(summary, out / "accuracy.png", run_labels(details))
    print("\n" + table)
    print(f"wrote {out / 'summary.json'}, details.json, summary.md" + (", accuracy.png" if plotted else "")
          + f" in {details['total_seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
