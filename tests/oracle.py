"""Float64 NumPy oracles: the selective scan and the causal conv, written from the math, not from our code."""

from __future__ import annotations

import numpy as np


def softplus64(x):
    x = np.asarray(x, np.float64)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def selective_scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None):
    """mamba_ssm layout: u, delta, z (b, d, l); B, C (b, n, l) or (b, g, n, l). Returns (out, last_state)."""
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, length = u.shape
    dstate = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = softplus64(delta)

    def per_channel(x):  # (b, [g,] n, l) -> (b, d, n, l)
        if x.ndim == 3:
            x = x[:, None]
        groups = x.shape[1]
        return np.repeat(x, dim // groups, axis=1)

    Bc, Cc = per_channel(B), per_channel(C)
    h = np.zeros((batch, dim, dstate)) if initial_state is None else f(initial_state).copy()
    ys = np.empty((batch, dim, length))
    for t in range(length):
        h = np.exp(delta[:, :, t, None] * A[None]) * h + delta[:, :, t, None] * Bc[..., t] * u[:, :, t, None]
        ys[:, :, t] = np.sum(h * Cc[..., t], axis=-1)
    out = ys if D is None else ys + D[None, :, None] * u
    if z is not None:
        out = out * z / (1.0 + np.exp(-z))
    return out, h


def causal_conv1d_oracle(x, weight, bias=None, initial=None):
    """x (b, l, d) channels-last; weight (k, d); initial (b, k-1, d) previous inputs. Returns (out, last)."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    k = weight.shape[0]
    batch, length, dim = x.shape
    prev = np.zeros((batch, k - 1, dim)) if initial is None else np.asarray(initial, np.float64)
    full = np.concatenate([prev, x], axis=1)
    out = np.zeros((batch, length, dim))
    for t in range(length):
        out[:, t] = np.sum(full[:, t:t + k] * weight[None], axis=1)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out, full[:, full.shape[1] - (k - 1):]
