"""Chunked prefill, decode steps and chunked log-likelihood equal one full forward (Falcon Mamba)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import load_model_config
from ssm import FalconMambaLM


@pytest.fixture(scope="module")
def model():
    config = load_model_config("tiny_falcon_mamba", ["num_hidden_layers=2", "vocab_size=101"])
    return FalconMambaLM(config, seed=1)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 101, (2, 29))


@pytest.fixture(scope="module")
def full(model, ids):
    return np.asarray(model(ids))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 64, None])
def test_prefill_any_chunk_size_equals_full_forward(model, ids, full, chunk_size):
    logits, state = model.prefill(ids, model.init_state(2), chunk_size=chunk_size)
    assert logits.shape == (2, 101) and logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), full[:, -1], rtol=0, atol=1e-5)
    _, reference_state = model.prefill(ids, model.init_state(2))
    for ours, ref in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5)


def test_steps_after_prefill_equal_full_forward(model, ids, full):
    logits, state = model.prefill(ids[:, :20], model.init_state(2), chunk_size=6)
    np.testing.assert_allclose(np.asarray(logits), full[:, 19], rtol=0, atol=1e-5)
    for t in range(20, 29):
        logits, state = model.step(ids[:, t], state)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=0, atol=1e-5)


def test_state_size_does_not_depend_on_length(model):
    small = model.init_state(3, max_len=16)
    large = model.init_state(3, max_len=2**20)
    assert [x.shape for x in jax.tree.leaves(small)] == [x.shape for x in jax.tree.leaves(large)]


@pytest.mark.parametrize("chunk_size", [1, 5, 28, 29, None])
def test_log_likelihood_equals_full_log_softmax(model, ids, full, chunk_size):
    expected = jax.nn.log_softmax(full, axis=-1)[:, :-1]
    expected = np.take_along_axis(np.asarray(expected), ids[:, 1:, None], axis=-1)[..., 0]
    got = np.asarray(model.log_likelihood(ids, chunk_size=chunk_size))
    assert got.shape == (2, 28)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_bad_inputs(model, ids):
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer"):
        model.prefill(ids, model.init_state(2), chunk_size=0)
    with pytest.raises(ValueError, match=r"token_ids: expected an integer array of shape \(batch,\)"):
        model.step(ids, model.init_state(2))
    with pytest.raises(ValueError, match=r"token_ids: token ids must be in \[0, 101\)"):
        model.step(np.array([5, 101]), model.init_state(2))
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        model.init_state(0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.log_likelihood(ids[:, :1])
