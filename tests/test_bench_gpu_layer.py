"""experiments/bench/gpu_layer.py runs end to end on CPU at toy size (transformers' PyTorch path; timings not
asserted): both sides hold the same weights and compute the same layer (bf16 agreement), the row is complete."""

from __future__ import annotations

import json

import pytest

from experiments.bench import gpu_layer
from tests.test_bench_checks import read_provenance


def test_layer_rows_agree_and_are_complete(tmp_path, capsys, monkeypatch):
    """Also: gpu_layer.json is rewritten after every row, and a shape that raises gets a row with its error while the
    run goes on (it was written once, at the end: a time limit or one failing impl left no JSON on a GPU run)."""
    jax_layer, format_row, saved = gpu_layer.jax_layer, gpu_layer.format_row, []

    def failing_for_sequential(mixer):
        params, forward, gradients = jax_layer(mixer)
        if mixer.config.scan_impl == "sequential":
            def forward(params, x):
                raise RuntimeError("no kernel")
        return params, forward, gradients

    def format_after_save(row):  # printed after the row is saved: the JSON holds it already
        saved.append(len(json.loads((tmp_path / "gpu_layer.json").read_text())["rows"]))
        return format_row(row)

    monkeypatch.setattr(gpu_layer, "jax_layer", failing_for_sequential)
    monkeypatch.setattr(gpu_layer, "format_row", format_after_save)
    gpu_layer.main(["tiny_falcon_mamba", "--lengths", "24", "--batches", "2", "--impls", "chunked", "sequential",
                    "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_layer.json").read_text())["rows"]
    assert [(r["impl"], r["batch"], r["length"]) for r in rows] == [("chunked", 2, 24), ("sequential", 2, 24)]
    assert saved == [1, 2] and rows[1]["error"] == "RuntimeError: no kernel" and "error" not in rows[0]
    row = rows[0]
    assert row["max_abs_diff_over_max_abs"] < 1e-2  # bf16 weights and activations on both sides
    for name in ("fwd", "fwd+bwd"):
        assert row[f"jax_{name}_ms"] > 0 and row[f"torch_{name}_ms"] > 0
        assert row[f"torch_over_jax_{name}"] == row[f"torch_{name}_ms"] / row[f"jax_{name}_ms"]
    assert "torch f+b ms" in capsys.readouterr().out
    info = read_provenance(tmp_path / "gpu_layer.json")
    assert info["command"].startswith("python -m experiments.bench.gpu_layer tiny_falcon_mamba --lengths 24")
    assert info["device_count"] >= 1 and info["torch"]


@pytest.mark.parametrize("args, message", [
    (["tiny_falcon"], "preset: expected a preset of model.family 'falcon_mamba', got 'tiny_falcon' (model.family "
                      "'falcon')"),
    (["tiny_falcon_mamba", "hidden_sise=64"], "preset: unknown config key 'model.hidden_sise'"),
    (["tiny_falcon_mamba", "--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["tiny_falcon_mamba", "--impls", "fast"], "argument --impls: invalid choice: 'fast'"),
], ids=["transformer-preset", "override", "repeats", "impls"])
def test_cli_refuses_bad_arguments_before_building(monkeypatch, capsys, args, message):
    """A transformer preset failed with AttributeError 'backbone' once transformers had built it: it has no Falcon
    Mamba mixer. Refused, like bad counts and impls, before anything is built."""
    monkeypatch.setattr(gpu_layer, "bench", lambda *a: pytest.fail("built despite bad arguments"))
    with pytest.raises(SystemExit):
        gpu_layer.main(args)
    assert message in capsys.readouterr().err
