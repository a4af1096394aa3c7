"""The causal depthwise conv (ssm/conv.py) against the float64 NumPy oracle (tests/oracle.py), and its forms
against each other.

* causal_conv1d (channels-last, carried state): out and new state vs ``causal_conv1d_oracle``, kernels 2-4,
  with and without bias and initial state;
* state chaining: the conv over a sequence == the conv over pieces carrying the state (pieces of length 1
  and pieces shorter than kernel - 1 included);
* causal_conv1d_fn (causal_conv1d's (batch, dim, seqlen) layout, activation None / "silu") vs the oracle;
* causal_conv1d_update stepped from a zero conv_state (any state_len >= kernel - 1, one token or several a call)
  == causal_conv1d_fn over the sequence, and the conv_state holds the last state_len inputs, oldest first;
* bf16 with silu: rounded once, as causal_conv1d's kernels;
* argument checking: bad shapes, dtypes and activation raise naming the argument.
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


@pytest.mark.parametrize("length", [1, 2, SEQLEN])
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv1d_fn_initial_and_final_states(kernel, length):
    """causal_conv1d's initial_states / return_final_states: against the oracle, and two calls chained through
    them equal one call (a piece shorter than kernel-1 keeps part of its initial state in the final one)."""
    rng = np.random.default_rng(60 + kernel + length)
    x, weight, bias = normal(rng, BATCH, DIM, length), normal(rng, DIM, kernel), normal(rng, DIM)
    initial = normal(rng, BATCH, DIM, kernel - 1)
    out, final = causal_conv1d_fn(*map(jnp.asarray, (x, weight, bias)), initial_states=jnp.asarray(initial),
                                  return_final_states=True, activation="silu")
    want, last = causal_conv1d_oracle(np.swapaxes(x, 1, 2), weight.T, bias, np.swapaxes(initial, 1, 2))
    np.testing.assert_allclose(np.asarray(out), silu64(np.swapaxes(want, 1, 2)), **TOL)
    np.testing.assert_array_equal(np.asarray(final), np.swapaxes(last, 1, 2))
    assert final.shape == (BATCH, DIM, kernel - 1) and final.dtype == jnp.float32
    more = normal(rng, BATCH, DIM, 3)
    whole = causal_conv1d_fn(*map(jnp.asarray, (np.concatenate([x, more], axis=2), weight, bias)),
                             initial_states=jnp.asarray(initial))
    np.testing.assert_allclose(np.asarray(causal_conv1d_fn(jnp.asarray(more), jnp.asarray(weight), jnp.asarray(bias),
                                                           initial_states=final)),
                               np.asarray(whole)[:, :, length:], rtol=1e-6, atol=1e-6)


def test_causal_conv1d_fn_without_bias_matches_oracle():
    rng = np.random.default_rng(30)
    x, weight = normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, 4)
    want, _ = causal_conv1d_oracle(np.swapaxes(x, 1, 2), weight.T)
    np.testing.assert_allclose(np.asarray(causal_conv1d_fn(jnp.asarray(x), jnp.asarray(weight))),
                               np.swapaxes(want, 1, 2), **TOL)


@pytest.mark.parametrize("extra", [-1, 0, 2], ids=["state_len=kernel-1", "state_len=kernel", "state_len=kernel+2"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv1d_update_steps_equal_fn(kernel, activation, extra):
    """causal_conv1d's conv_state is (batch, dim, state_len) for any state_len >= kernel - 1."""
    rng = np.random.default_rng(40 + kernel)
    x, weight, bias = (jnp.asarray(a) for a in (normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, kernel),
                                                normal(rng, DIM)))
    want = causal_conv1d_fn(x, weight, bias, activation=activation)
    state_len = kernel + extra
    conv_state = jnp.zeros((BATCH, DIM, state_len), jnp.float32)
    for t in range(SEQLEN):
        out, conv_state = causal_conv1d_update(x[:, :, t], conv_state, weight, bias, activation=activation)
        assert out.shape == (BATCH, DIM) and conv_state.shape == (BATCH, DIM, state_len)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want[:, :, t]), **TOL, err_msg=f"step {t}")
        # the last state_len inputs, oldest first, zeros before the sequence start
        seen = np.asarray(x[:, :, max(0, t + 1 - state_len):t + 1])
        expected_state = np.concatenate([np.zeros((BATCH, DIM, state_len - seen.shape[-1]), np.float32), seen], -1)
        np.testing.assert_array_equal(np.asarray(conv_state), expected_state, err_msg=f"step {t}")


