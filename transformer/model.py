"""Falcon as thin NNX modules over the pure functions in attention.py.

The fused query_key_value weight is kept as transformers has it and split per layout in the forward:
multi-query [q_0 .. q_{H-1} | k | v]; multi-head (RW) per head [q_h k_h v_h]; new decoder architecture per kv
group [q_{g,0} .. q_{g,r-1} k_g v_g]. In all three, query head h (in the order the dense layer reads them)
uses kv head h // (heads // kv_heads). Activations are channels-last (batch, seq, features) in the compute
dtype; LayerNorm statistics, attention scores and softmax are fp32; logits leave in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from configs.schema import FalconConfig
from runtime.checks import check_positive_int, is_integer, shape_of
from runtime.interface import CausalLM, DecodeState, call_layer, init_rngs, spec_of
from runtime.layers import Dense, Embed, LayerNorm, dtype_of
from runtime.partitioning import entry_axes
from transformer.attention import alibi_bias, apply_rope, attention, rope_cos_sin, rope_inv_freq


def split_qkv(fused: jax.Array, config: FalconConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(batch, seq, qkv_out) -> q (batch, seq, heads, D), k and v (batch, seq, kv_heads, D)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.kv_heads, config.head_dim
    qkv_out = (heads + 2 * kv_heads) * head_dim
    if len(shape_of(fused)) != 3 or fused.shape[-1] != qkv_out:
        raise ValueError(f"fused: expected shape (batch, seq, (heads + 2 kv_heads) x head_dim = {qkv_out}), got "
                         f"{shape_of(fused)}")
    batch, seq, _ = fused.shape
    if config.qkv_layout == "multi_query":
        x = fused.reshape(batch, seq, heads + 2, head_dim)
        return x[:, :, :heads], x[:, :, heads:heads + 1], x[:, :, heads + 1:]
    if config.qkv_layout == "interleaved":
        x = fused.reshape(batch, seq, heads, 3, head_dim)
        return x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
    group = heads // kv_heads
    x = fused.reshape(batch, seq, kv_heads, group + 2, head_dim)
    return x[:, :, :, :group].reshape(batch, seq, heads, head_dim), x[:, :, :, group], x[:, :, :, group + 1]


class FalconAttention(nnx.Module):
    """query_key_value (fused) -> split -> RoPE (or ALiBi in the scores) -> causal attention -> dense."""

    def __init__(self, config: FalconConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        qkv_out = (config.num_attention_heads + 2 * config.kv_heads) * config.head_dim
        init = config.initializer_range
        # multi-query layout: the attention kernels are split only over "embed" (FSDP; transformer.sharding), and
        # are gathered whole along it for use
        heads = "multi_query_heads" if config.qkv_layout == "multi_query" else None
        self.query_key_value = Dense(config.hidden_size, qkv_out, use_bias=config.bias, dtype=dtype,
                                     param_dtype=pdtype, rngs=rngs, init_std=init,
                                     use_axes=(None, heads) if heads else None)
        self.dense = Dense(config.hidden_size, config.hidden_size, use_bias=config.bias, dtype=dtype,
                           param_dtype=pdtype, rngs=rngs, init_std=init, use_axes=(heads, None) if heads else None)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, key_bias: jax.Array | None,
                 cache: tuple[jax.Array, jax.Array] | None = None, start: jax.Array | None = None,
                 kv_length: jax.Array | None = None):
        """Without ``cache``: causal self-attention over x. With ``cache`` (k, v (batch, max_len, kv_heads, D)):
        x's keys and values are written at per-row positions ``start`` (batch,), and the queries attend to the
        first ``kv_length`` (batch,) cached positions. Returns (output, cache)."""
        cfg = self.config
        q, k, v = split_qkv(self.query_key_value(x), cfg)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q_offset = 0
        if cache is not None:
            write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
            cache = (write(cache[0], k.astype(cache[0].dtype), start), write(cache[1], v.astype(cache[1].dtype), start))
            k, v = cache
            q_offset = start
        impl = cfg.attention_impl
        if impl == "auto":
            impl = "xla" if k.shape[1] <= cfg.attention_block_size else "blockwise"
        out = attention(q, k, v, key_bias=key_bias, q_offset=q_offset, kv_length=kv_length, impl=impl,
                        block_size=cfg.attention_block_size)
        return self.dense(out.reshape(x.shape[0], x.shape[1], cfg.hidden_size)), cache


class FalconMLP(nnx.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))) with the exact erf GELU."""

    def __init__(self, config: FalconConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        dense = lambda i, o: Dense(i, o, use_bias=config.bias, dtype=dtype, param_dtype=pdtype,  # noqa: E731
                                   rngs=rngs, init_std=config.initializer_range)
        self.dense_h_to_4h = dense(config.hidden_size, config.ffn_hidden_size)
        self.dense_4h_to_h = dense(config.ffn_hidden_size, config.hidden_size)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dense_h_to_4h(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(self.dtype)
        return self.dense_4h_to_h(h)


class FalconDecoderLayer(nnx.Module):
    """parallel: x + (mlp(a) + attn(a)), a = input_layernorm(x) (7B, Falcon2-11B);
    parallel_2ln: x + (mlp(ln_mlp(x)) + attn(ln_attn(x))) (40B, 180B);
    sequential: y = x + attn(input_layernorm(x)); y + mlp(post_attention_layernorm(y)) (RW)."""

    def __init__(self, config: FalconConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        norm = lambda: LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype,  # noqa: E731
                                 param_dtype=pdtype)
        self.layout = config.block_layout
        if self.layout == "parallel_2ln":
            self.ln_attn, self.ln_mlp = norm(), norm()
        else:
            self.input_layernorm = norm()
        if self.layout == "sequential":
            self.post_attention_layernorm = norm()
        self.self_attention = FalconAttention(config, rngs=rngs)
        self.mlp = FalconMLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, rope, key_bias, cache=None, start=None, kv_length=None):
        attend = lambda a: self.self_attention(a, rope, key_bias, cache, start, kv_length)  # noqa: E731
        if self.layout == "sequential":
            attn, cache = attend(self.input_layernorm(x))
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x)), cache
        if self.layout == "parallel_2ln":
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn, cache = attend(attn_in)
        return x + (self.mlp(mlp_in) + attn), cache


