"""The training-throughput benchmark runs end to end on both families at toy sizes (timings are not asserted:
benchmarks are scripts, not tests); its FLOP count and MFU arithmetic are checked."""

from __future__ import annotations

import json

import pytest

from experiments.bench import train_throughput
from tests.test_bench_checks import PROVENANCE_KEYS

TOY = ["data.seq_len=32", "data.batch_size=2", "model.num_hidden_layers=1"]


@pytest.mark.parametrize("preset", ["tiny_falcon_mamba", "tiny_falcon"])
def test_row_is_consistent(preset):
    row = train_throughput.bench(preset, TOY, steps=1, peak_tflops=0.5)
    assert row["tokens_per_step"] == 64 and row["step_seconds"] > 0 and row["devices"] == 1
    assert row["tokens_per_s"] == pytest.approx(64 / row["step_seconds"])
    # XLA's count of forward + backward + AdamW is at least the forward's 2 x params x tokens
    assert row["xla_flops_per_step"] > 2 * row["params"] * row["tokens_per_step"]
    assert row["mfu"] == pytest.approx(row["model_flops_per_step"] / row["step_seconds"] / 0.5e12)


def test_model_flops_follow_palm():
    """6 x the weights a token meets (an untied input embedding is a lookup, not counted; tied, it is the output
    projection) + 12 x layers x d_model x seq_len of attention for the transformer; none for Falcon Mamba."""
    from configs import load_model_config

    mamba = load_model_config("falcon_mamba_7b")  # untied: its 65024 x 4096 input embedding is not a matmul
    assert not mamba.tie_word_embeddings
    assert train_throughput.model_flops_per_token(mamba, 7_272_665_088, 2048) == 6 * (7_272_665_088 - 65024 * 4096)
    falcon = load_model_config("falcon_7b")  # tied: all parameters, and attention at 2048 tokens
    assert falcon.tie_word_embeddings
    assert train_throughput.model_flops_per_token(falcon, 6_921_720_704, 2048) == \
        6 * 6_921_720_704 + 12 * 32 * 4544 * 2048


def test_cli_measured_peak(capsys, monkeypatch):
    monkeypatch.setattr(train_throughput, "matmul_tflops", lambda dtype: 0.25)  # the 4096^3 matmul is slow here
    train_throughput.main(["tiny_falcon_mamba", *TOY, "--steps", "1", "--peak-tflops", "measured", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["peak_tflops"] == 0.25 and out["peak_source"].startswith("measured: float32")
    assert 0 < out["rows"][0]["mfu"]
    assert set(out["provenance"]) == PROVENANCE_KEYS and out["provenance"]["command"].endswith("measured --json")


BAD_PEAK = 'argument --peak-tflops: expected a finite number > 0 or "measured", got '


@pytest.mark.parametrize("args, message", [
    (["tiny_falcon_mamba", "--peak-tflops", "fast"], BAD_PEAK + "'fast'"),
    (["tiny_falcon_mamba", "--peak-tflops", "-989"], BAD_PEAK + "'-989'"),
    (["tiny_falcon_mamba", "--peak-tflops", "nan"], BAD_PEAK + "'nan'"),
    (["tiny_falcon_mamba", "--peak-tflops", "0"], BAD_PEAK + "'0'"),
    (["tiny_falcon_mamba", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["data.seq_len=32", "--peak-tflops", "measured"], "presets: expected at least one preset name or YAML path "
                                                       "before the key=value overrides, got only ['data.seq_len=32']"),
    (["no_such_preset"], "presets: 'no_such_preset' with []: unknown preset 'no_such_preset'"),
], ids=["peak-word", "peak-negative", "peak-nan", "peak-zero", "steps", "no-preset", "unknown-preset"])
def test_cli_refuses_bad_arguments_before_compiling(capsys, monkeypatch, args, message):
    """A negative or nan peak gave a negative or nan MFU (0 none at all), overrides alone an IndexError (or, without
    "measured", no row and exit status 0): one error line, before anything is compiled or measured."""
    monkeypatch.setattr(train_throughput, "bench", lambda *a: pytest.fail("measured despite bad arguments"))
    monkeypatch.setattr(train_throughput, "matmul_tflops", lambda *a: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit):
        train_throughput.main(args)
    assert message in capsys.readouterr().err


def test_matmul_tflops_is_positive():
    assert train_throughput.matmul_tflops("float32", size=128, repeats=1) > 0


def test_torch_train_step_bench_runs_the_same_model(capsys):
    """The PyTorch side of the mamba_ssm comparison builds the same model (same parameter count) from the
    preset and reports a step time for both frameworks."""
    from experiments.bench import torch_train_step

    torch_train_step.main(["tiny_falcon_mamba", *TOY, "--steps", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["torch"]["params"] == out["jax"]["params"] > 0
    assert out["torch"]["step_seconds"] > 0 and out["jax"]["step_seconds"] > 0
    assert out["torch_over_jax_seconds"] == pytest.approx(out["torch"]["step_seconds"] / out["jax"]["step_seconds"])
    assert set(out["provenance"]) == PROVENANCE_KEYS


@pytest.mark.parametrize("args, message", [
    (["tiny_falcon_mamba", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["tiny_falcon_mamba", "data.seq_lem=32"], "preset: 'tiny_falcon_mamba' with ['data.seq_lem=32', "
                                               "'model.compute_dtype=float32']: unknown config key 'data.seq_lem'"),
], ids=["steps", "override"])
def test_torch_train_step_refuses_bad_arguments_before_the_jax_step(monkeypatch, capsys, args, message):
    from experiments.bench import torch_train_step

    monkeypatch.setattr(torch_train_step, "jax_bench", lambda *a: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit):
        torch_train_step.main(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("peak", [0, -1.0, float("nan"), "989"])
def test_bench_names_a_bad_peak(peak):
    """bench(peak_tflops=0) from Python skipped the MFU silently (the command line checks its flag itself)."""
    with pytest.raises(ValueError, match=r"^peak_tflops: expected a finite number > 0 or None, got "):
        train_throughput.bench("tiny_falcon_mamba", TOY, steps=1, peak_tflops=peak)
