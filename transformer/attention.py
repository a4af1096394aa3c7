"""Falcon attention as pure functions: RoPE, ALiBi and causal grouped-query attention (two implementations).

Layouts are channels-last: queries (batch, q_len, heads, head_dim), keys and values
(batch, kv_len, kv_heads, head_dim). Query head h reads kv head h // (heads // kv_heads); keys and values are
never repeated per query head: inside, the queries of a kv head are the rows of one matrix (batch, kv_heads,
group * q_len, head_dim), one matmul per (batch, kv head) against the keys in their own layout. On a 2-core CPU
this made the tiny_falcon train step (8 x 512 tokens, multi-query) 1.95x faster than einsums over a separate
(kv_heads, group) pair of axes, its prefill into a KV cache 5-6x faster, decode unchanged (docs/BENCHMARKS.md,
"The attention layout"). Queries sit at
positions ``q_offset + arange(q_len)``, keys at ``arange(kv_len)``, and only the first ``kv_length`` keys are
valid, so a KV cache of fixed size can be passed as keys and values.

Both implementations compute the same function with fp32 scores and softmax statistics: "xla" materialises
the (q_len, kv_len) scores; "blockwise" runs an online softmax over key blocks with lax.scan and never holds
more than (q_len, block) scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from runtime.checks import check_float, check_positive_int, check_rank, shape_of
from runtime.layers import matmul_precision

# Masked scores: finite, so that a block in which a query sees no key yet gives no NaN in the online softmax;
# exp(MASKED - m) is exactly 0 once any real score has been seen (every query sees at least key 0).
MASKED = -1e30


def rope_inv_freq(head_dim: int, theta: float, scaling_type: str | None = None, factor: float = 1.0,
                  seq_len: int | None = None, max_position_embeddings: int = 2048) -> jax.Array:
    """fp32 inverse frequencies (head_dim // 2,) as transformers computes them.

    "linear" divides them by ``factor``; "dynamic" (NTK) raises the base to
    theta * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)) once the sequence length L = ``seq_len``
    exceeds max_position_embeddings (in fp32, like transformers' tensor arithmetic).
    """
    if scaling_type not in (None, "default", "linear", "dynamic"):
        raise ValueError(f"scaling_type: expected None, 'default', 'linear' or 'dynamic', got {scaling_type!r}")
    check_positive_int("head_dim", head_dim)
    if head_dim % 2 or (scaling_type == "dynamic" and head_dim == 2):  # dynamic raises to d / (d - 2)
        raise ValueError(f"head_dim: expected an even number ({'> 2 ' if scaling_type == 'dynamic' else ''}"
                         f"for RoPE's half split), got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    base = jnp.float32(theta)
    if scaling_type == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        ratio = jnp.float32(factor) * jnp.float32(seq_len) / jnp.float32(max_position_embeddings) - (factor - 1)
        base = base * ratio ** jnp.float32(head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** exponents
    return inv_freq / factor if scaling_type == "linear" else inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin (*positions.shape, head_dim) over the NeoX half split, computed in fp32 then cast to ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, seq, heads, head_dim) rotated in its own dtype; cos, sin (seq, head_dim) or per row
    (batch, seq, head_dim)."""
    batch, seq, _, head_dim = x.shape
    for name, value in (("cos", cos), ("sin", sin)):
        shape = shape_of(value)  # a (1, d) one would broadcast one position over all
        if shape not in ((seq, head_dim), (1, seq, head_dim), (batch, seq, head_dim)):
            raise ValueError(f"{name}: expected shape (seq, head_dim) = {(seq, head_dim)} or ([1 or batch], seq, "
                             f"head_dim) = {(batch, seq, head_dim)}, got {shape}")
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def alibi_slopes(num_heads: int) -> np.ndarray:
    """BLOOM's slopes (fp32): powers of 2^(-8/n) for the closest power of two n <= num_heads, then the odd
    powers of 2^(-4/n) for the remaining heads."""
    check_positive_int("num_heads", num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = [base ** np.float32(p) for p in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base ** np.float32(p) for p in range(1, 2 * remaining, 2)]
    return np.asarray(slopes, np.float32)


def alibi_bias(num_heads: int, kv_len: int) -> jax.Array:
    """ALiBi bias (heads, kv_len) in fp32, before the 1/sqrt(head_dim) scale, rounded as transformers does.

    The slope and the key position are each rounded to bf16 and so is their product, even in fp32 models
    (position 511 becomes 512): exact fp32 ALiBi differs from the reference by ~0.9 in logits at 512 tokens.
    The roundings are lax.reduce_precision, which XLA keeps: a bf16 multiply is computed in fp32 under jit on
    CPU and GPU with the rounding of the product dropped (excess precision), 0.25 off in falcon-rw-1b's logits.
    """
    def bf16(x):  # fp32 rounded to the nearest bf16 value, as an fp32 array
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)

    slopes = bf16(jnp.asarray(alibi_slopes(num_heads)))
    positions = bf16(jnp.arange(kv_len, dtype=jnp.float32))
    return bf16(slopes[:, None] * positions[None, :])


def _heads_major(q: jax.Array, kv_heads: int) -> jax.Array:
    """q (batch, q_len, heads, head_dim) as (batch, kv_heads, group * q_len, head_dim): the queries that share a
    kv head are the rows of one matrix, so each (batch, kv head) is one matmul against its keys (for multi-query
    attention, all heads at once)."""
    batch, q_len, heads, head_dim = q.shape
    if heads % kv_heads:
        raise ValueError(f"attention: query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    group = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    return q.reshape(batch, kv_heads, group * q_len, head_dim)  # sizes spelt out: -1 fails on an empty q


def _scores(q: jax.Array, k: jax.Array, scale: float, key_bias: jax.Array | None, q_pos: jax.Array,
            k_pos: jax.Array, kv_length, group: int) -> jax.Array:
    """fp32 masked scores (batch, kv_heads, group * q_len, k_len) of heads-major q (``_heads_major``) and k
    (batch, k_len, kv_heads, head_dim); key_bias (kv_heads, group, k_len); ``group`` = rows / q_len (given: q_len
    may be 0)."""
    batch, kv_heads, rows, _ = q.shape
    q_len, k_len = q_pos.shape[1], k.shape[1]
    s = jnp.einsum("bhqd,bkhd->bhqk", q, k, precision=matmul_precision(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    s = s.reshape(batch, kv_heads, group, q_len, k_len)
    if key_bias is not None:
        s = s + key_bias[None, :, :, None, :]
    # q_pos (batch, q_len), kv_length (batch,): per-row causal and cache-length visibility (batch, q_len, k_len)
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_length[:, None, None])
    return jnp.where(visible[:, None, None], s, MASKED).reshape(batch, kv_heads, rows, k_len)


def _check_positions(name: str, value, batch: int, minimum: int) -> None:
    """q_offset / kv_length: an integer scalar or one per row (batch,), >= ``minimum`` where it is concrete (a
    negative q_offset or kv_length 0 left a query with no visible key: a uniform average over every key)."""
    if value is None:
        return
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if array.shape not in ((), (batch,)) or not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer scalar or ({batch},) array, got {array.dtype} {array.shape}")
    if not isinstance(array, jax.core.Tracer) and array.size and int(np.min(np.asarray(array))) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {np.asarray(array).tolist()}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_bias: jax.Array | None = None, q_offset=0,
              kv_length=None, impl: str = "xla", block_size: int = 1024) -> jax.Array:
    """Causal softmax(q k^T / sqrt(head_dim) + key_bias) v; returns (batch, q_len, heads, head_dim) in q's dtype.

    key_bias: optional (heads, kv_len) fp32 bias added after the scale (ALiBi already divided by
    sqrt(head_dim)). q_offset: position of the first query, a scalar or one per row (batch,). kv_length:
    number of valid keys, a scalar or one per row (batch,) (default kv_len).
    """
    if impl not in ("xla", "blockwise"):
        raise ValueError(f"attention: impl must be 'xla' or 'blockwise', got {impl!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, (4,), "(batch, len, heads, head_dim)")
        check_float(name, x)
    check_positive_int("block_size", block_size)
    batch, q_len, heads, head_dim = q.shape
    _check_positions("q_offset", q_offset, batch, 0)
    _check_positions("kv_length", kv_length, batch, 1)
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != (batch, kv_len, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"attention: k and v must have shape (batch {batch}, kv_len, kv_heads, head_dim "
                         f"{head_dim}), got k {k.shape} and v {v.shape}")
    if key_bias is not None and key_bias.shape != (heads, kv_len):
        raise ValueError(f"attention: key_bias must have shape (heads, kv_len) = {(heads, kv_len)}, "
                         f"got {key_bias.shape}")
    kv_length = jnp.broadcast_to(jnp.asarray(kv_len if kv_length is None else kv_length, jnp.int32), (batch,))
    scale = 1.0 / math.sqrt(head_dim)
    qh = _heads_major(q, kv_heads)
    group = heads // kv_heads
    bias = None if key_bias is None else key_bias.reshape(kv_heads, group, kv_len)
    q_pos = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))[:, None] + jnp.arange(q_len)
    precision = matmul_precision(q.dtype)

    def heads_last(out):  # (batch, kv_heads, group * q_len, head_dim) fp32 -> (batch, q_len, heads, head_dim)
        out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
        return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)

    if impl == "xla":
        p = jax.nn.softmax(_scores(qh, k, scale, bias, q_pos, jnp.arange(kv_len), kv_length, group), axis=-1)
        return heads_last(jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v, precision=precision,
                                     preferred_element_type=jnp.float32))

    blocks = -(-kv_len // block_size)
    pad = blocks * block_size - kv_len

    def in_blocks(x):  # (batch, kv_len, kv_heads, head_dim) -> (blocks, batch, block_size, kv_heads, head_dim)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(batch, blocks, block_size, kv_heads, head_dim), 1, 0)

    if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad))).reshape(kv_heads, group, blocks, block_size)
        bias = jnp.moveaxis(bias, 2, 0)
    kv_length = jnp.minimum(kv_length, kv_len)  # padded keys are never visible

    def step(carry, xs):
        m, l, acc = carry
        index, kb, vb, bb = xs
        s = _scores(qh, kb, scale, bb, q_pos, index * block_size + jnp.arange(block_size), kv_length,
                    group)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", p.astype(v.dtype), vb, precision=precision, preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    stats = qh.shape[:3]
    init = (jnp.full(stats, MASKED, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats + (head_dim,), jnp.float32))
    (_, l, acc), _ = lax.scan(step, init, (jnp.arange(blocks), in_blocks(k), in_blocks(v), bias))
    return heads_last(acc / l[..., None])
