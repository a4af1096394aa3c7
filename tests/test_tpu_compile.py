"""The Pallas scan's TPU kernels through Mosaic's and XLA's TPU compilers, on this CPU (experiments/bench/tpu_compile.py).

Compiled ahead of time for a one-chip v6e topology with libtpu (``make test`` installs it in .venv/libtpu): a
construct Mosaic's layout passes reject fails here. The kernels' static cycle estimates are held to the
channel-dense kernels' level: the channel-sparse ones they replaced (one sublane of a register per dstate row)
were estimated at 51 (forward) and 141 (backward) cycles per step of 128 channels, these at 9 and 31 at this
one-tile shape (docs/GPU.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench.tpu_compile import libtpu_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(libtpu_path() is None, reason="libtpu is not installed (`make test` installs it)")
def test_tpu_kernels_compile_channel_dense(tmp_path):
    out = tmp_path / "cycles.json"
    # one program (8 rows of 128 channels), one tile of 64 steps: the grid libtpu's estimate walks stays small
    result = subprocess.run([sys.executable, "-m", "experiments.bench.tpu_compile", "--chip", "v6e", "--seqlen", "64",
                             "--dim", "1024", "--json", str(out)], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_kind"].startswith("TPU v6")
    cycles = report["cycles"]
    assert set(cycles) == {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"}
    lane_steps = 64 * 1024 / 128
    assert cycles["selective_scan_fwd_tpu"] / lane_steps < 15, cycles
    assert cycles["selective_scan_bwd_tpu"] / lane_steps < 45, cycles
    assert cycles["selective_scan_bwd_tpu"] > cycles["selective_scan_fwd_tpu"], cycles
