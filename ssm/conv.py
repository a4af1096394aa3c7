"""Causal depthwise conv1d with a carried state (the previous kernel-1 inputs).

Channels-last inside the models: x (batch, seqlen, dim), weight (kernel, dim), state (batch, kernel-1, dim).
Running the conv over a sequence in pieces, each continuing from the state the previous one returned,
gives exactly the conv over the whole sequence. Accumulation is fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d(x, weight, bias=None, state=None):
    """Returns (out (batch, seqlen, dim) in x's dtype, new_state (batch, kernel-1, dim) in x's dtype)."""
    kernel = weight.shape[0]
    batch, length, dim = x.shape
    if state is None:
        state = jnp.zeros((batch, kernel - 1, dim), x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)      # (batch, kernel-1+seqlen, dim)
    w = weight.astype(jnp.float32)
    out = sum(full[:, j:j + length].astype(jnp.float32) * w[j] for j in range(kernel))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype), full[:, length:]


def _check_conv_args(x, ndim: int, layout: str, weight, bias, activation) -> None:
    """Checks of causal_conv1d's public entry points: x's rank, weight (dim, kernel), bias (dim,)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    if not hasattr(x, "shape") or x.ndim != ndim:
        raise ValueError(f"x: expected shape {layout}, got {getattr(x, 'shape', type(x).__name__)}")
    dim = x.shape[1]
    if not hasattr(weight, "shape") or weight.ndim != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight: expected shape (dim, kernel) with dim={dim}, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if bias is not None and tuple(getattr(bias, "shape", ())) != (dim,):
        raise ValueError(f"bias: expected shape ({dim},), got {getattr(bias, 'shape', type(bias).__name__)}")


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """causal_conv1d's layout: x (batch, dim, seqlen), weight (dim, kernel); activation None or "silu"."""
    _check_conv_args(x, 3, "(batch, dim, seqlen)", weight, bias, activation)
    out, _ = causal_conv1d(jnp.swapaxes(x, 1, 2), weight.T, bias)
    if activation is not None:
        out = jax.nn.silu(out.astype(jnp.float32)).astype(x.dtype)
    return jnp.swapaxes(out, 1, 2)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decode step in causal_conv1d's layout: x (batch, dim), conv_state (batch, dim, kernel) holding the
    last ``kernel`` inputs (oldest first). Functional: returns (out (batch, dim), new_conv_state)."""
    _check_conv_args(x, 2, "(batch, dim)", weight, bias, activation)
    batch, dim = x.shape
    kernel = weight.shape[-1]
    if tuple(conv_state.shape) != (batch, dim, kernel):
        raise ValueError(f"conv_state: expected shape {(batch, dim, kernel)}, got {tuple(conv_state.shape)}")
    new_state = jnp.concatenate([conv_state[:, :, 1:], x[:, :, None].astype(conv_state.dtype)], axis=-1)
    out = jnp.sum(new_state.astype(jnp.float32) * weight.astype(jnp.float32), axis=-1)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    if activation is not None:
        out = jax.nn.silu(out)
    return out.astype(x.dtype), new_state