@pytest.mark.parametrize("state_len", [3, 6])
def test_causal_conv1d_update_takes_several_tokens(state_len):
    """x (batch, dim, seqlen): the update over pieces of 1, 5 and 7 tokens == the conv over the sequence."""
    rng = np.random.default_rng(45)
    x, weight, bias = (jnp.asarray(a) for a in (normal(rng, BATCH, DIM, SEQLEN), normal(rng, DIM, 4),
                                                normal(rng, DIM)))
    conv_state, outs, start = jnp.zeros((BATCH, DIM, state_len), jnp.float32), [], 0
    for length in (1, 5, 7):
        out, conv_state = causal_conv1d_update(x[:, :, start:start + length], conv_state, weight, bias, "silu")
        assert out.shape == (BATCH, DIM, length)
        outs.append(out)
        start += length
    np.testing.assert_allclose(np.concatenate(outs, -1), causal_conv1d_fn(x, weight, bias, activation="silu"), **TOL)
    np.testing.assert_array_equal(conv_state, x[:, :, -state_len:])


def test_bf16_silu_is_rounded_once():
    """causal_conv1d's kernels round the fp32 silu(conv) once to bf16: so do causal_conv1d_fn and the stepped
    update (bit for bit the same), against the float64 oracle rounded once (a rare tie between fp32 and float64
    sums aside). Rounding the conv to bf16 before silu as well would change ~1/4 of the outputs."""
    import ml_dtypes

    rng = np.random.default_rng(46)
    x = jnp.asarray(normal(rng, 2, 64, 64), jnp.bfloat16)
    weight, bias = jnp.asarray(normal(rng, 64, 4), jnp.bfloat16), jnp.asarray(normal(rng, 64), jnp.bfloat16)
    out = causal_conv1d_fn(x, weight, bias, activation="silu")
    state, steps = jnp.zeros((2, 64, 3), jnp.bfloat16), []
    for t in range(64):
        step, state = causal_conv1d_update(x[:, :, t], state, weight, bias, activation="silu")
        steps.append(step)
    np.testing.assert_array_equal(np.asarray(jnp.stack(steps, -1), np.float32), np.asarray(out, np.float32))
    f64 = [np.asarray(a, np.float64) for a in (x, weight, bias)]
    conv, _ = causal_conv1d_oracle(np.swapaxes(f64[0], 1, 2), f64[1].T, f64[2])
    want = silu64(np.swapaxes(conv, 1, 2)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.mean(np.asarray(out, np.float32) != want) < 0.002


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
        P("weight", dict(x=x, weight=jnp.zeros((DIM, 0))), id="weight-kernel-0"),  # a raw broadcast error
        P("bias", dict(x=x, weight=w, bias=jnp.zeros((DIM + 1,))), id="bias-length"),
        P("activation", dict(x=x, weight=w, bias=b, activation="relu"), id="activation-unknown"),
        P("initial_states", dict(x=x, weight=w, initial_states=jnp.zeros((BATCH, DIM, 4))), id="initial-kernel"),
        P("seq_idx", dict(x=x, weight=w, seq_idx=jnp.zeros((BATCH, SEQLEN), jnp.int32)), id="seq_idx"),
    ]


@pytest.mark.parametrize("name, kwargs", _fn_bad_inputs())
def test_causal_conv1d_fn_bad_arguments_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name}:"):
        causal_conv1d_fn(**kwargs)


