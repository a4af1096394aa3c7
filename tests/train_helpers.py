"""Running the training CLI in a subprocess with a given number of fake CPU devices (the test process
itself keeps its single device). Runs in one test session share a persistent compilation cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small enough to compile in seconds on a 2-core CPU: one layer for Falcon Mamba, two for Falcon.
TINY = {
    "tiny_falcon_mamba": ["model.num_hidden_layers=1", "data.seq_len=16", "data.batch_size=8"],
    "tiny_falcon": ["model.num_hidden_layers=2", "data.seq_len=16", "data.batch_size=8"],
}


def cli_env(devices: int, cache_dir: Path) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONPATH": str(ROOT)}


def train_argv(preset: str, output_dir: Path, *overrides: str) -> list[str]:
    """The training CLI's arguments (experiments.train.main's argv)."""
    return [preset, f"output_dir={output_dir}", *TINY[preset], *overrides]


def train_command(preset: str, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", *train_argv(preset, output_dir, *overrides)]


def run_train(preset: str, output_dir: Path, *overrides: str, devices: int = 1, cache_dir: Path,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(preset, output_dir, *overrides), env=cli_env(devices, cache_dir), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
