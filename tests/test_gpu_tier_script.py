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

import pytest

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


def _run_checks(tmp_path, path: str, seconds: str | None = None):
    env = {**os.environ, "PATH": path}
    env.pop("GPU_TIER_SECONDS", None)
    if seconds is not None:
        env["GPU_TIER_SECONDS"] = seconds
    return subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "gpu_tier.sh"), str(tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=60)


def _stand_in(tmp_path, script: str) -> str:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(script)
    (fake / "nvidia-smi").chmod(0o755)
    return f"{fake}:{os.environ['PATH']}"


@pytest.mark.parametrize("seconds", ["0", "-5", "10m", "1.5", "abc"])
def test_a_budget_that_is_not_a_positive_integer_is_refused_up_front(tmp_path, seconds):
    """GPU_TIER_SECONDS=10m gave bash arithmetic errors in every step: refused before anything is written."""
    result = _run_checks(tmp_path, _stand_in(tmp_path, "#!/bin/sh\necho 9.0\n"), seconds)
    assert result.returncode == 64 and not (tmp_path / "results").exists(), result
    assert f"error: GPU_TIER_SECONDS: expected a positive integer (seconds), got '{seconds}'" in result.stderr


def test_no_gpu_is_refused_up_front(tmp_path):
    """Without nvidia-smi (on PATH), or where it reports no GPU, the script stops at once, before the kernel build
    and the steps start (they ran with an empty compute capability)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run_checks(tmp_path, str(empty))
    assert result.returncode == 64 and "error: nvidia-smi: expected on PATH" in result.stderr, result
    failing = "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver.'\nexit 9\n"
    result = _run_checks(tmp_path, _stand_in(tmp_path, failing), "600")
    assert result.returncode == 64 and "expected a GPU's compute capability (9.0), got 'NVIDIA-SMI has failed" \
        in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args, message", [
    (["90", "0"], "error: JOBS: expected a positive integer (nvcc processes at once), got '0'"),
    (["90", "-2"], "error: JOBS: expected a positive integer (nvcc processes at once), got '-2'"),
    (["9.0"], "error: SM: expected a compute capability without its dot (90 for 9.0), got '9.0'"),
], ids=["jobs-0", "jobs-negative", "sm-dotted"])
def test_prebuild_refuses_bad_arguments_up_front(tmp_path, args, message):
    """scripts/prebuild_gpu_kernels.sh: JOBS 0 is xargs -P 0, every nvcc at once; refused before anything runs."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "prebuild_gpu_kernels.sh"), *args],
                            env={**os.environ, "NVCC": "false", "PYTHON": "false"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result


def test_live_tier_fails_instead_of_skipping_under_the_tier_script(monkeypatch):
    """tests/test_gpu_live.py skipped every test where JAX saw no GPU or a kernel was missing, so the tier's run
    of it passed with nothing checked; under scripts/gpu_tier.sh (GPU_TIER_STRICT=1) such a test fails. Each
    test needs only its own kernels: a failed causal_conv1d build no longer skips the scan tests."""
    from tests import test_gpu_live as live

    monkeypatch.delenv("GPU_TIER_STRICT", raising=False)
    with pytest.raises(pytest.skip.Exception, match="JAX sees no GPU"):  # this machine: no GPU
        live.require(live.MAMBA)
    monkeypatch.setenv("GPU_TIER_STRICT", "1")
    with pytest.raises(pytest.fail.Exception, match="JAX sees no GPU"):
        live.require()
    assert "causal_conv1d" not in live.MAMBA and "causal_conv1d_cuda" in live.CONV
    assert "GPU_TIER_STRICT=1" in (ROOT / "scripts" / "gpu_tier.sh").read_text()


def test_the_live_tests_the_tier_names_exist():
    """gpu_tier.sh names the live tests one by one (to run them in its order): a renamed one would make pytest
    refuse the whole step ("not found"), and nothing on CPU runs that step."""
    import re

    script = (ROOT / "scripts" / "gpu_tier.sh").read_text()
    named = re.findall(r"\$LIVE::(\w+)", script)
    defined = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_gpu_live.py").read_text(), re.M)
    assert named and sorted(named) == sorted(defined), (named, defined)


def test_prebuild_carries_causal_conv1d_by_default(tmp_path):
    """The prebuild compiled the scan's objects by default, leaving causal_conv1d's backward (one file, ~5 times
    the scan's largest, that no MAX_JOBS splits) to the GPU machine's time. With stand-in sdists, nvcc and python:
    the default compiles causal_conv1d's files only, into vendor/gpu_prebuilt/sm_90/causal_conv1d_cuda/."""
    import tarfile

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "prebuild_gpu_kernels.sh", repo / "scripts")
    sdists = repo / "vendor" / "gpu_sdists"
    sdists.mkdir(parents=True)
    for name, folder in (("mamba_ssm-2.3.2.post1", "csrc/selective_scan"), ("causal_conv1d-1.7.0", "csrc")):
        src = tmp_path / name / folder
        src.mkdir(parents=True)
        (src / "kernel_a.cu").write_text("")
        with tarfile.open(sdists / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / name, arcname=name)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # nvcc: touches its -o file; python: answers the include-path, ABI and version queries alike
    (bin_ / "nvcc").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && touch "$2"; shift; done\n')
    (bin_ / "python").write_text("#!/bin/sh\necho 1\n")
    for tool in bin_.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "NVCC": str(bin_ / "nvcc"), "PYTHON": str(bin_ / "python")}
    env.pop("EXTENSIONS", None)
    result = subprocess.run(["bash", "scripts/prebuild_gpu_kernels.sh", "90", "2"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    built = sorted(str(p.relative_to(repo / "vendor" / "gpu_prebuilt" / "sm_90"))
                   for p in (repo / "vendor" / "gpu_prebuilt").rglob("*.o"))
    assert built == ["causal_conv1d_cuda/kernel_a.o"], built
