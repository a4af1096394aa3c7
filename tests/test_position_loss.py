"""experiments.position_loss: loss by power-of-two position bucket, checked against transformers' model on the
same windows of a token file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM

from experiments.position_loss import bucket_losses, main
from tests.hf_models import build_and_save


def test_buckets_are_powers_of_two_and_the_last_is_cut():
    nll = np.arange(2 * 9, dtype=np.float64).reshape(2, 9)  # length 10: column t scores position t + 1
    assert bucket_losses(nll) == [
        {"start": 1, "end": 2, "tokens": 2, "loss": (0 + 9) / 2},
        {"start": 2, "end": 4, "tokens": 4, "loss": (1 + 2 + 10 + 11) / 4},
        {"start": 4, "end": 8, "tokens": 8, "loss": float(np.mean([3, 4, 5, 6, 12, 13, 14, 15]))},
        {"start": 8, "end": 10, "tokens": 4, "loss": (7 + 8 + 16 + 17) / 4}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("position_loss")
    torch_model = build_and_save(FalconMambaConfig, FalconMambaForCausalLM, path / "hf", seed=6, vocab_size=48,
                                 hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                                 time_step_rank=4, tie_word_embeddings=False)
    np.save(path / "tokens.npy", np.random.default_rng(0).integers(0, 48, 200).astype(np.uint16))
    return path, torch_model


def test_matches_transformers_on_the_files_first_windows(checkpoint, tmp_path):
    path, torch_model = checkpoint
    result = main([str(path / "hf"), "--token-file", str(path / "tokens.npy"), "--length", "40", "--sequences", "3",
                   "--chunk-size", "16", "--batch-size", "2", "--json", str(tmp_path / "r.json")])
    ids = np.load(path / "tokens.npy")[:120].reshape(3, 40).astype(np.int64)
    with torch.no_grad():
        logp = torch.log_softmax(torch_model(torch.tensor(ids)).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, torch.tensor(ids[:, 1:, None])).squeeze(-1).numpy()
    want = bucket_losses(nll)
    assert [(r["start"], r["end"], r["tokens"]) for r in result["buckets"]] == [
        (r["start"], r["end"], r["tokens"]) for r in want]
    assert (want[-1]["start"], want[-1]["end"]) == (32, 40)  # the last bucket cut at the window's end
    np.testing.assert_allclose([r["loss"] for r in result["buckets"]], [r["loss"] for r in want], rtol=1e-5)
    assert result["tokens"] == 3 * 39 and result["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert (tmp_path / "r.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--length", "1"], "--length: expected at least 2"),
    (["--length", "100", "--sequences", "3"], "--sequences x --length: expected at most the file's 200 tokens, got "
                                              "3 x 100 = 300"),
    (["--length", "10", "--step", "3"], "--step: expected only with a training run's output_dir"),
    (["--length", "10", "--chunk-size", "0"], "--chunk-size: expected a positive integer, got 0"),
])
def test_bad_arguments_are_one_error_line(checkpoint, argv, message, monkeypatch):
    """Each found before the model is loaded (a 7B model took minutes to load, then the file was too short)."""
    import experiments.position_loss as position_loss

    path, _ = checkpoint
    monkeypatch.setattr(position_loss, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        main([str(path / "hf"), "--token-file", str(path / "tokens.npy"), *argv])


def test_ids_outside_the_vocabulary_and_missing_files_are_named(checkpoint, tmp_path, monkeypatch):
    """Before the model is loaded too (its config read alone)."""
    import experiments.position_loss as position_loss

    path, _ = checkpoint
    monkeypatch.setattr(position_loss, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    np.save(tmp_path / "big.npy", np.array([1, 2, 48, 3], np.uint16))
    with pytest.raises(SystemExit, match=r"^error: --token-file: expected token ids in \[0, 48\) \(model.vocab_size\), "
                                         r"got ids from 1 to 48"):
        main([str(path / "hf"), "--token-file", str(tmp_path / "big.npy"), "--length", "2", "--sequences", "2"])
    with pytest.raises(SystemExit, match=r"^error: --token-file: expected a .npy file of token ids, got '.*none.npy'"):
        main([str(path / "hf"), "--token-file", str(tmp_path / "none.npy"), "--length", "2"])
    with pytest.raises(SystemExit, match=r"^error: path: expected a training run's output_dir \(config.yaml\) or a "
                                         r"local Hugging Face directory \(config.json\), got '.*nowhere', which does "
                                         r"not exist$"):  # was "config.json not found at '.../nowhere/config.json'"
        main([str(tmp_path / "nowhere"), "--token-file", str(tmp_path / "big.npy"), "--length", "2",
              "--sequences", "2"])
    with pytest.raises(SystemExit, match=r"got '.*', which has neither config.yaml nor config.json$"):
        main([str(tmp_path), "--token-file", str(tmp_path / "big.npy"), "--length", "2", "--sequences", "2"])
