"""The causal depthwise conv (ssm/conv.py) against the float64 NumPy oracle (tests/oracle.py), and its forms
against each other.

* causal_conv1d (channels-last, carried state): out and new state vs ``causal_conv1d_oracle``, kernels 2-4,
  with and without bias and initial state;
* state chaining: the conv over a sequence == the conv over pieces carrying the state (pieces of length 1
  and pieces shorter than kernel - 1 included);
* causal_conv1d_fn (causal_conv1d's (batch, dim, seqlen) layout, activation None / "silu") vs the oracle;
* causal_conv1d_update stepped from a zero conv_state == causal_conv1d_fn over the sequence, and the
  conv_state holds the last ``kernel`` inputs, oldest first;
* argument checking: bad shapes / activation raise naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.conv import causal_conv1d, causal_conv1d_fn, causal_conv1d_update
from tests.oracle import causal_conv1d_oracle

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32
BATCH, DIM, SEQLEN = 2, 5, 13


def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def silu64(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_causal_conv1d_matches_oracle(kernel, with_bias, with_state):
    rng = np.random.default_rng(kernel)
    x, weight = normal(rng, BATCH, SEQLEN, DIM), normal(rng, kernel, DIM)
    bias = normal(rng, DIM) if with_bias else None
    state = normal(rng, BATCH, kernel - 1, DIM) if with_state else None
    out, new_state = causal_conv1d(jnp.asarray(x), jnp.asarray(weight), None if bias is None else jnp.asarray(bias),
                                   None if state is None else jnp.asarray(state))
    want_out, want_state = causal_conv1d_oracle(x, weight, bias, state)
    assert out.shape == (BATCH, SEQLEN, DIM) and out.dtype == jnp.float32
    assert new_state.shape == (BATCH, kernel - 1, DIM)
    np.testing.assert_allclose(np.asarray(out), want_out, **TOL)
    np.testing.assert_allclose(np.asarray(new_state), want_state, **TOL)


@pytest.mark.parametrize("pieces", [(1,) * SEQLEN, (1, 2, 1, 5, 4), (2, 2, 9), (6, 7)],
                         ids=lambda p: "-".join(map(str, p)))
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv1d_state_chaining(kernel, pieces):
    assert sum(pieces) == SEQLEN
    rng = np.random.default_rng(10 + kernel)
    x, weight, bias = (jnp.asarray(a) for a in (normal(rng, BATCH, SEQLEN, DIM), normal(rng, kernel, DIM),
                                                normal(rng, DIM)))
    whole_out, whole_state = causal_conv1d(x, weight, bias)
    outs, state, start = [], None, 0
    for length in pieces:
        out, state = causal_conv1d(x[:, start:start + length], weight, bias, state)
        outs.append(out)
        start += length
    np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(whole_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state), np.asarray(whole_state), rtol=0, atol=0)


@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_causal_conv1d_fn_matches_oracle(kernel, activation):
    rng = np.random.default_rng(20 + kernel)
    x, weight, bias = normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, kernel), normal(rng, DIM)
    out = causal_conv1d_fn(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias), activation=activation)
    want, _ = causal_conv1d_oracle(np.swapaxes(x, 1, 2), weight.T, bias)
    want = np.swapaxes(want, 1, 2)
    if activation is not None:
        want = silu64(want)
    assert out.shape == (BATCH, DIM, SEQLEN) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, **TOL)


def test_causal_conv1d_fn_without_bias_matches_oracle():
    rng = np.random.default_rng(30)
    x, weight = normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, 4)
    want, _ = causal_conv1d_oracle(np.swapaxes(x, 1, 2), weight.T)
    np.testing.assert_allclose(np.asarray(causal_conv1d_fn(jnp.asarray(x), jnp.asarray(weight))),
                               np.swapaxes(want, 1, 2), **TOL)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv1d_update_steps_equal_fn(kernel, activation):
    rng = np.random.default_rng(40 + kernel)
    x, weight, bias = (jnp.asarray(a) for a in (normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, kernel),
                                                normal(rng, DIM)))
    want = causal_conv1d_fn(x, weight, bias, activation=activation)
    conv_state = jnp.zeros((BATCH, DIM, kernel), jnp.float32)
    for t in range(SEQLEN):
        out, conv_state = causal_conv1d_update(x[:, :, t], conv_state, weight, bias, activation=activation)
        assert out.shape == (BATCH, DIM) and conv_state.shape == (BATCH, DIM, kernel)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want[:, :, t]), **TOL, err_msg=f"step {t}")
        # the last `kernel` inputs, oldest first, zeros before the sequence start
        seen = np.asarray(x[:, :, max(0, t + 1 - kernel):t + 1])
        expected_state = np.concatenate([np.zeros((BATCH, DIM, kernel - seen.shape[-1]), np.float32), seen], -1)
        np.testing.assert_array_equal(np.asarray(conv_state), expected_state, err_msg=f"step {t}")


def test_causal_conv1d_update_keeps_dtypes():
    x = jnp.ones((BATCH, DIM), jnp.bfloat16)
    out, state = causal_conv1d_update(x, jnp.zeros((BATCH, DIM, 4), jnp.float32), jnp.ones((DIM, 4)))
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32


def _fn_bad_inputs():
    x, w, b = jnp.zeros((BATCH, DIM, SEQLEN)), jnp.zeros((DIM, 4)), jnp.zeros((DIM,))
    P = pytest.param
    return [
        P("x", dict(x=jnp.zeros((DIM, SEQLEN)), weight=w), id="x-ndim"),
        P("weight", dict(x=x, weight=jnp.zeros((DIM + 1, 4))), id="weight-dim"),
        P("weight", dict(x=x, weight=jnp.zeros((DIM,))), id="weight-ndim"),
        P("bias", dict(x=x, weight=w, bias=jnp.zeros((DIM + 1,))), id="bias-length"),
        P("activation", dict(x=x, weight=w, bias=b, activation="relu"), id="activation-unknown"),
    ]


@pytest.mark.parametrize("name, kwargs", _fn_bad_inputs())
def test_causal_conv1d_fn_bad_arguments_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name}:"):
        causal_conv1d_fn(**kwargs)


def _update_bad_inputs():
    x, s, w = jnp.zeros((BATCH, DIM)), jnp.zeros((BATCH, DIM, 4)), jnp.zeros((DIM, 4))
    P = pytest.param
    return [
        P("x", dict(x=jnp.zeros((BATCH, DIM, 1)), conv_state=s, weight=w), id="x-ndim"),
        P("conv_state", dict(x=x, conv_state=jnp.zeros((BATCH, DIM, 3)), weight=w), id="conv_state-kernel"),
        P("conv_state", dict(x=x, conv_state=jnp.zeros((BATCH + 1, DIM, 4)), weight=w), id="conv_state-batch"),
        P("activation", dict(x=x, conv_state=s, weight=w, activation="gelu"), id="activation-unknown"),
        # causal_conv1d's own causal_conv1d_update checks weight (dim, width) and bias (dim,)
        P("weight", dict(x=x, conv_state=s, weight=jnp.zeros((DIM + 1, 4))), id="weight-dim"),
        P("weight", dict(x=x, conv_state=s, weight=jnp.zeros((1, 4))), id="weight-dim-1-broadcasts"),
        P("bias", dict(x=x, conv_state=s, weight=w, bias=jnp.zeros((DIM + 1,))), id="bias-length"),
    ]


@pytest.mark.parametrize("name, kwargs", _update_bad_inputs())
def test_causal_conv1d_update_bad_arguments_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name}:"):
        causal_conv1d_update(**kwargs)


def test_causal_conv1d_is_jittable():
    """The models call causal_conv1d under jit; the result matches eager."""
    rng = np.random.default_rng(50)
    x, w, s = (jnp.asarray(a) for a in (normal(rng, BATCH, SEQLEN, DIM), normal(rng, 4, DIM),
                                        normal(rng, BATCH, 3, DIM)))
    eager = causal_conv1d(x, w, None, s)
    jitted = jax.jit(causal_conv1d)(x, w, None, s)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
