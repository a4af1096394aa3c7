"""The Pallas scan's TPU kernels through Mosaic's and XLA's TPU compilers on this CPU (experiments/bench/tpu_compile).

Compiled ahead of time for one-chip v6e and v5p topologies with libtpu (``make test`` installs it in .venv/libtpu): a
construct Mosaic's layout passes reject fails here. The kernels' static cycle estimates are held to the
channel-dense kernels' level: the channel-sparse ones they replaced (one sublane of a register per dstate row)
were estimated on v6e at 51 (forward) and 141 (backward) cycles per step of 128 channels, these at 7 and 30
(docs/GPU.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.tpu_topology import libtpu_path
from tests.test_bench_checks import read_provenance

ROOT = Path(__file__).resolve().parent.parent


def compile_report(tmp_path, chip, *options):
    out = tmp_path / f"{chip}.json"
    result = subprocess.run([sys.executable, "-m", "experiments.bench.tpu_compile", "--chip", chip, "--dim", "1024",
                             *options, "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_provenance(out)["device_kind"]  # the compile-only TPU's
    return json.loads(out.read_text())


needs_libtpu = pytest.mark.skipif(libtpu_path() is None, reason="libtpu is not installed (`make test` installs it)")


@needs_libtpu
def test_tpu_kernels_compile_channel_dense(tmp_path):
    # one program (8 rows of 128 channels), one tile: a small grid for libtpu's estimate to walk
    report = compile_report(tmp_path, "v6e", "--seqlen", "64")
    assert report["device_kind"].startswith("TPU v6")
    cycles = report["cycles"]
    assert set(cycles) == {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"}
    lane_steps = 64 * 1024 / 128
    assert cycles["selective_scan_fwd_tpu"] / lane_steps < 15, cycles
    assert cycles["selective_scan_bwd_tpu"] / lane_steps < 45, cycles
    assert cycles["selective_scan_bwd_tpu"] > cycles["selective_scan_fwd_tpu"], cycles


@needs_libtpu
def test_long_tiles_are_capped_to_fit_scoped_vmem(tmp_path):
    """Tile 256 (the models' default scan_chunk_size) is capped at pallas_scan_tpu.MAX_TILE: a 128-step tile's
    backward needs 19 MiB of scoped VMEM, over a v5p's 16 MiB, and the compile fails (RESOURCE_EXHAUSTED) without
    the cap."""
    report = compile_report(tmp_path, "v5p", "--seqlen", "128", "--tile", "256")
    assert report["device_kind"] == "TPU v5"
    assert set(report["cycles"]) == {"selective_scan_fwd_tpu", "selective_scan_bwd_tpu"}
