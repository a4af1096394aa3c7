"""Falcon attention functions: blockwise == xla, grouped heads against an expanded-head NumPy reference,
ALiBi and RoPE numerics against transformers' own functions, and the fused qkv row layouts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import FalconConfig as HFFalconConfig
from transformers.models.falcon import modeling_falcon

import transformer
from configs import FalconConfig
from transformer.attention import alibi_bias, alibi_slopes, attention, rope_cos_sin, rope_inv_freq


def _qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype),
            jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype),
            jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype))


def _reference(q, k, v, key_bias, q_offset, kv_length):
    """float64 NumPy attention with every kv head repeated per query head."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_bias is not None:
        s = s + np.asarray(key_bias, np.float64)[None, :, None, :]
    q_pos = q_offset + np.arange(q.shape[1])
    k_pos = np.arange(k.shape[1])
    s = np.where((k_pos[None] <= q_pos[:, None]) & (k_pos[None] < kv_length), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("q_len, kv_len, q_offset, kv_length, with_bias", [
    (300, 300, 0, 300, False), (300, 300, 0, 300, True), (5, 40, 27, 32, True), (6, 40, 27, 30, False)])
def test_xla_and_blockwise_match_reference(q_len, kv_len, q_offset, kv_length, with_bias):
    """Group 3 (6 heads on 2 kv heads); block 64 divides neither length; the third case is a KV cache of 40
    slots holding 32 keys, with 5 queries at positions 27..31; in the last, queries 30..32 (a padded row's) see
    only the 30 valid keys, not every earlier slot."""
    q, k, v = _qkv(2, q_len, kv_len, 6, 2, 8)
    bias = alibi_bias(6, kv_len) / math.sqrt(8) if with_bias else None
    expected = _reference(q, k, v, bias, q_offset, kv_length)
    kw = dict(key_bias=bias, q_offset=q_offset, kv_length=kv_length)
    xla = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, impl="xla", **kw))(q, k, v))
    blockwise = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, impl="blockwise", block_size=64, **kw))(q, k, v))
    np.testing.assert_allclose(xla, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(blockwise, xla, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_every_head_layout_with_per_row_positions_matches_reference(heads, kv_heads):
    """Multi-head, multi-query and grouped queries (heads-major inside) with a q_offset and kv_length per row (a
    KV cache's prefill of 7 tokens and rows at other lengths), ALiBi on, blocks of 16 over 50 keys; rows are
    compared one at a time with the reference at their own scalars."""
    q, k, v = _qkv(3, 7, 50, heads, kv_heads, 8, seed=heads + kv_heads)
    bias = alibi_bias(heads, 50) / math.sqrt(8)
    q_offset, kv_length = np.array([0, 20, 43]), np.array([7, 27, 50])
    expected = np.concatenate([_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], bias, q_offset[i], kv_length[i])
                               for i in range(3)])
    kw = dict(key_bias=bias, q_offset=q_offset, kv_length=kv_length)
    for impl in ("xla", "blockwise"):
        out = jax.jit(lambda q, k, v: attention(q, k, v, impl=impl, block_size=16, **kw))(q, k, v)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=5e-6)


def test_empty_queries_give_an_empty_output():
    """No query rows (q_len 0, or batch 0): an empty result as before the heads-major layout, not a
    ZeroDivisionError from the (group * q_len) split."""
    for q_shape, k_shape in (((2, 0, 4, 8), (2, 5, 2, 8)), ((0, 3, 4, 8), (0, 5, 2, 8))):
        q, k = jnp.zeros(q_shape), jnp.ones(k_shape)
        for impl in ("xla", "blockwise"):
            assert attention(q, k, k, impl=impl).shape == q_shape


def test_blockwise_bf16_close_to_fp32():
    q, k, v = _qkv(1, 130, 130, 4, 1, 16)
    fp32 = np.asarray(attention(q, k, v, impl="blockwise", block_size=32))
    bf16 = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl="blockwise", block_size=32)
    assert bf16.dtype == jnp.bfloat16
    # bf16 inputs (relative step 3.9e-3) and bf16 probabilities in the PV product; outputs are O(1).
    np.testing.assert_allclose(np.asarray(bf16, np.float32), fp32, rtol=0, atol=3e-2)


