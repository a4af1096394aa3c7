"""experiments/bench/gpu_scan.py's parts that run without a GPU (the benchmark itself needs one): the bytes-moved
floor, the Pallas variant timing path (interpret mode on toy inputs, same shapes as the 7B inputs it gets on a
GPU), and the command-line checks. Timings are not asserted."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import gpu_scan
from tests.test_bench_checks import read_provenance


def test_floor_bytes_counts_each_tensor_once():
    b, l, d, n = 2, 128, gpu_scan.DIM, gpu_scan.DSTATE
    rows, cols, params = b * l * d * 2, b * l * n * 2 * 2, d * n * 4 + 2 * d * 4
    assert gpu_scan.floor_bytes(b, l, backward=False) == 4 * rows + cols + params
    # forward+backward: u, delta, z, B, C, A, D, delta_bias and dout read, du, ddelta, dz, dB, dC, dA... written; it
    # counted a forward pass besides
    assert gpu_scan.floor_bytes(b, l, backward=True) == 7 * rows + 2 * cols + 2 * params


def test_variant_times_the_kernel_after_checking_it(monkeypatch):
    """time_variant runs the kernel on channels-last inputs and compares it with the chunked scan's result before
    timing it (output, or every gradient): a correct variant is within bf16 rounding, a wrong one is far off."""
    monkeypatch.setattr(gpu_scan, "DIM", 32)
    # time_variant jits its kernel call anew each time: the wrong-result check below reuses the compiled call of
    # the same variant (interpreted on a CPU, a compile is most of a variant's time)
    monkeypatch.setattr(gpu_scan, "kernel_call", functools.lru_cache(gpu_scan.kernel_call))
    kw = gpu_scan.inputs(1, 24)
    assert kw["u"].shape == (1, 32, 24) and kw["B"].shape == (1, gpu_scan.DSTATE, 24)
    args = gpu_scan.channels_last_args(kw)
    assert args["u"].shape == (1, 24, 32) and args["B"].shape == (1, 24, 1, gpu_scan.DSTATE)
    for backward in (False, True):
        reference = gpu_scan.kernel_call(backward, impl="chunked")(args)
        for variant in ("16:8:1:rows", "8:8:1:rows:s3"):  # s3: the 3 tiles of 24 steps split 3 ways
            row = gpu_scan.time_variant(variant, args, backward, repeats=1, reference=reference)
            assert row["pallas_kernel_s"] > 0 and row["max_rel_diff"] < gpu_scan.WRONG / 5, (variant, backward, row)
        # one channel off by the largest value, as a race would give
        wrong = jax.tree.map(lambda x: x.at[..., 0].add(jnp.max(jnp.abs(x))), reference)
        assert gpu_scan.time_variant("16:8:1:rows", args, backward, 1, wrong)["max_rel_diff"] >= gpu_scan.WRONG


def test_variant_computes_what_selective_scan_fn_does(monkeypatch):
    from ssm.scan import selective_scan_fn

    monkeypatch.setattr(gpu_scan, "DIM", 16)
    kw = gpu_scan.inputs(1, 20)
    seen = {}

    def capture(fn, args, repeats):  # time_call's stand-in: keeps the timed function's output
        seen["out"] = fn(args)
        return 1.0

    monkeypatch.setattr(gpu_scan, "time_call", capture)
    gpu_scan.time_variant("8:8:1", gpu_scan.channels_last_args(kw), False, repeats=1)
    want = selective_scan_fn(**kw, delta_softplus=True, impl="reference")
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(seen["out"], 1, 2), np.float32),
                               np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)  # bf16 outputs


def test_main_writes_the_table_and_the_sweep(monkeypatch, tmp_path, capsys):
    """main() end to end with time_call stubbed (nothing is timed on a CPU): the table against the floor first, then
    the sweep, both in gpu_scan.json, which is rewritten after every row (a run cut short keeps its rows)."""
    import json

    monkeypatch.setattr(gpu_scan, "DIM", 16)
    monkeypatch.setattr(gpu_scan, "TIMED_BACKENDS", ("cpu",))
    calls = []
    monkeypatch.setattr(gpu_scan, "time_call", lambda fn, args, repeats, **kw: calls.append(fn) or 1e-3)
    monkeypatch.setattr(gpu_scan, "versions", lambda: {})
    # 1 MiB, not 2 GiB: drawing 2 GiB of random floats took 23 s of a CPU test whose timer is stubbed anyway
    monkeypatch.setattr(gpu_scan, "copy_bandwidth", functools.partial(gpu_scan.copy_bandwidth, 1 << 20))
    gpu_scan.main(["--out", str(tmp_path), "--lengths", "16", "--batches", "1", "2",
                   "--variants", "16:8:1:pf"])
    result = json.loads((tmp_path / "gpu_scan.json").read_text())
    assert [(r["batch"], r["pass_"], set(r) >= {"chunked_s", "pallas_s"}) for r in result["rows"]] == [
        (1, "fwd", True), (1, "fwd+bwd", True), (2, "fwd", True), (2, "fwd+bwd", True)]
    one_shape = [("16:8:1:pf", "fwd"), ("16:8:1:pf", "fwd+bwd")]
    assert [(r["batch"], r["variant"], r["pass_"]) for r in result["pallas_sweep"]] == [
        (batch, *row) for batch in (1, 2) for row in one_shape]  # the first shape, then the largest batch
    assert all(r["max_rel_diff"] < gpu_scan.WRONG for r in result["pallas_sweep"])
    out = capsys.readouterr().out
    assert out.index("times as ratios") < out.index("Pallas kernel sweep")
    assert not [line for line in out.splitlines() if line.endswith(" WRONG")]
    assert read_provenance(tmp_path / "gpu_scan.json")["command"].startswith("python -m experiments.bench.gpu_scan")


def test_cli_checks(capsys):
    with pytest.raises(SystemExit):
        gpu_scan.main(["--out", "x", "--variants", "64:32"])
    assert "--variants: expected TILE:BLOCK_DIM:NUM_WARPS[:UNROLL] positive integers, optionally :rows, then " \
           "optionally :pf, then optionally :s<splits>, got '64:32'" in capsys.readouterr().err
    for bad in ("64:32:1:cols", "64:32:1:pf:rows", "64:32:1:s0", "64:32:1:s4:rows"):
        with pytest.raises(SystemExit):
            gpu_scan.main(["--out", "x", "--variants", bad])
    assert gpu_scan.parse_variant("16:32:1:2:rows:pf") == dict(tile=16, block_dim=32, num_warps=1, unroll=2,
                                                               bc_rows=True, prefetch=True, splits=1)
    assert gpu_scan.parse_variant("64:32:1:rows:s8") == dict(tile=64, block_dim=32, num_warps=1, unroll=1,
                                                             bc_rows=True, prefetch=False, splits=8)
    if jax.default_backend() == "cpu":
        with pytest.raises(SystemExit, match="^error: backend: expected a GPU or TPU .* got 'cpu'"):
            gpu_scan.main(["--out", "x"])


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["--lengths", "2048", "-1"], "argument --lengths: expected a positive integer, got '-1'"),
    (["--batches", "0"], "argument --batches: expected a positive integer, got '0'"),
    (["--impls", "fast"], "argument --impls: invalid choice: 'fast'"),
], ids=["repeats", "lengths", "batches", "impls"])
def test_arguments_are_checked_before_timing_starts(monkeypatch, tmp_path, capsys, args, message):
    """A bad count or impl failed only once the copy bandwidth had been timed (a lease's time spent): every argument
    is checked first, nothing is timed or written."""
    monkeypatch.setattr(gpu_scan, "TIMED_BACKENDS", (jax.default_backend(),))
    monkeypatch.setattr(gpu_scan, "copy_bandwidth", lambda: pytest.fail("timed despite bad arguments"))
    with pytest.raises(SystemExit):
        gpu_scan.main(["--out", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
