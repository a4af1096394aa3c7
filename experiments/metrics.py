"""Where training metrics go: output_dir/metrics.jsonl, TensorBoard event files (output_dir/tensorboard) and,
on a terminal, a progress bar. Only process 0 writes; the other processes get a writer that does nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from tqdm import tqdm

from runtime.files import write_failure, write_text_atomic


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] where there is none). A last line without its newline (a write cut short
    by a crash) is skipped; any other line that is not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")  # the last item is "" after a complete last line
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: expected a JSON metrics row, got {line[:80]!r} ({err})") from None
    return rows


class MetricsWriter:
    def __init__(self, output_dir: str | Path, start_step: int, total_steps: int):
        """Keeps the rows of metrics.jsonl up to ``start_step`` (a resumed run rewrites what followed)."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(output_dir) / "tensorboard"
        kept = [row for row in read_metrics(self.path) if row["step"] <= start_step]
        try:  # errors name the file (a full disk's OSError names none)
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))  # a crash keeps the rows
            self.file = open(self.path, "a")
        except OSError as err:
            raise write_failure("", self.path, err) from err
        # imported here: it imports torch where that is installed (seconds); only process 0 writes TensorBoard files
        from tensorboardX import SummaryWriter

        try:
            self.tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1)
        except OSError as err:
            self.file.close()
            raise write_failure("", self.tensorboard_dir, err) from err
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True) \
            if sys.stdout.isatty() else None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as err:
            raise write_failure(f"step {row['step']}'s row to", self.path, err) from err
        try:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, row["step"])
        except OSError as err:
            raise write_failure(f"step {row['step']}'s scalars to", self.tensorboard_dir, err) from err
        if self.bar is not None:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tokens_per_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        errors = []
        for close, path in ((self.file.close, self.path), (self.tensorboard.close, self.tensorboard_dir)):
            try:  # both closed, whichever fails (a full disk fails a flush)
                close()
            except OSError as err:
                errors.append(write_failure("", path, err))
        if errors:
            raise errors[0]
