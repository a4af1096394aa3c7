"""experiments.bench.cpu_forward at toy sizes: the row it reports is consistent (JAX and transformers agree on the
logits of the exported weights; the speedup is transformers' seconds over JAX's). bench_scans (ten compiles)
is left to the script."""

from __future__ import annotations

import argparse

import pytest

from experiments.bench import cpu_forward


def test_cpu_forward_rows_are_consistent():
    args = argparse.Namespace(preset="tiny_falcon_mamba", length=16, batch=2, repeats=1, torch_threads=1)
    row = cpu_forward.bench_model(args, vocab=64)
    assert row["vocab_size"] == 64 and row["max_abs_logits_diff"] < 1e-4
    assert abs(row["speedup_vs_transformers"] * row["jax_seconds"] / row["transformers_seconds"] - 1) < 1e-9
    assert abs(row["jax_tokens_per_s"] * row["jax_seconds"] / 32 - 1) < 1e-9


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny_falcon"], "--preset: expected a preset of model.family 'falcon_mamba', got 'tiny_falcon' "
                                  "(model.family 'falcon')"),
    (["--length", "0"], "argument --length: expected a positive integer, got '0'"),
    (["--vocabs", "1024", "-1"], "argument --vocabs: expected a positive integer, got '-1'"),
    (["--torch-threads", "0"], "argument --torch-threads: expected a positive integer, got '0'"),
], ids=["transformer-preset", "length", "vocabs", "torch-threads"])
def test_cli_refuses_bad_arguments_before_building(monkeypatch, capsys, args, message):
    monkeypatch.setattr(cpu_forward, "bench_model", lambda *a: pytest.fail("built despite bad arguments"))
    with pytest.raises(SystemExit):
        cpu_forward.main(args)
    assert message in capsys.readouterr().err


def test_json_output_has_the_provenance(monkeypatch, capsys):
    """The measurements stubbed: --json prints the date, command, versions and device with the rows."""
    import json

    from tests.test_bench_checks import PROVENANCE_KEYS

    monkeypatch.setattr(cpu_forward, "bench_model", lambda args, vocab: {"vocab_size": vocab})
    monkeypatch.setattr(cpu_forward, "bench_scans", lambda args: [])
    cpu_forward.main(["--vocabs", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == [{"vocab_size": 64}] and set(out["provenance"]) == PROVENANCE_KEYS
    assert out["provenance"]["command"] == "python -m experiments.bench.cpu_forward --vocabs 64 --json"
