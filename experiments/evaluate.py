"""Held-out accuracy of a training run on its own synthetic task.

    python -m experiments.evaluate OUTPUT_DIR [--step N] [--sequences 1024] [--batch-size 64] [--mesh tensor=8]
        [key=value ...]
    python -m experiments.evaluate runs/selective_copying_falcon_mamba data.seq_len=512

Loads the run's checkpoint (default: the newest) and its config.yaml, draws ``--sequences`` sequences of the
run's task (data.task, data.seq_len, data.num_items; key=value overrides change them, e.g. a longer
data.seq_len) from seeds no training batch uses (for data.task "bytes" and "tokens", which read their corpus
rather than a seed, from text the run did not train on: a bytes run needs data.text_dir=DIR or data.text_glob=GLOB
naming other files, a tokens run another data.token_file; a run of a synthetic task never read a corpus; and no
more sequences than the windows that corpus holds, so none is scored twice), and
compares argmax of the logits with the targets wherever the task's loss mask is set. Prints and returns
{"token_accuracy", "sequence_accuracy" (every masked token of the sequence right), "loss" (the mean cross entropy
of the masked tokens, nats; exp of it is the perplexity), "sequences", "tokens", "task", "seq_len", "step"};
``--json PATH`` also writes it. The arguments, the overrides and the task's limits are checked before the model
is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import load_config
from configs.schema import ConfigError
from experiments.cli import MESH_HELP, check_output_file, error_line, parse_mesh
from experiments.data import batch_at, check_data, corpus_files, stream_windows
from experiments.train import load_trained_model, run_config_path
from runtime.checks import check_positive_int

# Evaluation batches are drawn with seed run.seed + EVAL_SEED_OFFSET: never a (seed, step) of a training batch.
EVAL_SEED_OFFSET = 1_000_003
# The fp32 logits one call of the model may make: a batch's rows are scored as many at a time as fit (at least
# one). The whole batch's were made at once, with a log_softmax copy: 34 GB each at 64 x 2048 x 65,024.
LOGITS_BYTES = 1 << 30


@jax.jit
def _scores(logits, targets):
    """(the model's top token, log p(target)) at each position, no log_softmax copy of the logits made."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1), picked - jax.nn.logsumexp(logits, axis=-1)


def check_held_out(trained, evaluated) -> None:
    """The seed offset keeps the synthetic tasks' evaluation sequences out of training; the bytes and tokens tasks
    read their corpus whatever the seed, and a run of either trains on all of it: its evaluation needs other text.
    A run trained on a synthetic task never read a corpus: any text is held out for it."""
    def files(data):  # the files themselves: "" is the standard library's directory, paths may be spelt apart
        return {path.resolve() for path in corpus_files(data.text_dir, data.text_glob)}

    if evaluated.task == "bytes" and trained.task == "bytes" and files(evaluated) & files(trained):
        raise ConfigError(f"config field 'data.text_dir': the bytes task trains on every byte of its corpus, so "
                          f"held-out text must come from elsewhere: expected a data.text_dir / data.text_glob "
                          f"sharing no file with the run's ({trained.text_dir!r} / {trained.text_glob!r}), got "
                          f"{evaluated.text_dir!r} / {evaluated.text_glob!r}")
    if (evaluated.task == "tokens" and trained.task == "tokens"
            and Path(evaluated.token_file).resolve() == Path(trained.token_file).resolve()):
        raise ConfigError(f"config field 'data.token_file': the tokens task trains on every token of its file, so "
                          f"held-out text must come from another: expected another file than the run's "
                          f"{trained.token_file!r}, got {evaluated.token_file!r}")


def masked_accuracy(model, data_config, *, sequences: int, batch_size: int, seed: int) -> dict:
    """Token and sequence accuracy of ``model`` on ``sequences`` sequences of ``data_config``'s task (its
    batch_size and grad_accum are replaced by ``batch_size``, at most ``sequences``, and 1; no length
    curriculum)."""
    if sequences <= 0 or batch_size <= 0:
        raise ValueError(f"sequences, batch_size: expected positive integers, got {sequences}, {batch_size}")
    batch_size = min(batch_size, sequences)  # no rows made only to be cut (the first rows are the same for bytes)
    vocab = model.config.vocab_size
    right = total = seq_right = done = index = 0
    nll = 0.0
    while done < sequences:
        # the last batch is generated whole and cut: at a smaller batch_size, the bytes task's windows would start
        # inside the previous batch's
        rows = min(batch_size, sequences - done)
        config = dataclasses.replace(data_config, batch_size=batch_size, grad_accum=1, length_curriculum=())
        batch = {name: array[0, :rows] for name, array in batch_at(config, vocab, seed, index).items()}
        step = max(1, LOGITS_BYTES // (batch["inputs"].shape[1] * vocab * 4))
        predicted, logp = (np.concatenate(parts) for parts in zip(*(
            _scores(model(batch["inputs"][i:i + step]), batch["targets"][i:i + step]) for i in range(0, rows, step))))
        mask = batch["mask"] > 0
        nll -= float(np.sum(logp * mask, dtype=np.float64))
        hit = (predicted == batch["targets"]) & mask
        right, total = right + int(hit.sum()), total + int(mask.sum())
        seq_right += int(np.sum(hit.sum(axis=1) == mask.sum(axis=1)))
        done, index = done + rows, index + 1
    return {"token_accuracy": right / total, "sequence_accuracy": seq_right / sequences, "loss": nll / total,
            "sequences": sequences, "tokens": total}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a training run's output_dir (has config.yaml and checkpoints/)")
    p.add_argument("overrides", nargs="*", help="key=value changes to the run's data config (data.seq_len=512)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--sequences", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the result to this path")
    p.add_argument("--mesh", default=None, help=MESH_HELP)
    return p.parse_intermixed_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in args.overrides if not item.startswith("data.")]
    if bad:
        raise SystemExit(f"error: overrides: expected data.KEY=VALUE items, got {bad}")
    mesh = parse_mesh("--mesh", args.mesh)
    try:  # everything that can be checked before the model is loaded
        check_positive_int("--sequences", args.sequences)
        check_positive_int("--batch-size", args.batch_size)
        if args.json:
            check_output_file("--json", args.json)
        config_path = run_config_path(args.output_dir)
        trained = load_config(config_path, [])
        run = load_config(config_path, args.overrides)
        # the sequences masked_accuracy draws: one row at a time is enough for the task's limits
        check_data(dataclasses.replace(run.data, batch_size=1, grad_accum=1, length_curriculum=()),
                   run.model.vocab_size)
        check_held_out(trained.data, run.data)
        windows = stream_windows(run.data)
        if windows is not None and args.sequences > windows:  # more would wrap around and score text twice
            raise ValueError(f"--sequences: expected at most {windows} (the windows of data.seq_len "
                             f"{run.data.seq_len} the held-out corpus holds, each scored once), got "
                             f"{args.sequences}")
        model, step = load_trained_model(args.output_dir, args.step, mesh=mesh)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        raise SystemExit(error_line(err, {"step": "--step"}, mesh=args.mesh))
    result = masked_accuracy(model, run.data, sequences=args.sequences, batch_size=args.batch_size,
                             seed=run.seed + EVAL_SEED_OFFSET)
    result.update(task=run.data.task, seq_len=run.data.seq_len, step=step)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
