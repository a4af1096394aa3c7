"""Writes a training run's model as a Hugging Face directory that transformers and from_pretrained load.

    python -m experiments.export RUN_DIR OUT_DIR [--step N]

The checkpoint's parameters (fp32 master weights; the optimizer state is not read) go to OUT_DIR as config.json
and safetensors, streamed tensor by tensor and sharded past 5 GiB (the family's save_pretrained). A run started
from a Hugging Face directory (init_from) gets that directory's tokenizer files copied beside them, so
`python -m experiments.generate OUT_DIR --prompt ...` works on the result.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from configs import load_config
from experiments.cli import error_line
from experiments.models import family_of
from experiments.train import load_trained_model, run_config_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> tuple[int, list[str]]:
    """Writes ``run_dir``'s model at checkpoint ``step`` (default: the newest) to ``out_dir``; returns (the step,
    the tokenizer files copied from the run's init_from)."""
    run = load_config(run_config_path(run_dir), [])
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(run_dir).resolve():
        raise ValueError(f"out_dir: expected another directory than the run's, got {str(out_dir)!r}")
    if run.init_from and out_dir.resolve() == Path(run.init_from).resolve():  # its weights would be overwritten
        raise ValueError(f"out_dir: expected another directory than the run's init_from (the checkpoint it started "
                         f"from), got {str(out_dir)!r}")
    if out_dir.exists() and not out_dir.is_dir():  # found before the model is loaded, not by save_pretrained
        raise ValueError(f"out_dir: expected a directory (new or existing), got {str(out_dir)!r}, which is a file")
    model, step = load_trained_model(run_dir, step)
    try:
        family_of(model.config).save_pretrained(model, out_dir)
    except OSError as err:  # under a file, not writable, the disk full: named by the argument, not [Errno N] alone
        raise ValueError(f"out_dir: expected a directory this process can create and write, got {str(out_dir)!r} "
                         f"({err})") from None
    copied = []
    for name in TOKENIZER_FILES if run.init_from else ():
        if (Path(run.init_from) / name).is_file():
            shutil.copyfile(Path(run.init_from) / name, out_dir / name)
            copied.append(name)
    return step, copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run's output_dir (config.yaml + checkpoints/)")
    parser.add_argument("out_dir", help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    try:
        step, copied = export(args.run_dir, args.out_dir, args.step)
    except (ValueError, OSError) as err:  # ConfigError, CheckpointError: ValueErrors; OSError: a tokenizer file copy
        print(error_line(err, {"step": "--step", "output_dir": "run_dir"}), file=sys.stderr)
        return 1
    print(f"wrote checkpoint step {step} of {args.run_dir} to {args.out_dir}"
          + (f" with {', '.join(copied)} from its init_from" if copied else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
