"""The long-context benchmark script runs end to end at toy sizes and writes what docs/BENCHMARKS.md quotes.

It measures speed and memory; this test checks only that every measurement produces a row with sane values
and that the CSV and both plots are written (timings are not asserted: benchmarks are scripts, not tests)."""

from __future__ import annotations

import csv
import sys

import pytest

from configs import load_model_config
from experiments.bench import long_context
from experiments.models import build_model, n_params
from tests.test_bench_checks import read_provenance


def test_long_context_bench_writes_every_measurement(tmp_path, monkeypatch):
    """main() end to end; the falcon point in a process of its own (run_point), the others in this one through
    the same --worker command line (a fresh process's start-up, JAX's import and the model's initialisation were
    most of each point's time at these sizes; the rows are read back from the JSON line as run_point reads them).
    Not the first point: mamba_parallel's prefill at this length is mamba_sequential's (one chunk), which it
    reuses compiled only in the same process."""
    import contextlib
    import io
    import json

    real, points = long_context.run_point, []

    def run_point(args, mode, length, decode_tokens):
        points.append(mode)
        if mode == "falcon":
            return real(args, mode, length, decode_tokens)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            long_context.main(long_context.worker_argv(args, mode, length, decode_tokens))
        return json.loads(printed.getvalue().strip().splitlines()[-1])

    monkeypatch.setattr(long_context, "run_point", run_point)
    long_context.main(["--min-log2", "7", "--max-log2", "7", "--decode-tokens", "2", "--generate-min-log2", "3",
                       "--generate-max-log2", "3", "--out", str(tmp_path)])
    with open(tmp_path / "long_context.csv") as fh:
        rows = list(csv.DictReader(fh))
    prompt = {r["mode"]: r for r in rows if r["length"]}
    assert set(prompt) == set(long_context.MODES)
    assert all(int(r["length"]) == 128 and float(r["prefill_seconds"]) > 0 and float(r["peak_rss_mb"]) > 0
               for r in prompt.values())
    assert float(prompt["mamba_sequential"]["decode_ms_per_token"]) > 0
    # fp32 weights: 4 bytes per parameter of the preset the bench builds
    assert int(prompt["falcon"]["weight_bytes"]) == 4 * n_params(build_model(load_model_config("tiny_falcon")))
    assert float(prompt["falcon"]["decode_weight_read_gb_per_s"]) > 0
    for row in (prompt["falcon"], prompt["mamba_sequential"]):  # bytes per second of one decode step, in 1e9 bytes
        seconds_per_token = float(row["decode_ms_per_token"]) / 1e3
        assert abs(float(row["decode_weight_read_gb_per_s"]) * 1e9 * seconds_per_token
                   / int(row["decode_read_bytes"]) - 1) < 1e-6
    generated = sorted((r["mode"], int(r["generated_tokens"])) for r in rows if r["generated_tokens"])
    assert generated == [(mode, n) for mode in sorted(long_context.GENERATE_MODES) for n in (8,)]
    assert all(float(r["generate_ms_per_token"]) > 0 for r in rows if r["generated_tokens"])
    for r in (r for r in rows if r["generated_tokens"]):  # the timed call's seconds over the generated tokens only
        assert abs(float(r["generate_ms_per_token"]) * int(r["generated_tokens"]) / 1e3 / float(r["generate_seconds"])
                   - 1) < 1e-6
    assert (tmp_path / "long_context.png").stat().st_size > 0
    assert (tmp_path / "generation.png").stat().st_size > 0
    # the device of each point, and the first one's in the provenance (main's own process never starts JAX's backend)
    info = read_provenance(tmp_path / "long_context.csv")
    assert {(r["backend"], r["device_kind"], r["device_count"]) for r in rows} == {
        (info["backend"], info["device_kind"], str(info["device_count"]))}
    assert info["command"].startswith("python -m experiments.bench.long_context --min-log2 7")
    assert points == [*long_context.MODES, *long_context.GENERATE_MODES]


