"""Small NNX layers shared by both families: Dense, Embed, RMSNorm, LayerNorm.

Parameters are stored in ``param_dtype`` (fp32 by default) and cast to the compute dtype at use.
Normalisation statistics are always fp32. fp32 matmuls ask for full precision, so GPUs and TPUs do not
silently run them as TF32/bf16 passes; bf16 compute uses the backend's default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from runtime.partitioning import constrain


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def matmul_precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out) (the transpose of torch.nn.Linear.weight); a kernel
    (in, *out) maps (..., in) to (..., *out) (StackedDense)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 init_scale: float | None = None, init_std: float | None = None,
                 use_axes: tuple[str | None, ...] | None = None):
        """Init: torch.nn.Linear's default U(-1/sqrt(in), 1/sqrt(in)) for the weight and a zero bias (mamba_ssm's
        and transformers' models zero their Linear biases); ``init_scale`` sets that uniform bound; ``init_std``
        instead draws the weight from N(0, init_std^2) (transformers' Falcon init). ``use_axes``: the kernel's
        logical axes where it is used (None: whole), which it is constrained to under a traced mesh
        (runtime.partitioning.constrain) before the matmul: for a kernel split only over "embed" (FSDP) as stored,
        an explicit all-gather, where XLA otherwise moved its shards between devices with collective-permutes,
        forward, backward and in the optimizer update."""
        key = rngs.params()
        rngs.params()  # the key the bias once drew from: every later parameter keeps its values
        if init_std is not None:
            kernel = init_std * jax.random.normal(key, (in_features, out_features), param_dtype)
        else:
            bound = init_scale if init_scale is not None else in_features ** -0.5
            kernel = jax.random.uniform(key, (in_features, out_features), param_dtype, -bound, bound)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype
        self.use_axes = use_axes

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """Accumulates in fp32; returns the compute dtype, or ``out_dtype`` (fp32 logits)."""
        kernel = self.kernel[...] if self.use_axes is None else constrain(self.kernel[...], self.use_axes)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=1,
                          precision=matmul_precision(self.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype or self.dtype)


class StackedDense(Dense):
    """``parts`` projections of the same input in one kernel (in, parts, out): (..., in) -> (..., parts, out).

    The HF form is one torch Linear with parts * out output rows (runtime.hf_weights "stacked_linear"); the
    parts axis is kept separate so that sharding ``out`` gives every shard its slice of every part. Init: Dense's
    (fan_in = in, zero bias); the forward is Dense's."""

    def __init__(self, in_features: int, parts: int, out_features: int, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        bound = in_features ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (in_features, parts, out_features), param_dtype,
                                                   -bound, bound))
        if use_bias:
            rngs.params()  # the key the bias once drew from: every later parameter keeps its values
        self.bias = nnx.Param(jnp.zeros((parts, out_features), param_dtype)) if use_bias else None
        self.dtype = dtype
        self.use_axes = None


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs, std: float = 1.0):
        self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Under a traced mesh, the table whole along its features (an all-gather of its FSDP shards) before the
        # gather: gathered from the sharded table, the rows came out split over features and XLA could bring
        # them (and their gradient) to the batch-split activations only by replicating them first
        # ("involuntary full rematerialization"; docs/TRAINING.md, Sharding).
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: fp32 logits x @ embedding^T."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                       precision=matmul_precision(self.dtype), preferred_element_type=jnp.float32)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, in fp32, returned in x's dtype (no weight)."""
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...].astype(self.dtype) * rms_normalize(x, self.eps).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: (x - mean) * rsqrt(var + eps) * weight + bias, statistics and affine in fp32."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
