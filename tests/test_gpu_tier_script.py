"""scripts/gpu_tier.sh's skeleton on a machine without a GPU (a stand-in nvidia-smi on PATH): with a budget too
small for any step, every step is skipped and said so, the kernel install (no sdists here) is reported failed,
the summary is written, and the exit code is the number of failed steps. Guards the one-call device run against
script breakage; what the steps do is tested by the tests they run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_skeleton_skips_every_step_when_out_of_budget(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_tier.sh", repo / "scripts")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\ncase "$*" in *compute_cap*) echo 9.0;; *) echo stand-in;; esac\n')
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": sys.executable, "GPU_TIER_SECONDS": "30"}
    env.pop("OUT", None)
    result = subprocess.run(["bash", "scripts/gpu_tier.sh", "results/gpu"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=120)
    out = result.stdout
    assert "GPU compute capability 9.0 (sm_90)" in out, out + result.stderr
    for name in ("tests_pallas_on_gpu", "tests_gpu_live", "record_goldens_cuda", "bench_gpu_scan", "bench_gpu_layer",
                 "bench_long_context_7b"):
        assert f"== {name}: skipped" in out, out
    assert "== kernels:" in out and "ready" not in out, out
    summary = (repo / "results" / "gpu" / "summary.txt").read_text()
    assert summary.startswith(f"failed steps: {result.returncode};"), (summary, result.returncode)
    assert result.returncode == 1  # the kernel install: no sdists in this copy