def test_attention_rejects_bad_shapes():
    q, k, v = _qkv(1, 4, 4, 6, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of kv heads \(4\)"):
        attention(q, k, v)
    q, k, v = _qkv(1, 4, 4, 6, 2, 8)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(heads, kv_len\) = \(6, 4\), got \(6, 5\)"):
        attention(q, k, v, key_bias=jnp.zeros((6, 5)))
    with pytest.raises(ValueError, match="impl must be 'xla' or 'blockwise', got 'flash'"):
        attention(q, k, v, impl="flash")
    # positions and sizes that gave a silent uniform average over every key (future ones too), a truncated float
    # position, an int "attention" or a raw reshape / ZeroDivisionError
    for kwargs, message in (({"kv_length": 0}, r"kv_length: expected values >= 1, got 0"),
                            ({"q_offset": jnp.array([-2])}, r"q_offset: expected values >= 0, got \[-2\]"),
                            ({"q_offset": 1.5}, r"q_offset: expected an integer scalar or \(1,\) array, got float"),
                            ({"kv_length": np.array([2, 3, 4])}, r"kv_length: expected an integer scalar or \(1,\)"),
                            ({"block_size": 0}, r"block_size: expected a positive integer, got 0")):
        with pytest.raises(ValueError, match=message):
            attention(q, k, v, **kwargs)
    with pytest.raises(TypeError, match=r"q: expected a floating-point array, got dtype int32"):
        attention(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match=r"q: expected .*\(batch, len, heads, head_dim\)"):
        attention(q[0], k, v)
    jax.jit(lambda off: attention(q, k, v, q_offset=off, kv_length=off + 1))(jnp.array([3]))  # traced: shape only


def test_rope_and_alibi_helpers_reject_bad_arguments():
    """A misspelt scaling type was silently no scaling; an odd head_dim split unevenly; cos of one position
    broadcast over every position; ALiBi of 0 heads a math domain error."""
    from transformer.attention import apply_rope

    with pytest.raises(ValueError, match=r"scaling_type: expected None, 'default', 'linear' or 'dynamic', got 'lin"):
        rope_inv_freq(8, 1e4, "lineer", 2.0)
    with pytest.raises(ValueError, match=r"head_dim: expected an even number .*got 7"):
        rope_inv_freq(7, 1e4)
    with pytest.raises(ValueError, match=r"head_dim: expected an even number \(> 2 for RoPE"):
        rope_inv_freq(2, 1e4, "dynamic", 2.0, seq_len=5000)
    x = jnp.ones((1, 4, 2, 8))
    cos, sin = rope_cos_sin(jnp.arange(4), rope_inv_freq(8, 1e4), jnp.float32)
    assert apply_rope(x, cos, sin).shape == x.shape
    np.testing.assert_array_equal(apply_rope(x, cos[None], sin[None]), apply_rope(x, cos, sin))  # (1, seq, d)
    with pytest.raises(ValueError, match=r"cos: expected shape \(seq, head_dim\) = \(4, 8\)"):
        apply_rope(x, cos[:1], sin[:1])
    with pytest.raises(ValueError, match=r"num_heads: expected a positive integer, got 0"):
        alibi_slopes(0)


@pytest.mark.parametrize("heads", [6, 8, 12, 32, 64])
def test_alibi_matches_transformers_bit_for_bit(heads):
    """Eager and under jit: XLA computed the bf16 product in fp32 under jit, without its rounding (1.0 off at 32
    heads, whose slopes are not powers of two)."""
    mask = torch.ones(1, 600, dtype=torch.long)
    expected = modeling_falcon.build_alibi_tensor(mask, heads, torch.float32).reshape(heads, 600).numpy()
    np.testing.assert_array_equal(np.asarray(alibi_bias(heads, 600)), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(alibi_bias, static_argnums=(0, 1))(heads, 600)), expected)


def test_alibi_rounds_positions_and_products_to_bf16():
    np.testing.assert_array_equal(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    bias = np.asarray(alibi_bias(6, 512))
    assert bias[4, 511] == 256.0  # slope 1/2 x position 511: 511 rounds to 512 in bf16
    assert bias[4, 257] == 128.0  # 257 rounds to 256
    assert np.abs(bias - alibi_slopes(6)[:, None] * np.arange(512)).max() > 0.4


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.5},
                                  {"rope_type": "dynamic", "factor": 3.0}])
@pytest.mark.parametrize("seq", [20, 200])
def test_rope_matches_transformers(rope, seq):
    hf = HFFalconConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=500042.0,
                        rope_scaling=rope)
    embedding = modeling_falcon.FalconRotaryEmbedding(hf)
    x = torch.zeros(1, seq, 16)
    cos_ref, sin_ref = embedding(x, torch.arange(seq)[None])
    inv_freq = rope_inv_freq(16, 500042.0, rope and rope["rope_type"], rope["factor"] if rope else 1.0,
                             seq_len=seq, max_position_embeddings=64)
    cos, sin = rope_cos_sin(jnp.arange(seq), inv_freq, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), cos_ref[0].numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref[0].numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kwargs", [
    dict(multi_query=True),                                              # [q_0..q_{H-1} | k | v]
    dict(multi_query=False),                                             # [q_h k_h v_h] per head
    dict(new_decoder_architecture=True, num_kv_heads=2),                 # [q_g0 q_g1 q_g2 k_g v_g] per group
])
def test_split_qkv_matches_transformers(kwargs):
    hf = HFFalconConfig(hidden_size=48, num_attention_heads=6, **kwargs)
    ours = FalconConfig(hidden_size=48, num_attention_heads=6, **kwargs)
    fused = np.random.default_rng(0).standard_normal((2, 5, (6 + 2 * ours.kv_heads) * 8)).astype(np.float32)
    layer = modeling_falcon.FalconAttention(hf, layer_idx=0)
    expected = [t.numpy() for t in layer._split_heads(torch.tensor(fused))]
    q, k, v = (np.asarray(t) for t in transformer.split_qkv(jnp.asarray(fused), ours))
    group = 6 // ours.kv_heads
    np.testing.assert_array_equal(q, expected[0])
    # transformers broadcasts k and v to every query head (or keeps 1 head for MQA); query head h uses kv
    # head h // group
    for ref, got in ((expected[1], k), (expected[2], v)):
        np.testing.assert_array_equal(np.repeat(got, group, axis=2) if ref.shape[2] == 6 else got, ref)
    with pytest.raises(ValueError, match=rf"fused: expected shape .* = {fused.shape[-1]}\), got \(2, 5, 1\)"):
        transformer.split_qkv(jnp.asarray(fused[..., :1]), ours)  # a raw reshape error before