def _update_bad_inputs():
    x, s, w = jnp.zeros((BATCH, DIM)), jnp.zeros((BATCH, DIM, 4)), jnp.zeros((DIM, 4))
    P = pytest.param
    return [
        P("x", dict(x=jnp.zeros((DIM,)), conv_state=s, weight=w), id="x-ndim"),
        P("conv_state", dict(x=x, conv_state=jnp.zeros((BATCH, DIM, 2)), weight=w), id="conv_state-short"),
        P("conv_state", dict(x=x, conv_state=jnp.zeros((BATCH, DIM)), weight=w), id="conv_state-ndim"),
        P("conv_state", dict(x=x, conv_state=jnp.zeros((BATCH + 1, DIM, 4)), weight=w), id="conv_state-batch"),
        P("activation", dict(x=x, conv_state=s, weight=w, activation="gelu"), id="activation-unknown"),
        # causal_conv1d's own causal_conv1d_update checks weight (dim, width) and bias (dim,)
        P("weight", dict(x=x, conv_state=s, weight=jnp.zeros((DIM + 1, 4))), id="weight-dim"),
        P("weight", dict(x=x, conv_state=s, weight=jnp.zeros((1, 4))), id="weight-dim-1-broadcasts"),
        P("weight", dict(x=x, conv_state=s, weight=jnp.zeros((DIM, 0))), id="weight-kernel-0"),
        P("bias", dict(x=x, conv_state=s, weight=w, bias=jnp.zeros((DIM + 1,))), id="bias-length"),
    ]


@pytest.mark.parametrize("name, kwargs", _update_bad_inputs())
def test_causal_conv1d_update_bad_arguments_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=f"^{name}:"):
        causal_conv1d_update(**kwargs)


@pytest.mark.parametrize("name", ["x", "weight", "bias", "conv_state"])
def test_integer_arrays_raise_naming_them(name):
    """An integer array would be truncated on the way out (x) or into the state: refused, naming it."""
    args = dict(x=jnp.zeros((BATCH, DIM)), conv_state=jnp.zeros((BATCH, DIM, 4)), weight=jnp.zeros((DIM, 4)),
                bias=jnp.zeros((DIM,)))
    args[name] = args[name].astype(jnp.int32)
    with pytest.raises(TypeError, match=f"^{name}: expected a floating-point array, got dtype int32"):
        causal_conv1d_update(**args)
    if name != "conv_state":
        args.pop("conv_state")
        args["x"] = args["x"][:, :, None]
        with pytest.raises(TypeError, match=f"^{name}:"):
            causal_conv1d_fn(**args)


@pytest.mark.parametrize("name, kwargs", [
    # transformers' conv_state holds kernel rows: passed as the carried state, it was accepted, shifting the conv
    ("state", dict(state=jnp.zeros((BATCH, 4, DIM)))),
    ("state", dict(state=jnp.zeros((BATCH, 3, DIM + 1)))),
    ("weight", dict(weight=jnp.zeros((4, DIM + 1)))),
    ("weight", dict(weight=jnp.zeros((0, DIM)))),
    ("x", dict(x=jnp.zeros((SEQLEN, DIM)))),
    ("bias", dict(bias=jnp.zeros((1,)))),  # broadcast over the channels
])
def test_causal_conv1d_bad_arguments_raise_naming_them(name, kwargs):
    args = dict(x=jnp.zeros((BATCH, SEQLEN, DIM)), weight=jnp.zeros((4, DIM)), state=jnp.zeros((BATCH, 3, DIM)))
    causal_conv1d(**args)
    with pytest.raises(ValueError, match=f"^{name}: expected shape"):
        causal_conv1d(**{**args, **kwargs})
    with pytest.raises(TypeError, match="^x: expected a floating-point array, got dtype int32"):
        causal_conv1d(**{**args, "x": args["x"].astype(jnp.int32)})


def test_causal_conv1d_is_jittable():
    """The models call causal_conv1d under jit; the result matches eager."""
    rng = np.random.default_rng(50)
    x, w, s = (jnp.asarray(a) for a in (normal(rng, BATCH, SEQLEN, DIM), normal(rng, 4, DIM),
                                        normal(rng, BATCH, 3, DIM)))
    eager = causal_conv1d(x, w, None, s)
    jitted = jax.jit(causal_conv1d)(x, w, None, s)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
