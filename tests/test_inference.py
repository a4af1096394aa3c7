"""Chunked prefill, decode steps and chunked log-likelihood equal one full forward, for both families.

Falcon Mamba carries conv + SSM states across chunks; Falcon fills a KV cache chunk by chunk. Padded batches
(left or right padding) must give every row the result it would get alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import load_model_config
from ssm import FalconMambaLM
from transformer import FalconLM

VOCAB = 101
MAX_LEN = 48


def _build(name):
    if name == "falcon_mamba":
        return FalconMambaLM(load_model_config("tiny_falcon_mamba", ["num_hidden_layers=2", f"vocab_size={VOCAB}"]),
                             seed=1)
    preset = {"falcon_rope": "tiny_falcon", "falcon_alibi": "tiny_falcon_alibi"}[name]
    return FalconLM(load_model_config(preset, ["num_hidden_layers=2", f"vocab_size={VOCAB}"]), seed=1)


@pytest.fixture(scope="module", params=["falcon_mamba", "falcon_rope", "falcon_alibi"])
def model(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 29))


@pytest.fixture(scope="module")
def full(model, ids):
    return np.asarray(model(ids))


@pytest.mark.parametrize("chunk_size", [1, 7, 29, 64, None])
def test_prefill_any_chunk_size_equals_full_forward(model, ids, full, chunk_size):
    logits, state = model.prefill(ids, model.init_state(2, max_len=MAX_LEN), chunk_size=chunk_size)
    assert logits.shape == (2, VOCAB) and logits.dtype == np.float32
    np.testing.assert_allclose(np.asarray(logits), full[:, -1], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.lengths), [29, 29])
    _, reference_state = model.prefill(ids, model.init_state(2, max_len=MAX_LEN))
    for ours, ref in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5)


def test_steps_after_prefill_equal_full_forward(model, ids, full):
    logits, state = model.prefill(ids[:, :20], model.init_state(2, max_len=MAX_LEN), chunk_size=6)
    np.testing.assert_allclose(np.asarray(logits), full[:, 19], rtol=0, atol=1e-5)
    for t in range(20, 29):
        logits, state = model.step(ids[:, t], state)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", ["right_lengths", "right_mask", "left_mask"])
def test_padded_batch_rows_equal_rows_alone(model, padding):
    rng = np.random.default_rng(3)
    lengths = [11, 23, 17]
    rows = [rng.integers(0, VOCAB, n) for n in lengths]
    extra = rng.integers(0, VOCAB, (3, 4))  # tokens decoded after the prompts
    seq = max(lengths)
    ids = np.full((3, seq), 7)
    mask = np.zeros((3, seq), np.int32)
    for i, row in enumerate(rows):
        if padding == "left_mask":
            ids[i, seq - len(row):], mask[i, seq - len(row):] = row, 1
        else:
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
    kwargs = {"lengths": np.array(lengths)} if padding == "right_lengths" else {"attention_mask": mask}
    logits, state = model.prefill(ids, model.init_state(3, max_len=MAX_LEN), chunk_size=8, **kwargs)
    np.testing.assert_array_equal(np.asarray(state.lengths), lengths)
    stepped = []
    for t in range(extra.shape[1]):
        step_logits, state = model.step(extra[:, t], state)
        stepped.append(np.asarray(step_logits))
    for i, row in enumerate(rows):
        alone_ids = np.concatenate([row, extra[i], np.zeros(seq + 4 - len(row) - 4, np.int64)])  # one shape
        alone = np.asarray(model(alone_ids[None]))[0]  # causal: the zero padding after the row changes nothing
        np.testing.assert_allclose(np.asarray(logits[i]), alone[len(row) - 1], rtol=0, atol=1e-5)
        for t in range(extra.shape[1]):
            np.testing.assert_allclose(stepped[t][i], alone[len(row) + t], rtol=0, atol=1e-5)


def test_falcon_mamba_padded_prefill_with_the_pallas_scan():
    """scan_impl="pallas" (the Triton kernel, interpreted on CPU) inside the model's chunked prefill of a
    left-padded ragged batch: the logits and states of the default scan's (which equal each row alone, above)."""
    def build(impl):
        return FalconMambaLM(load_model_config("tiny_falcon_mamba", ["num_hidden_layers=2", f"vocab_size={VOCAB}",
                                                                     f"scan_impl={impl}"]), seed=1)
    rng, lengths, seq = np.random.default_rng(4), (11, 24, 17), 24  # chunks of one shape: one compilation
    ids, mask = np.full((3, seq), 7), np.zeros((3, seq), np.int32)
    for i, n in enumerate(lengths):
        ids[i, seq - n:], mask[i, seq - n:] = rng.integers(0, VOCAB, n), 1
    results = []
    for model in (build("chunked"), build("pallas")):
        logits, state = model.prefill(ids, model.init_state(3), chunk_size=8, attention_mask=mask)
        results.append(jax.tree.leaves((logits, state)))
    assert results[0][-1].tolist() == list(lengths)  # state.lengths
    for ours, ref in zip(results[1], results[0]):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 28, None])
