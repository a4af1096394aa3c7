"""Held-out loss by position in long sequences: does the model use its context, and how far past its training
length? The long-context measurement of a language model (loss falling with position means the context helps).

    python -m experiments.position_loss PATH --token-file held_out.npy --length 65536 [--sequences 4]
        [--chunk-size 4096] [--step N] [--compute-dtype bfloat16] [--json out.json] [--mesh tensor=8]

PATH is a local Hugging Face directory or a training run's output_dir (then --step picks the checkpoint). The
token file is a 1-D .npy of ids (python -m experiments.tokenize_corpus writes one); its first --sequences windows of
--length tokens, one after another, are scored with model.log_likelihood, chunk by chunk (constant memory for
Falcon Mamba; a KV cache of --length for Falcon). Position p is the index of the predicted token in its window
(1 .. length - 1); the table gives the mean negative log-likelihood (nats) of the positions in [2^k, 2^(k+1)),
and the whole window's. Prints the table; --json also writes {"buckets": [{"start", "end", "tokens", "loss"}, ...],
"loss", "tokens", "sequences", "length", ...}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments.cli import MESH_HELP, check_output_file, error_line, parse_mesh
from experiments.data import load_tokens, load_vocab_tokens
from experiments.models import check_step, load_model, model_config
from runtime.checks import check_positive_int


TOKEN_FILE_FIELD = "config field 'data.token_file'"  # how experiments.data names the file; here it is a flag


def bucket_losses(nll: np.ndarray) -> list[dict]:
    """Mean NLL per power-of-two position bucket of ``nll`` (sequences, length - 1), whose column t scores the
    token at position t + 1: [{"start": 2^k, "end": min(2^(k+1), length), "tokens", "loss"}]."""
    length = nll.shape[1] + 1
    rows, start = [], 1
    while start < length:
        end = min(2 * start, length)
        block = nll[:, start - 1:end - 1]
        rows.append({"start": start, "end": end, "tokens": int(block.size), "loss": float(block.mean())})
        start = end
    return rows


def check_enough_tokens(size: int, sequences: int, length: int) -> None:
    if sequences * length > size:
        raise ValueError(f"--sequences x --length: expected at most the file's {size} tokens, got "
                         f"{sequences} x {length} = {sequences * length}")


def windows(token_file: str, vocab_size: int, sequences: int, length: int) -> np.ndarray:
    """The first ``sequences`` consecutive windows of ``length`` ids of ``token_file``: (sequences, length) int32."""
    tokens = load_vocab_tokens(token_file, vocab_size)
    check_enough_tokens(tokens.size, sequences, length)
    return np.asarray(tokens[:sequences * length], np.int32).reshape(sequences, length)


def position_loss(model, ids: np.ndarray, chunk_size: int | None, batch_size: int = 1) -> np.ndarray:
    """-log p of each token given the ones before it in its row: (sequences, length - 1) float64, scored
    ``batch_size`` rows at a time."""
    return np.concatenate([-np.asarray(model.log_likelihood(ids[i:i + batch_size], chunk_size=chunk_size), np.float64)
                           for i in range(0, len(ids), batch_size)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="local HF directory, or a training run's output_dir")
    parser.add_argument("--token-file", required=True, help="1-D .npy of token ids (held-out text)")
    parser.add_argument("--length", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences scored at once")
    parser.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk size (tokens)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: newest)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--json", default=None, help="also write the result to this path")
    parser.add_argument("--mesh", default=None, help=MESH_HELP)
    args = parser.parse_args(argv)
    mesh = parse_mesh("--mesh", args.mesh)
    try:  # everything that needs no model first
        for flag in ("length", "sequences", "batch_size", "chunk_size"):
            check_positive_int(f"--{flag.replace('_', '-')}", getattr(args, flag))
        if args.length < 2:
            raise ValueError(f"--length: expected at least 2 (a token and the one it predicts), got {args.length}")
        if args.json:
            check_output_file("--json", args.json)
        check_enough_tokens(load_tokens(args.token_file)[0].size, args.sequences, args.length)
        check_step(args.path, args.step)
        load_vocab_tokens(args.token_file, model_config(args.path).vocab_size)  # ids past the vocabulary, unloaded
        model, step = load_model(args.path, args.step, args.compute_dtype, mesh)
        ids = windows(args.token_file, model.config.vocab_size, args.sequences, args.length)
    except (ValueError, FileNotFoundError) as err:  # ConfigError and CheckpointError are ValueErrors
        raise SystemExit(error_line(err, {"step": "--step", TOKEN_FILE_FIELD: "--token-file"}, mesh=args.mesh))
    start = time.perf_counter()
    nll = position_loss(model, ids, args.chunk_size, args.batch_size)
    seconds = time.perf_counter() - start
    result = {"path": str(args.path), "step": step, "token_file": args.token_file, "length": args.length,
              "sequences": args.sequences, "chunk_size": args.chunk_size, "tokens": int(nll.size),
              "loss": float(nll.mean()), "buckets": bucket_losses(nll), "seconds": seconds}
    print(f"{'positions':>21} {'tokens':>10} {'loss (nats)':>12}")
    for row in result["buckets"]:
        print(f"{row['start']:>10}..{row['end'] - 1:<9} {row['tokens']:>10} {row['loss']:12.4f}")
    print(f"{'all':>21} {result['tokens']:>10} {result['loss']:12.4f}   ({seconds:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