class FalconLM(CausalLM):
    """word_embeddings -> h (decoder layers) -> ln_f -> lm_head (tied to the embeddings or not)."""

    def __init__(self, config: FalconConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = init_rngs(config, FalconConfig, rngs, seed)
        self.config = config
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        self.word_embeddings = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=pdtype,
                                     rngs=rngs, std=config.initializer_range)
        self.h = nnx.List([FalconDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=pdtype)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs,
            init_std=config.initializer_range)

    def position_terms(self, positions: jax.Array, kv_len: int):
        """(RoPE cos, sin) for query/key ``positions`` (seq,) or (batch, seq), or the ALiBi key bias
        (heads, kv_len) already divided by sqrt(head_dim)."""
        cfg = self.config
        if cfg.alibi:
            return None, alibi_bias(cfg.num_attention_heads, kv_len) / math.sqrt(cfg.head_dim)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_type, cfg.rope_scaling_factor,
                                 seq_len=kv_len, max_position_embeddings=cfg.max_position_embeddings)
        return rope_cos_sin(positions, inv_freq, dtype_of(cfg.compute_dtype)), None

    def run(self, input_ids: jax.Array, state: DecodeState | None, n_valid: jax.Array | None = None,
            remat=None):
        """Final-norm hidden states (batch, seq, hidden) and the new state.

        state None: a plain causal forward. Otherwise the KV cache is extended at each row's own position
        (state.lengths); only the first ``n_valid`` (batch,) tokens of each row are real (default: all).
        ``remat``: a jax.checkpoint policy for each layer (runtime.interface.call_layer).
        """
        seq = input_ids.shape[1]
        h = self.word_embeddings(input_ids)
        if state is None:
            rope, key_bias = self.position_terms(jnp.arange(seq), seq)
            for layer in self.h:
                h, _ = call_layer(layer, remat, h, rope, key_bias)
            return self.ln_f(h), None
        start = state.lengths
        n_valid = jnp.full_like(start, seq) if n_valid is None else n_valid
        kv_length = start + n_valid
        rope, key_bias = self.position_terms(start[:, None] + jnp.arange(seq), state.layers[0][0].shape[1])
        caches = []
        for layer, cache in zip(self.h, state.layers):
            h, cache = call_layer(layer, remat, h, rope, key_bias, cache, start, kv_length)
            caches.append(cache)
        return self.ln_f(h), DecodeState(caches, kv_length)

    @property
    def input_embedding(self) -> Embed:
        return self.word_embeddings

    def empty_state(self, batch_size: int, max_len: int | None = None) -> DecodeState:
        """An empty KV cache of ``max_len`` positions per row; only the KV heads are stored."""
        cfg = self.config
        check_positive_int("batch_size", batch_size)
        if not (is_integer(max_len) and max_len > 0):
            raise ValueError(f"max_len: expected a positive integer (the KV cache length), got {max_len!r}")
        if cfg.rope_scaling_type == "dynamic":
            raise ValueError("rope_scaling: 'dynamic' frequencies depend on the total sequence length, which a "
                             "KV cache does not know in advance; use a full forward (log_likelihood with "
                             "chunk_size=None runs one) or 'linear' scaling")
        shape = (int(batch_size), int(max_len), cfg.kv_heads, cfg.head_dim)
        dtype = dtype_of(cfg.compute_dtype)
        layers = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers)]
        return DecodeState(layers, jnp.zeros((batch_size,), jnp.int32))

    def state_specs(self, mesh) -> DecodeState:
        """The kv heads split like query_key_value's fused heads (whole kv groups per shard, transformer.sharding)
        where they divide over those mesh axes (the multi-query layout's one kv head: whole); the positions whole
        (the rows, the first dimension: CausalLM.state_shardings)."""
        layers = []
        for layer in self.h:
            heads = spec_of(layer.self_attention.query_key_value.kernel.get_value(), 1)
            parts = math.prod(mesh.shape[axis] for axis in entry_axes(heads))
            kv = PartitionSpec(None, None, heads if self.config.kv_heads % parts == 0 else None, None)
            layers.append((kv, kv))
        return DecodeState(layers, PartitionSpec())

    def state_capacity(self, state: DecodeState) -> int | None:
        return state.layers[0][0].shape[1]