def test_log_likelihood_equals_full_log_softmax(model, ids, full, chunk_size):
    expected = jax.nn.log_softmax(full, axis=-1)[:, :-1]
    expected = np.take_along_axis(np.asarray(expected), ids[:, 1:, None], axis=-1)[..., 0]
    got = np.asarray(model.log_likelihood(ids, chunk_size=chunk_size))
    assert got.shape == (2, 28)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_traced_parameters(model, ids):
    """The model an argument of an nnx transform (nnx.eval_shape here; nnx.jit, nnx.grad alike): its parameters are
    tracers, which have no sharding to place the inputs by (an AttributeError when the rows were placed)."""
    logits, logp = nnx.eval_shape(lambda m: (m(ids), m.log_likelihood(ids)), model)
    assert (logits.shape, logp.shape) == ((2, 29, VOCAB), (2, 28))


def test_bad_inputs(model, ids):
    state = model.init_state(2, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer"):
        model.prefill(ids, state, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size: expected a positive integer or None, got True"):
        model.prefill(ids, state, chunk_size=True)  # ran with chunks of 1
    assert model.init_state(2, max_len=np.int64(MAX_LEN)).lengths.shape == (2,)  # refused by the KV cache before
    with pytest.raises(ValueError, match=r"token_ids: expected an integer array of shape \(batch,\)"):
        model.step(ids, state)
    with pytest.raises(ValueError, match=rf"token_ids: token ids must be in \[0, {VOCAB}\)"):
        model.step(np.array([5, VOCAB]), state)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        model.init_state(0, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.log_likelihood(ids[:, :1])
    with pytest.raises(ValueError, match=r"state: expected a DecodeState for batch 3"):
        model.prefill(np.ones((3, 4), np.int32), state)
    with pytest.raises(ValueError, match=r"attention_mask: expected each row to hold one contiguous run"):
        model.prefill(ids[:, :4], state, attention_mask=np.array([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"lengths: expected values in \[1, 4\]"):
        model.prefill(ids[:, :4], state, lengths=np.array([0, 4]))
    # an additive mask (0 on real tokens, -1e9 on padding) read as a 0/1 mask had its one padding token as the
    # only real token of the row: refused, as are other values; 0/1 as ints, floats or bools are the same mask
    for bad in (-1e9, 2, np.nan):
        with pytest.raises(ValueError, match=rf"attention_mask: expected 1 for a real token and 0 for padding .*"
                                             rf"got {bad}"):
            model.prefill(ids[:, :3], state, attention_mask=np.array([[bad, 0, 0], [0, 0, 0]]))
    right = np.array([[1, 1, 0], [1, 1, 1]])
    want = model.prefill(ids[:, :3], state, attention_mask=right)[0]
    for mask in (right.astype(bool), right.astype(np.float32), right.tolist()):
        np.testing.assert_array_equal(model.prefill(ids[:, :3], state, attention_mask=mask)[0], want)
    with pytest.raises(ValueError, match=r"input_ids: expected rows of equal length .*got lengths \[3, 2\]"):
        model([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match=r"attention_mask: expected rows of equal length"):
        model.prefill(ids[:, :3], state, attention_mask=[[1, 1, 1], [1, 1]])
    if model.state_capacity(state) is not None:  # a KV cache's lengths are its positions
        with pytest.raises(ValueError, match=r"state.lengths: expected token counts \(integers >= 0\), got \[-3, 0\]"):
            model.step(np.array([1, 2]), state._replace(lengths=np.array([-3, 0], np.int32)))


def test_state_size_and_cache_capacity():
    ssm_model = _build("falcon_mamba")
    small, large = ssm_model.init_state(3, max_len=16), ssm_model.init_state(3, max_len=2**20)
    assert [x.shape for x in jax.tree.leaves(small)] == [x.shape for x in jax.tree.leaves(large)]
    falcon = _build("falcon_rope")
    cache = falcon.init_state(1, max_len=8)
    key, value = cache.layers[0]
    cfg = falcon.config
    assert key.shape == value.shape == (1, 8, cfg.kv_heads, cfg.head_dim)  # only the KV heads are stored
    with pytest.raises(ValueError, match=r"KV cache holds max_len=8"):
        falcon.prefill(np.ones((1, 9), np.int32), cache)
    _, cache = falcon.prefill(np.ones((1, 8), np.int32), cache)
    with pytest.raises(ValueError, match=r"KV cache holds max_len=8"):
        falcon.step(np.ones((1,), np.int32), cache)
    with pytest.raises(ValueError, match=r"max_len: expected a positive integer \(the KV cache length\)"):
        falcon.init_state(1)


def test_bf16_compute_keeps_the_ssm_state_in_fp32():
    """DESIGN: fp32 state. With bf16 compute the SSM state stays fp32 through prefill and decode steps (the conv
    state holds the last inputs in the compute dtype, as causal_conv1d's state has x's dtype)."""
    model = FalconMambaLM(load_model_config("tiny_falcon_mamba", ["num_hidden_layers=1", f"vocab_size={VOCAB}",
                                                                  "compute_dtype=bfloat16"]), seed=1)
    _, state = model.prefill(np.ones((2, 8), np.int32), model.init_state(2), chunk_size=4)
    _, state = model.step(np.ones(2, np.int32), state)
    layer = state.layers[0]
    assert layer.ssm.dtype == np.float32 and layer.conv.dtype == jax.numpy.bfloat16


def test_constructors_and_save_pretrained_check_their_arguments(tmp_path):
    """A config or model of the other family, or a seed JAX cannot take, named (they failed on a missing attribute
    deep inside the constructor or the writer, or with an OverflowError inside JAX)."""
    import ssm
    import transformer

    mamba_config = load_model_config("tiny_falcon_mamba", ["num_hidden_layers=1"])
    falcon_config = load_model_config("tiny_falcon", ["num_hidden_layers=1"])
    with pytest.raises(TypeError, match="^config: expected a FalconMambaConfig, got FalconConfig"):
        FalconMambaLM(falcon_config)
    with pytest.raises(TypeError, match="^config: expected a FalconConfig, got dict"):
        FalconLM({"hidden_size": 8})
    for bad in (-2**31 - 1, 2**32, 1.5, "a", jnp.ones(2, jnp.int32)):
        with pytest.raises(ValueError, match=r"^seed: expected an integer in \[-2\*\*31, 2\*\*32\)"):
            FalconMambaLM(mamba_config, seed=bad)
    for good in (np.int64(2**32 - 1), jnp.int32(5), -1):  # nnx.Rngs refused the NumPy integer
        assert FalconMambaLM(mamba_config, seed=good).config == mamba_config
    with pytest.raises(TypeError, match="^model: expected a FalconMambaLM, got FalconLM"):
        ssm.save_pretrained(FalconLM(falcon_config), tmp_path / "x")
    with pytest.raises(TypeError, match="^model: expected a FalconLM, got FalconMambaLM"):
        transformer.save_pretrained(FalconMambaLM(mamba_config), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