def test_the_timed_prefill_compiles_nothing(monkeypatch):
    """The warm-up prefilled one chunk: a prompt of several chunks compiled its slicing into chunks (its shape is in
    the key) and, at a length no multiple of the chunk size, the last chunk's program inside the timed call. The
    compiles that jax logs are counted at the timer's two readings."""
    import argparse
    import logging
    import time
    import types

    import jax

    compiles, marks = [], []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                compiles.append(record)

    monkeypatch.setattr(long_context, "time", types.SimpleNamespace(
        perf_counter=lambda: marks.append(len(compiles)) or time.perf_counter()))
    args = argparse.Namespace(mode="mamba_sequential", length=32, chunk_size=16, decode_tokens=0,
                              mamba_preset="tiny_falcon_mamba", falcon_preset="tiny_falcon")
    handler, logger = Count(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            row = long_context.worker(args)
    finally:
        logger.removeHandler(handler)
    assert row["prefill_seconds"] > 0 and len(marks) == 2 and marks[0] == marks[1], compiles[marks[0]:]


def test_memory_is_the_devices_where_jax_reports_it():
    """On a GPU the prompt's arrays and the KV cache live in device memory and the host RSS stays flat: the plots
    and ratios read the device's peak where there is one (they read RSS alone before)."""
    gpu = {"peak_rss_mb": 900.0, "device_peak_mb": 5000.0}
    cpu = {"peak_rss_mb": 900.0, "device_peak_mb": None}
    assert long_context.peak_mb(gpu) == 5000.0 and long_context.peak_mb(cpu) == 900.0
    assert long_context.memory_label([gpu]) == "device peak memory" and long_context.memory_label([cpu]) == "peak RSS"


def test_decode_read_bytes_leave_out_an_untied_input_embedding():
    """Batch-1 decode gathers one row of an untied input embedding; tied, the table is the output projection."""
    from experiments.models import decode_read_bytes, param_bytes

    tied = build_model(load_model_config("tiny_falcon_mamba"))
    untied_config = load_model_config("tiny_falcon_mamba", ["tie_word_embeddings=false"])
    untied = build_model(untied_config)
    assert decode_read_bytes(tied) == param_bytes(tied)
    assert decode_read_bytes(untied) == param_bytes(untied) - 4 * untied_config.vocab_size * untied_config.hidden_size


def test_sweep_points_and_limits(tmp_path, monkeypatch):
    """Which points main asks the workers for (run_point stubbed: no subprocess): prompt lengths every other power
    of two up to each mode's limit, no decode after the parallel prefill, every power for generation."""
    calls = []

    def fake_point(args, mode, length, decode_tokens):
        # the CSV holds every point measured before this one (a run cut short by a time limit keeps them)
        if calls:
            with open(tmp_path / "long_context.csv") as fh:
                assert [(r["mode"], int(r.get("length") or r["generated_tokens"])) for r in csv.DictReader(fh)] == \
                    [(mode, length) for mode, length, _ in calls]
        calls.append((mode, length, decode_tokens))
        if mode in long_context.GENERATE_MODES:
            return {"mode": mode, "generated_tokens": length, "generate_ms_per_token": 1.0, "peak_rss_mb": 1.0,
                    "device_peak_mb": None}
        return {"mode": mode, "length": length, "prefill_seconds": 1.0, "peak_rss_mb": 1.0, "device_peak_mb": None,
                **({"decode_ms_per_token": 1.0, "decode_weight_read_gb_per_s": 1.0} if decode_tokens else {})}

    monkeypatch.setattr(long_context, "run_point", fake_point)
    long_context.main(["--min-log2", "10", "--max-log2", "16", "--falcon-max-log2", "12", "--parallel-max-log2", "14",
                       "--decode-tokens", "5", "--generate-min-log2", "3", "--generate-max-log2", "5",
                       "--falcon-generate-max-log2", "4", "--out", str(tmp_path)])
    assert calls == [("mamba_sequential", 2**k, 5) for k in (10, 12, 14, 16)] + \
        [("mamba_parallel", 2**k, 0) for k in (10, 12, 14)] + [("falcon", 2**k, 5) for k in (10, 12)] + \
        [("mamba_generate", 2**k, 0) for k in (3, 4, 5)] + [("falcon_generate", 2**k, 0) for k in (3, 4)]
    assert read_provenance(tmp_path / "long_context.csv")["device_kind"] is None  # the stubbed points give none


@pytest.mark.parametrize("args, message", [
    (["--mamba-preset", "tiny_falcon"], "--mamba-preset: expected a preset of model.family 'falcon_mamba', got "
                                        "'tiny_falcon' (model.family 'falcon')"),
    (["--falcon-preset", "tiny_falcon_mamba", "--modes", "falcon"], "--falcon-preset: expected a preset of "
                                                                    "model.family 'falcon', got 'tiny_falcon_mamba'"),
    (["--mamba-preset", "no_such_preset"], "--mamba-preset: unknown preset 'no_such_preset'"),
    (["--min-log2", "5", "--max-log2", "3"], "--max-log2: expected at least --min-log2 (5), got 3"),
    (["--generate-max-log2", "3"], "--generate-max-log2: expected 0 (no generation) or at least --generate-min-log2"),
    (["--modes", "mamba_generate", "--generate-max-log2", "0"], "--modes: expected a mode with a point to measure"),
    (["--modes", ","], "--modes: expected names from"),
    (["--decode-tokens", "-1"], "argument --decode-tokens: expected an integer >= 0, got '-1'"),
    (["--decode-tokens", "1"], "--decode-tokens: expected 0 (no decode) or at least 2"),
    (["--chunk-size", "0"], "argument --chunk-size: expected a positive integer, got '0'"),
    (["--min-log2", "-2"], "argument --min-log2: expected an integer >= 0, got '-2'"),
], ids=["mamba-preset-family", "falcon-preset-family", "unknown-preset", "max-below-min", "generate-max-below-min",
        "no-point", "no-mode", "decode-tokens", "decode-one-token", "chunk-size", "min-log2"])
def test_bad_arguments_stop_before_measuring_or_writing(tmp_path, monkeypatch, capsys, args, message):
    """A preset of the wrong family was measured under the other family's label, and arguments giving no point
    exited 0 after replacing the CSV with an empty one: both are refused before any point runs or file is written."""
    monkeypatch.setattr(long_context, "run_point", lambda *a: pytest.fail("measured despite bad arguments"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        long_context.main([*args, "--out", str(out)])
    assert exit_.value.code != 0 and message in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_and_no_measured_point(tmp_path, monkeypatch, capsys):
    """--out naming a file is refused up front; where every point fails, the last run's CSV is left as it was
    (no CSV of no rows) and the exit status says so."""
    monkeypatch.setattr(long_context, "run_point", lambda *a: None)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="2"):
        long_context.main(["--out", str(tmp_path / "file")])
    assert "--out: expected a directory, got" in capsys.readouterr().err
    (tmp_path / "long_context.csv").write_text("mode,length\nfalcon,1024\n")
    with pytest.raises(SystemExit, match="error: no point was measured"):
        long_context.main(["--out", str(tmp_path)])
    assert (tmp_path / "long_context.csv").read_text() == "mode,length\nfalcon,1024\n"


def test_plots_are_left_out_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is the demo extra's: without it the bench crashed after writing its CSV."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    assert long_context.plot([], tmp_path) == []
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out
