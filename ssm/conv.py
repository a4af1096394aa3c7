"""Causal depthwise conv1d with a carried state (the previous kernel-1 inputs).

Channels-last inside the models: x (batch, seqlen, dim), weight (kernel, dim), state (batch, kernel-1, dim).
Running the conv over a sequence in pieces, each continuing from the state the previous one returned,
gives exactly the conv over the whole sequence. Accumulation is fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.checks import check_float, check_rank, shape_of


def causal_conv1d(x, weight, bias=None, state=None, silu=False):
    """Returns (out (batch, seqlen, dim) in x's dtype, new_state (batch, kernel-1, dim) in x's dtype). ``silu``
    applies SiLU to the fp32 sum before the one rounding to x's dtype, as causal_conv1d's kernels do."""
    check_rank("x", x, (3,), "(batch, seqlen, dim)")
    check_float("x", x)
    batch, length, dim = x.shape
    if not hasattr(weight, "shape") or weight.ndim != 2 or weight.shape[1] != dim or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape (kernel, dim) with kernel >= 1, dim={dim}, got {shape_of(weight)}")
    if bias is not None and shape_of(bias) != (dim,):
        raise ValueError(f"bias: expected shape ({dim},), got {shape_of(bias)}")
    kernel = weight.shape[0]
    if state is not None and shape_of(state) != (batch, kernel - 1, dim):
        raise ValueError(f"state: expected shape (batch, kernel-1, dim) = {(batch, kernel - 1, dim)} (the last "
                         f"kernel-1 inputs), got {shape_of(state)}")
    if state is None:
        state = jnp.zeros((batch, kernel - 1, dim), x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)      # (batch, kernel-1+seqlen, dim)
    w = weight.astype(jnp.float32)
    out = sum(full[:, j:j + length].astype(jnp.float32) * w[j] for j in range(kernel))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    if silu:
        out = jax.nn.silu(out)
    return out.astype(x.dtype), full[:, length:]


def _check_conv_args(x, ranks: tuple, layout: str, weight, bias, activation) -> None:
    """Checks of causal_conv1d's public entry points: x's rank, weight (dim, kernel), bias (dim,), dtypes."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")
    check_rank("x", x, ranks, layout)
    dim = x.shape[1]
    if not hasattr(weight, "shape") or weight.ndim != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight: expected shape (dim, kernel) with dim={dim}, kernel >= 1, got {shape_of(weight)}")
    if bias is not None and tuple(getattr(bias, "shape", ())) != (dim,):
        raise ValueError(f"bias: expected shape ({dim},), got {shape_of(bias)}")
    for name, value in (("x", x), ("weight", weight), ("bias", bias)):
        check_float(name, value)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d's signature and layout: x (batch, dim, seqlen), weight (dim, kernel); initial_states (batch,
    dim, kernel-1): the inputs before x; activation None, "silu" or "swish". Returns out like x, and with
    ``return_final_states`` also the last kernel-1 inputs (batch, dim, kernel-1) in x's dtype, which continue
    the conv as a next call's initial_states. seq_idx (packed sequences) and final_states_out (an in-place
    output) are refused: not supported here."""
    for name, value in (("seq_idx", seq_idx), ("final_states_out", final_states_out)):
        if value is not None:
            raise ValueError(f"{name}: expected None (not supported by this causal_conv1d_fn), got {shape_of(value)}")
    _check_conv_args(x, (3,), "(batch, dim, seqlen)", weight, bias, activation)
    state = None
    if initial_states is not None:
        expected = (x.shape[0], x.shape[1], weight.shape[1] - 1)
        if shape_of(initial_states) != expected:
            raise ValueError(f"initial_states: expected shape (batch, dim, kernel-1) = {expected}, got "
                             f"{shape_of(initial_states)}")
        check_float("initial_states", initial_states)
        state = jnp.swapaxes(initial_states, 1, 2)
    out, final = causal_conv1d(jnp.swapaxes(x, 1, 2), weight.T, bias, state, silu=activation is not None)
    out = jnp.swapaxes(out, 1, 2)
    return (out, jnp.swapaxes(final, 1, 2)) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Decode steps in causal_conv1d's layout: x (batch, dim) or (batch, dim, seqlen); conv_state (batch, dim,
    state_len) holding the last state_len >= kernel - 1 inputs (oldest first), as causal_conv1d_update's
    (without its circular-buffer and index options). Functional: returns (out like x, new_conv_state in
    conv_state's dtype) instead of writing conv_state in place."""
    _check_conv_args(x, (2, 3), "(batch, dim) or (batch, dim, seqlen)", weight, bias, activation)
    batch, dim = x.shape[:2]
    kernel = weight.shape[-1]
    if not hasattr(conv_state, "shape") or conv_state.ndim != 3 or conv_state.shape[:2] != (batch, dim) \
            or conv_state.shape[2] < kernel - 1:
        raise ValueError(f"conv_state: expected shape (batch, dim, state_len) = ({batch}, {dim}, >= {kernel - 1}), "
                         f"got {shape_of(conv_state)}")
    check_float("conv_state", conv_state)
    rows = x[:, :, None] if x.ndim == 2 else x
    state_len = conv_state.shape[2]
    window = conv_state[:, :, state_len - (kernel - 1):]           # the inputs the next output still sees
    out, _ = causal_conv1d(jnp.swapaxes(rows, 1, 2), weight.T, bias, jnp.swapaxes(window, 1, 2),
                           silu=activation is not None)
    out = jnp.swapaxes(out, 1, 2)
    new_state = jnp.concatenate([conv_state, rows.astype(conv_state.dtype)], axis=-1)[:, :, rows.shape[2]:]
    return (out[:, :, 0] if x.ndim == 2 else out), new_state
