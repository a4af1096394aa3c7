"""The command-line checks of the offline compile benchmarks (experiments/bench/tpu_compile.py, triton_compile.py)
and of experiments/timing.time_call: bad arguments are named before libtpu or Triton's compiler starts. And the
provenance every bench writes beside its results (read_provenance: the other bench tests check theirs with it)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from experiments import bench, tpu_topology
from experiments.bench import tpu_compile
from experiments.timing import time_call

PROVENANCE_KEYS = {"date_utc", "command", "python", "platform", "jax", "jaxlib", "flax", "torch", "transformers",
                   "mamba_ssm", "backend", "device_kind", "device_count"}


def read_provenance(result) -> dict:
    """NAME.provenance.json beside the result file NAME.csv or NAME.json, checked to have every key."""
    result = Path(result)
    info = json.loads((result.parent / f"{result.stem}.provenance.json").read_text())
    assert set(info) == PROVENANCE_KEYS, info
    return info


def test_provenance_gives_the_date_versions_device_and_command(tmp_path):
    """The CSV and JSON results carried no date, versions or device: docs/BENCHMARKS.md added them by hand."""
    import jax

    info = bench.provenance("experiments.bench.x", ["--out", "a b", 3])
    assert info["command"] == "python -m experiments.bench.x --out 'a b' 3"
    assert info["jax"] == jax.__version__ and info["jaxlib"] and info["flax"]
    assert (info["backend"], info["device_kind"], info["device_count"]) == (
        jax.default_backend(), jax.devices()[0].device_kind, jax.device_count())
    assert info["date_utc"].endswith("Z") and len(info["date_utc"]) == len("2026-12-01T12:00:00Z")
    assert bench.package_version("no_such_distribution") is None
    given = bench.provenance("m", [], device={"backend": "gpu", "device_kind": "H200", "device_count": 8})
    assert (given["backend"], given["device_kind"], given["device_count"]) == ("gpu", "H200", 8)
    assert bench.write_provenance(tmp_path / "r.csv", info) == tmp_path / "r.provenance.json"
    assert read_provenance(tmp_path / "r.csv") == info


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


def test_tpu_compile_json_gets_the_compile_only_devices_provenance(monkeypatch, tmp_path, capsys):
    """libtpu and the compile stubbed: --json FILE gets FILE's provenance, with the compile-only TPU's device."""
    monkeypatch.setattr(tpu_compile, "start_tpu_compiler", lambda chip, profile_dir: types.SimpleNamespace(
        device_kind="TPU v6 lite"))
    monkeypatch.setattr(tpu_compile, "kernel_cycles", lambda *a: {"selective_scan_fwd_tpu": 1 << 30,
                                                                  "selective_scan_bwd_tpu": 1 << 30})
    assert tpu_compile.main(["--json", str(tmp_path / "v6e.json")]) == 0
    info = read_provenance(tmp_path / "v6e.json")
    assert (info["backend"], info["device_kind"], info["device_count"]) == ("tpu (compile only)", "TPU v6 lite", 1)
    assert info["command"] == f"python -m experiments.bench.tpu_compile --json {tmp_path / 'v6e.json'}"


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
