"""The command-line checks of the offline compile benchmarks (experiments/bench/tpu_compile.py, triton_compile.py)
and of experiments/timing.time_call: bad arguments are named before libtpu or Triton's compiler starts."""

from __future__ import annotations

import pytest

from experiments import tpu_topology
from experiments.bench import tpu_compile
from experiments.timing import time_call


@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), "repeats: expected a positive integer, got 0"),
    (dict(repeats=2.5), "repeats: expected a positive integer, got 2.5"),
    (dict(warmup=-1), "warmup: expected an integer >= 0, got -1"),
], ids=["repeats-0", "repeats-float", "warmup"])
def test_time_call_names_a_bad_count(kwargs, message):
    """repeats=0 was an IndexError (no time to take the median of)."""
    with pytest.raises(ValueError, match=message):
        time_call(lambda: None, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--dim", "0"], "argument --dim: expected a positive integer, got '0'"),
    (["--tile", "-64"], "argument --tile: expected a positive integer, got '-64'"),
    (["--dim", "200"], "--dim: the TPU Pallas kernel needs dim // groups a multiple of 128"),  # was a traceback
    (["--json", "no/such/dir/x.json"], "--json: expected a file path in a writable directory"),  # after the compile
], ids=["dim", "tile", "dim-lanes", "json-directory"])
def test_tpu_compile_checks_before_loading_libtpu(monkeypatch, capsys, args, message):
    monkeypatch.setattr(tpu_compile, "start_tpu_compiler", lambda *a: pytest.fail("libtpu started"))
    with pytest.raises(SystemExit):
        tpu_compile.main(args)
    assert message in capsys.readouterr().err


def test_tpu_compile_without_libtpu_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(tpu_topology, "libtpu_path", lambda: None)
    monkeypatch.setattr(tpu_topology, "libtpu_requirement", lambda: "libtpu==0.0.42.*")
    assert tpu_compile.main([]) == 1
    assert capsys.readouterr().err.startswith("error: libtpu is not installed")


@pytest.mark.parametrize("arch, message", [
    ("95", "--arch: expected a compute capability that pip triton's tools compile and disassemble for ("),
    ("70", "--arch: expected a compute capability that pip triton's tools compile and disassemble for ("),
    ("0", "argument --arch: expected a positive integer, got '0'"),
], ids=["unknown", "too-old-to-disassemble", "zero"])
def test_triton_compile_checks_the_arch_before_compiling(monkeypatch, capsys, arch, message):
    """--arch 95 (or 0, 88) aborted the process in Triton's LLVM ("LLVM ERROR: Cannot select"): checked against
    what pip triton's ptxas lists first."""
    pytest.importorskip("triton", reason="pip's triton is in the test extra (pyproject.toml)")
    from experiments.bench import triton_compile

    assert {80, 90} <= set(triton_compile.supported_archs())
    monkeypatch.setattr(triton_compile, "scan_kernels", lambda *a: pytest.fail("compiled despite a bad --arch"))
    with pytest.raises(SystemExit):
        triton_compile.main(["--arch", arch, "--variants", "64:32:1"])
    err = capsys.readouterr().err
    assert message in err and (arch == "0" or err.rstrip().endswith(f", got {arch}"))
