"""impl="pallas": both kernel sets, the GPU (Triton) kernels of ssm/pallas_scan.py and the TPU (Mosaic) kernels of
ssm/pallas_scan_tpu.py, against the float64 oracle and the "reference" impl, mirroring test_scan.py.

On CPU the kernels run in the Pallas interpreters (interpret=True / pltpu.InterpretParams), so these tests check
their logic (tiling, padding, the group/block mapping, the custom VJP's reverse-time kernels) but not their
compilation for a device; both are lowered for their accelerator with jax.export here, and
tests/test_gpu_live.py runs the Triton ones compiled. Shapes are small because the interpreters are slow.

* forward: out and last state vs ``selective_scan_oracle``, fp32 (mamba_ssm's fp32 tolerances) and bf16;
  seqlen not a multiple of the tile, several channel blocks per B/C group, every optional input on and off;
* initial_state: vs the oracle, and a scan split in pieces == the whole scan;
* gradients: every differentiable input == "reference"'s gradients;
* what the custom VJP saves: no residual holds a state per step (only the per-tile boundary states); the forward
  alone writes none, and the backward writes its row gradients in the inputs' dtype;
* the Triton kernel's tuning knobs compute the same function; bad knobs and shapes are named;
* shard_map: batch split on "data", channels on "tensor" (2 fake CPU devices, in a subprocess) == unsharded;
  under a traced mesh, grouped B/C and a single batch row with gradients;
* the optional inputs in mixed combinations (COMBO_CASES), batch 1, odd dstate and channel blocks, bf16 gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.scan import selective_scan_fn, to_channels_last
from tests.test_scan import (BF16_TOL, FWD_TOL, GRAD_TOL, check_low_precision_against_oracle, make_inputs, oracle,
                             scan_in_pieces, to_jax)


def tpu_scan(kwargs, tile, **overrides):
    """selective_scan_fn's mamba-layout keyword arguments through the Mosaic kernels; returns (out (b, d, l),
    last_state (b, d, n))."""
    from ssm.pallas_scan import selective_scan_pallas

    k = {**kwargs, **overrides}
    u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k.get("z"))
    out, last = selective_scan_pallas(u, delta, k["A"], B, C, k.get("D"), z, k.get("delta_bias"),
                                      k.get("delta_softplus", False),
                                      initial_state=k.get("initial_state"), tile=tile, kernel="mosaic_tpu")
    return jnp.swapaxes(out, 1, 2), last


def pallas_scan(kwargs, kernel, tile):
    """(out, last_state) of selective_scan_fn's keyword arguments through one of the Pallas kernels."""
    if kernel == "mosaic_tpu":
        return tpu_scan(kwargs, tile)
    return selective_scan_fn(**kwargs, return_last_state=True, impl="pallas", chunk_size=tile)


# (seqlen, dim, dstate, bc, D, z, delta_bias, softplus, A_kind, tile) per kernel. Triton: one step, seqlen
# not a multiple of the tile, grouped and mixed layouts, several 32-channel blocks per group. TPU: one step;
# fewer channels than lanes; two groups of 128 channels; two 128-lane blocks in one group. The TPU interpreter's
# time grows with the steps (per program and state row): seqlen 50 is two 32-step tiles, the last padded.
FWD_CASES = {
    "triton": [
        (1, 8, 4, "bnl", True, True, True, True, "exp", 16),
        (7, 8, 8, "g2", False, False, False, False, "range", 16),
        (50, 8, 4, "g1", True, False, True, False, "exp", 16),
        (50, 8, 8, "bnl|g2", False, True, False, True, "exp", 32),
        (100, 8, 8, "g2", True, True, True, True, "range", 32),
        (64, 128, 4, "g2", True, True, True, True, "exp", 16),   # 64 channels per group: 2 blocks of 32 each
    ],
    "mosaic_tpu": [
        (1, 128, 4, "bnl", True, True, True, True, "exp", 16),
        (50, 8, 8, "g1", True, False, False, False, "range", 16),
        (50, 256, 8, "g2", True, True, True, True, "exp", 32),
        (40, 256, 16, "bnl|g1", False, True, False, True, "exp", 16),
    ],
}
KERNELS = sorted(FWD_CASES)


def _case_id(case):
    seqlen, dim, dstate, bc, D, z, bias, softplus, A_kind, tile = case
    flags = "".join(name for name, on in (("D", D), ("z", z), ("b", bias), ("sp", softplus)) if on)
    return f"l{seqlen}-d{dim}-n{dstate}-{bc.replace('|', '.')}-{flags or 'none'}-A{A_kind}-t{tile}"


@pytest.mark.parametrize("kernel, case", [(k, c) for k in KERNELS for c in FWD_CASES[k]],
                         ids=[f"{k}-{_case_id(c)}" for k in KERNELS for c in FWD_CASES[k]])
def test_forward_matches_oracle(kernel, case):
    seqlen, dim, dstate, bc, D, z, bias, softplus, A_kind, tile = case
    kwargs = make_inputs(seqlen * 100 + dim, 2, dim, dstate, seqlen, bc=bc, D=D, z=z, bias=bias,
                         softplus=softplus, A_kind=A_kind, initial_state=kernel == "mosaic_tpu")
    out, last = pallas_scan(to_jax(kwargs), kernel, tile)
    want_out, want_last = oracle(kwargs)
    assert out.shape == (2, dim, seqlen) and out.dtype == jnp.float32
    assert last.shape == (2, dim, dstate) and last.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want_out, **FWD_TOL)
    np.testing.assert_allclose(np.asarray(last), want_last, **FWD_TOL)


@pytest.mark.parametrize("kernel, dim, bc", [("triton", 8, "g2"), ("mosaic_tpu", 128, "g1")])
def test_forward_bf16_matches_oracle_on_rounded_inputs(kernel, dim, bc):
    low = ("u", "delta", "B", "C", "z")
    inputs = to_jax(make_inputs(2, 2, dim, 8, 70, bc=bc), jnp.bfloat16, low)
    check_low_precision_against_oracle(inputs, *pallas_scan(inputs, kernel, 32))


def test_initial_state_and_pieces_match_oracle():
    """With an initial state vs the oracle; scanning in pieces (carrying the state) == the whole scan."""
    kwargs = make_inputs(3, 2, 8, 4, 60, bc="g2", initial_state=True)
    run = lambda **kw: selective_scan_fn(return_last_state=True, impl="pallas", chunk_size=16, **kw)  # noqa: E731
    whole_out, whole_last = run(**to_jax(kwargs))
    want_out, want_last = oracle(kwargs)
    np.testing.assert_allclose(np.asarray(whole_out), want_out, **FWD_TOL)
    np.testing.assert_allclose(np.asarray(whole_last), want_last, **FWD_TOL)
    # pieces of 1 step, exactly one tile, and not a multiple of it
    out, state = scan_in_pieces(run, to_jax(kwargs), (1, 16, 27, 16))
    np.testing.assert_allclose(out, np.asarray(whole_out), **FWD_TOL)
    np.testing.assert_allclose(np.asarray(state), np.asarray(whole_last), **FWD_TOL)


GRAD_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# (seqlen, dim, dstate, bc, softplus, optional inputs on, tile): grouped with softplus and every optional
# input; plain B, C with none of D, z, delta_bias; two channel blocks per group (partials summed per group).
# TPU (its interpreter's time grows with the steps, per program and state row): two 16-step tiles, the last
# padded, where the Triton cases have three; the plain case keeps three (a middle tile, between first and last).
GRAD_CASES = {"triton": [(50, 8, 8, "g2", True, True, 16), (37, 8, 4, "bnl", False, False, 16),
                         (40, 128, 4, "g1", True, True, 16)],
              "mosaic_tpu": [(20, 256, 4, "g2", True, True, 16), (37, 128, 4, "bnl", False, False, 16),
                             (24, 256, 4, "g1", True, True, 16)]}


@pytest.mark.parametrize("kernel, case", [(k, c) for k in KERNELS for c in GRAD_CASES[k]],
                         ids=[f"{k}-l{c[0]}-d{c[1]}-{c[3]}-sp{c[4]}-opt{c[5]}" for k in KERNELS
                              for c in GRAD_CASES[k]])
def test_gradients_match_reference(kernel, case):
    seqlen, dim, dstate, bc, softplus, optional, tile = case
    kwargs = to_jax(make_inputs(5, 2, dim, dstate, seqlen, bc=bc, softplus=softplus, D=optional, z=optional,
                                bias=optional, initial_state=True))
    _check_gradients(kwargs, kernel, tile, np.random.default_rng(6))


def _check_gradients(kwargs, kernel, tile, rng):
    """The gradient of every input given (initial_state's included where there is one), under random output and
    last-state cotangents, == "reference"'s, in each input's shape and dtype."""
    names = [name for name in GRAD_ARGS if kwargs.get(name) is not None]
    g_out = jnp.asarray(rng.standard_normal(kwargs["u"].shape), jnp.float32)
    g_last = jnp.asarray(rng.standard_normal((kwargs["u"].shape[0], *kwargs["A"].shape)), jnp.float32)  # (b, d, n)

    def grads(run):
        def loss(diff):
            out, last = run({**kwargs, **diff})
            return jnp.sum(out * g_out) + jnp.sum(last * g_last)
        return jax.jit(jax.grad(loss))({name: kwargs[name] for name in names})

    want = grads(lambda k: selective_scan_fn(**k, return_last_state=True, impl="reference"))
    got = grads(lambda k: pallas_scan(k, kernel, tile))
    for name in names:
        assert got[name].shape == kwargs[name].shape and got[name].dtype == kwargs[name].dtype, name
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), **GRAD_TOL, err_msg=name)


# (batch, seqlen, dim, dstate, bc, D, z, delta_bias, softplus, initial_state, tile): the optional inputs on and off
# in mixed combinations the cases above do not reach (D without z and the reverse, delta_bias without softplus and
# the reverse, no initial state), batch 1, a seqlen that is and one that is not a multiple of the tile, a dstate
# that is not a power of two (the Triton kernel pads it) and channel blocks that are not 32 wide (Triton: dim 24,
# 8-channel blocks; 12 channels per group, 4-channel blocks) or more 128-lane rows than one program's (TPU: dim
# 384, three 1-row programs, of one batch row: the TPU interpreter pays per program).
COMBO_CASES = {
    "triton": [(1, 13, 24, 4, "bnl", True, False, False, True, False, 8),
               (2, 21, 24, 3, "g2", False, True, True, False, True, 8),
               (1, 9, 8, 4, "g2", False, False, True, True, False, 8),
               (2, 16, 8, 4, "bnl|g2", True, True, False, False, True, 8)],
    "mosaic_tpu": [(1, 21, 384, 3, "g1", False, True, True, False, True, 16),
                   (1, 9, 256, 4, "g2", True, False, True, True, False, 16)],
}


@pytest.mark.parametrize("kernel, case", [(k, c) for k in KERNELS for c in COMBO_CASES[k]],
                         ids=[f"{k}-b{c[0]}-l{c[1]}-d{c[2]}-n{c[3]}-{c[4].replace('|', '.')}-"
                              + "".join(f for f, on in zip(("D", "z", "b", "sp", "h0"), c[5:10]) if on)
                              for k in KERNELS for c in COMBO_CASES[k]])
def test_feature_combinations_match_oracle_and_reference(kernel, case):
    """Forward and last state vs the oracle, and the gradient of every input given (initial_state's included
    where there is one) vs "reference"'s, for the combinations in COMBO_CASES."""
    batch, seqlen, dim, dstate, bc, D, z, bias, softplus, init, tile = case
    numpy_kwargs = make_inputs(seqlen + dim + dstate, batch, dim, dstate, seqlen, bc=bc, D=D, z=z, bias=bias,
                               softplus=softplus, initial_state=init)
    kwargs = to_jax(numpy_kwargs)
    out, last = pallas_scan(kwargs, kernel, tile)
    want_out, want_last = oracle(numpy_kwargs)
    np.testing.assert_allclose(np.asarray(out), want_out, **FWD_TOL)
    np.testing.assert_allclose(np.asarray(last), want_last, **FWD_TOL)
    _check_gradients(kwargs, kernel, tile, np.random.default_rng(2))


@pytest.mark.parametrize("kernel, dim, bc", [("triton", 8, "g2"), ("mosaic_tpu", 128, "g1")])
def test_bf16_gradients_match_reference(kernel, dim, bc):
    """bf16 u, delta, B, C, z: every gradient (in its input's dtype) == "reference"'s on the same inputs, within
    twice mamba_ssm's bf16 forward tolerances (its gradient tolerances are 2x the forward ones)."""
    low = ("u", "delta", "B", "C", "z")
    kwargs = to_jax(make_inputs(2, 2, dim, 8, 20, bc=bc, initial_state=True), jnp.bfloat16, low)  # 2 tiles
    names = [name for name in GRAD_ARGS if kwargs.get(name) is not None]
    g_out = jnp.asarray(np.random.default_rng(6).standard_normal(kwargs["u"].shape), jnp.float32)

    def grads(run):
        def loss(diff):
            out, last = run({**kwargs, **diff})
            return jnp.sum(out.astype(jnp.float32) * g_out) + jnp.sum(last)
        return jax.jit(jax.grad(loss))({name: kwargs[name] for name in names})

    want = grads(lambda k: selective_scan_fn(**k, return_last_state=True, impl="reference"))
    got = grads(lambda k: pallas_scan(k, kernel, 16))
    tol = {key: 2 * value for key, value in BF16_TOL.items()}
    for name in names:
        assert got[name].dtype == kwargs[name].dtype, name
        np.testing.assert_allclose(np.asarray(got[name].astype(jnp.float32)),
                                   np.asarray(want[name].astype(jnp.float32)), **tol, err_msg=name)


@pytest.mark.parametrize("optional", [True, False], ids=["D-z-bias-softplus", "plain"])
def test_sequence_splits_give_the_unsplit_gradients(optional):
    """splits=S runs the backward's S parts of the sequence side by side too, each from the adjoint the later parts
    hand it (a first kernel's per-part adjoints chained by XLA): every gradient, initial_state's included, as
    without splits; with and without z (the adjoint's gate) and delta_bias / softplus (its decay)."""
    from ssm.pallas_scan import selective_scan_pallas

    k = to_jax(make_inputs(10, 2, 32, 4, 30, bc="g2", D=optional, z=optional, bias=optional, softplus=optional,
                           initial_state=True))  # 4 tiles of 8, the last padded
    u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k.get("z"))
    given = dict(u=u, delta=delta, A=k["A"], B=B, C=C, initial_state=k["initial_state"], z=z, D=k.get("D"),
                 delta_bias=k.get("delta_bias"))
    inputs = {name: value for name, value in given.items() if value is not None}

    def grads(splits):
        def loss(diff):
            out, last = selective_scan_pallas(**diff, delta_softplus=optional, tile=8, splits=splits)
            return jnp.sum(out * jnp.sin(out)) + jnp.sum(last * last)
        return jax.jit(jax.grad(loss))(inputs)

    want = grads(1)
    for splits in (2, 4):
        got = grads(splits)
        for name in want:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), **GRAD_TOL,
                                       err_msg=f"d{name}, splits={splits}")


def test_tuning_knobs_compute_the_same_function():
    """block_dim, num_warps, bc_rows, unroll, prefetch and splits (the GPU sweep's knobs) change the tiling, the
    order of the loads and the forward's parallelism over the sequence, not the result; bad knobs named."""
    from ssm.pallas_scan import selective_scan_pallas

    # 3 tiles of 8, the last padded. The interpreter's compile time grows with the steps a group unrolls: a tile of
    # 8 halves the unroll-past-the-tile case's, and the backward groups steps by 2 (grouping is the same code at 4)
    k = to_jax(make_inputs(9, 2, 64, 4, 20, bc="g1", initial_state=True))
    u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k["z"])
    args = (u, delta, k["A"], B, C, k["D"], z, k["delta_bias"], True)
    want_out, want_last = selective_scan_pallas(*args, initial_state=k["initial_state"], tile=8)
    for knobs in (dict(block_dim=8), dict(block_dim=64, num_warps=4, bc_rows=True, unroll=4),
                  dict(block_dim=32, unroll=32),  # 32 > tile: one group a tile
                  dict(block_dim=16, bc_rows=True, unroll=4, prefetch=True),  # loads a group ahead, last tile padded
                  dict(splits=3), dict(splits=3, unroll=4, bc_rows=True)):  # 3 tiles: one a split, the last padded
        out, last = selective_scan_pallas(*args, initial_state=k["initial_state"], tile=8, **knobs)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), **FWD_TOL)
        np.testing.assert_allclose(np.asarray(last), np.asarray(want_last), **FWD_TOL)

    def grads(**knobs):  # every input's gradient, the bc_rows layout's and the grouped steps' backward included
        def loss(*a):
            out, last = selective_scan_pallas(*a[:-1], True, initial_state=a[-1], tile=8, **knobs)
            return jnp.sum(out * jnp.sin(out)) + jnp.sum(last)
        return jax.grad(loss, argnums=tuple(range(9)))(*args[:-1], k["initial_state"])

    want = grads()
    for knobs in (dict(bc_rows=True, block_dim=16, unroll=2), dict(unroll=2, prefetch=True), dict(splits=3),
                  dict(splits=3, bc_rows=True, unroll=2)):
        for expected, got in zip(want, grads(**knobs)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), **GRAD_TOL, err_msg=str(knobs))
    with pytest.raises(ValueError, match="block_dim: expected a power of two, got 48"):
        selective_scan_pallas(*args, block_dim=48)
    with pytest.raises(ValueError, match="unroll: expected a power of two, got 3"):
        selective_scan_pallas(*args, unroll=3)
    with pytest.raises(ValueError, match=r"unroll: expected a power of two, got 2\.0"):
        selective_scan_pallas(*args, unroll=2.0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"splits: expected a positive integer, got {bad!r}"):
            selective_scan_pallas(*args, splits=bad)
    for bad in (-1, 0, 2.5):  # a negative tile ran no step: uninitialised outputs, no error
        with pytest.raises(ValueError, match=rf"tile: expected a positive integer or None, got {bad!r}"):
            selective_scan_pallas(*args, tile=bad)
    with pytest.raises(ValueError, match="num_warps: expected a positive integer, got 0"):
        selective_scan_pallas(*args, num_warps=0)


LOWERINGS = {"triton": ("cuda", "stablehlo.custom_call @__gpu$xla.gpu.triton", "__gpu$xla.gpu.triton"),
             "triton-bc_rows": ("cuda", "stablehlo.custom_call @__gpu$xla.gpu.triton", "__gpu$xla.gpu.triton"),
             "mosaic_tpu": ("tpu", "stablehlo.custom_call @tpu_custom_call", None)}


@pytest.mark.parametrize("kernel", sorted(LOWERINGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_z", [True, False], ids=["z", "no_z"])
def test_kernels_lower_for_their_accelerator(dtype, kernel, with_z):
    """Forward and backward kernels lower for their target on this CPU machine (jax.export for platform "cuda"
    through Pallas' Triton backend, "tpu" through Mosaic): one kernel call forward, two with the gradient.
    Catches lowering errors without the accelerator (JAX's default GPU backend, Mosaic GPU, rejects the Triton
    kernels; a Python // in a TPU index map needs a TPU to lower); the compilers past the lowering run in
    tests/test_triton_compile.py (Triton IR to a cubin) and tests/test_tpu_compile.py (Mosaic, libtpu)."""
    from jax import export

    from ssm.pallas_scan import selective_scan_pallas

    platform, call, unsafe = LOWERINGS[kernel]
    b, l, d, n = 1, 200, 256, 16  # length not a multiple of the tile; two 128-lane blocks on TPU
    S, low, f32 = jax.ShapeDtypeStruct, jnp.dtype(dtype), jnp.float32
    shapes = (S((b, l, d), low), S((b, l, d), low), S((d, n), f32), S((b, l, 1, n), low), S((b, l, 1, n), low),
              S((d,), f32), S((b, l, d), low), S((d,), f32))
    if not with_z:  # the backward then has no dz output
        shapes = shapes[:6] + shapes[7:]

    def scan(*args):
        args = args if with_z else args[:6] + (None,) + args[6:]
        return selective_scan_pallas(*args, True, interpret=False, kernel=kernel.split("-")[0],
                                     bc_rows=kernel.endswith("bc_rows"))

    def loss(*args):
        out, last = scan(*args)
        return jnp.sum(out.astype(f32)) + jnp.sum(last)

    allow = [export.DisabledSafetyCheck.custom_call(unsafe)] if unsafe else []
    for fn, calls in ((scan, 1), (jax.grad(loss, argnums=tuple(range(len(shapes)))), 2)):
        text = export.export(jax.jit(fn), platforms=[platform], disabled_checks=allow)(*shapes).mlir_module()
        assert text.count(call) == calls


@pytest.mark.parametrize("kernel, dim, groups, dstate", [
    ("mosaic_tpu", 256, 2, 8),    # two groups of one 128-lane row: a (n, 1, 128) block of (n, 2, 128) states
    ("mosaic_tpu", 384, 1, 16),   # three rows, one a program
    ("mosaic_tpu", 1536, 1, 16),  # 12 rows, 4 a program (Mamba-130m's d_inner)
    ("mosaic_tpu", 512, 4, 16),
    ("triton", 64, 1, 12),        # dstate not a power of two: Triton's arrays are
    ("triton", 64, 2, 3),
])
def test_kernels_lower_for_every_shape_they_take(kernel, dim, groups, dstate):
    """Shapes the entry point accepts lower for the kernel's accelerator, forward and backward: TPU blocks whose
    128-lane rows are fewer than 8 and fewer than the array's (Mosaic takes a block's last two dimensions only as
    multiples of (8, 128) or whole), Triton states of any dstate (its arrays are powers of two)."""
    from jax import export

    from ssm.pallas_scan import selective_scan_pallas

    platform, call, unsafe = LOWERINGS[kernel]
    S, f32, b, l = jax.ShapeDtypeStruct, jnp.float32, 1, 40
    shapes = (S((b, l, dim), f32), S((b, l, dim), f32), S((dim, dstate), f32), S((b, l, groups, dstate), f32),
              S((b, l, groups, dstate), f32))

    def loss(*args):
        out, last = selective_scan_pallas(*args, delta_softplus=True, interpret=False, kernel=kernel)
        return jnp.sum(out) + jnp.sum(last)

    allow = [export.DisabledSafetyCheck.custom_call(unsafe)] if unsafe else []
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
    text = export.export(grad, platforms=[platform], disabled_checks=allow)(*shapes).mlir_module()
    assert text.count(call) == 2


def test_default_kernel_is_the_lowering_platforms():
    """kernel=None picks each platform's kernel where the call is lowered (lax.platform_dependent), not by this
    process's backend: a gradient exported for "tpu" from this CPU has the Mosaic kernels and no Triton one, for
    "cuda" the reverse, as a step compiled ahead of time for a TPU slice (experiments.plan target=) needs. Channels
    the TPU kernel cannot lay out still lower for a GPU."""
    from jax import export

    from ssm.pallas_scan import selective_scan_pallas

    S, f32 = jax.ShapeDtypeStruct, jnp.float32

    def exported(platform, d, groups):
        b, l, n = 1, 64, 8
        shapes = (S((b, l, d), f32), S((b, l, d), f32), S((d, n), f32), S((b, l, groups, n), f32),
                  S((b, l, groups, n), f32))
        loss = lambda *a: jnp.sum(selective_scan_pallas(*a, delta_softplus=True)[0])  # noqa: E731
        allow = [export.DisabledSafetyCheck.custom_call(LOWERINGS["triton"][2])]
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return export.export(grad, platforms=[platform], disabled_checks=allow)(*shapes).mlir_module()

    tpu, cuda = exported("tpu", 128, 1), exported("cuda", 128, 1)
    tpu_call, triton_call = LOWERINGS["mosaic_tpu"][1], LOWERINGS["triton"][1]
    assert tpu.count(tpu_call) == 2 and triton_call not in tpu
    assert cuda.count(triton_call) == 2 and tpu_call not in cuda
    assert exported("cuda", 16, 2).count(triton_call) == 2  # 8 channels per group: not on 128 lanes
    with pytest.raises(NotImplementedError, match="platform tpu"):
        exported("tpu", 16, 2)


@pytest.mark.parametrize("kernel, dim", [("triton", 8), ("mosaic_tpu", 128)])
def test_backward_saves_only_tile_boundary_states(kernel, dim):
    """The VJP's residuals: inputs and (batch, n_tiles, dstate, dim) states, nothing of size batch*seqlen*dim*dstate.
    Their shapes are traced (jax.eval_shape), not computed: the kernels need not run in their interpreter for them."""
    batch, dstate, seqlen, tile = 1, 8, 96, 16
    kwargs = to_jax(make_inputs(7, batch, dim, dstate, seqlen, initial_state=True))
    vjp = jax.eval_shape(lambda u: jax.vjp(lambda u: pallas_scan({**kwargs, "u": u}, kernel, tile)[0], u)[1],
                         kwargs["u"])
    sizes = sorted(leaf.size for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "size"))
    assert batch * (seqlen // tile) * dim * dstate in sizes, sizes
    assert max(sizes) < batch * seqlen * dim * dstate, sizes


def test_chunk_size_past_the_kernel_tile_is_capped():
    """selective_scan's chunk_size (the models pass scan_chunk_size, 256, tuned for "chunked") is capped at the
    kernels' DEFAULT_TILE for impl="pallas": the forward saves (batch, seqlen / 64, dstate, dim) states at seqlen
    256, not one tile's."""
    from ssm.pallas_scan import DEFAULT_TILE

    batch, dim, dstate, seqlen = 1, 8, 4, 256
    kwargs = to_jax(make_inputs(3, batch, dim, dstate, seqlen))
    loss = lambda u: selective_scan_fn(**{**kwargs, "u": u}, impl="pallas", chunk_size=256).sum()  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(loss))(kwargs["u"]))
    assert f"f32[{batch},{seqlen // DEFAULT_TILE},{dstate},{dim}]" in text, text[-2000:]


@pytest.mark.parametrize("kernel, dim, bc", [("triton", 8, "g2"), ("mosaic_tpu", 256, "g2")])
def test_vjp_residuals_are_the_inputs_and_the_tile_boundary_states(kernel, dim, bc):
    """Every array jax.vjp keeps for the backward pass: the (padded) inputs and one fp32 state per tile boundary,
    (batch, n_tiles, dstate, dim) (TPU: block-major, (batch, n_tiles, blocks, dstate, rows, 128)); nothing else
    with a dstate x dim or a seqlen x dstate x dim factor. Their shapes are traced (jax.eval_shape), not computed."""
    from ssm.pallas_scan import selective_scan_pallas

    batch, dstate, seqlen, tile = 2, 8, 90, 16  # 6 tiles, the last padded
    k = to_jax(make_inputs(7, batch, dim, dstate, seqlen, bc=bc, initial_state=True))
    u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k["z"])
    args = (u, delta, k["A"], B, C, k["D"], z, k["delta_bias"], k["initial_state"])
    scan = lambda *a: selective_scan_pallas(*a[:8], True, initial_state=a[8], tile=tile, kernel=kernel)  # noqa: E731
    vjp = jax.eval_shape(lambda *a: jax.vjp(scan, *a)[1], *args)
    arrays = sorted(tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(vjp) if getattr(leaf, "ndim", 0))
    padded, rows = 96, (batch, 96, dim)
    if kernel == "triton":
        want = [(1, dim)] * 2 + [(batch, 2, dstate, padded)] * 2 + [(batch, 6, dstate, dim)] + [rows] * 3 \
            + [(dstate, dim)]
    else:
        want = [(1, dim)] * 2 + [(batch, 2, padded, dstate)] * 2 + [(batch, 6, 2, dstate, 1, 128)] + [rows] * 3 \
            + [(dstate, dim)]
    assert arrays == sorted(want), arrays


def _pallas_calls(jaxpr):
    """The pallas_call equations of a (closed) jaxpr, in order, looking inside nested jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _pallas_calls(sub)
    return found


@pytest.mark.parametrize("kernel, dim", [("triton", 8), ("mosaic_tpu", 128)])
def test_kernels_write_only_what_is_used(kernel, dim):
    """Without differentiation the forward kernel writes out and the last state, not the tile-boundary states
    (which only the backward reads); under jax.grad it writes them, and the backward kernel stores du, ddelta and
    dz in the inputs' dtype (bf16 here) rather than in fp32 that XLA would cast afterwards, and no dz without z."""
    from ssm.pallas_scan import selective_scan_pallas

    rng = np.random.default_rng(0)
    batch, length, dstate = 1, 32, 4
    u, delta, z = (jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.bfloat16) for _ in range(3))
    B, C = (jnp.asarray(rng.standard_normal((batch, length, 1, dstate)), jnp.bfloat16) for _ in range(2))
    A = -jnp.ones((dim, dstate), jnp.float32)

    def scan(u, delta, z):
        return selective_scan_pallas(u, delta, A, B, C, None, z, None, True, tile=16, kernel=kernel)[0]

    forward = _pallas_calls(jax.make_jaxpr(scan)(u, delta, z).jaxpr)
    assert len(forward) == 1 and len(forward[0].outvars) == 2, forward
    grad = jax.grad(lambda *x: scan(*x).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    forward, backward = _pallas_calls(jax.make_jaxpr(grad)(u, delta, z).jaxpr)
    assert [v.aval.shape for v in forward.outvars][2:] == [(batch, 2, dstate, dim) if kernel == "triton"
                                                            else (batch, 2, dstate, dim // 128, 128)]
    assert [v.aval.dtype for v in backward.outvars[:3]] == [jnp.dtype(jnp.bfloat16)] * 3
    # without z the backward has no dz to store: du and ddelta are its only (b, l, d) outputs
    no_z = jax.grad(lambda u, delta: scan(u, delta, None).astype(jnp.float32).sum(), argnums=(0, 1))
    _, backward = _pallas_calls(jax.make_jaxpr(no_z)(u, delta).jaxpr)
    assert [v.aval.shape for v in backward.outvars].count((batch, length, dim)) == 2


SHARD_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from ssm.pallas_scan import selective_scan_pallas
    from ssm.scan import to_channels_last
    from tests.test_scan import FWD_TOL, make_inputs, to_jax

    assert jax.device_count() == 2, jax.devices()


    def check(kernel):
        # check_vma=False to run the Triton kernels: JAX's Pallas interpreter (interpret=True) fails vma checking
        # inside shard_map ("Scan carry input and output got mismatched varying manual axes", jax 0.10.2); their
        # check_vma=True bookkeeping is traced (not run) below with make_jaxpr. The TPU interpreter runs with it.
        check_vma = kernel == "mosaic_tpu"
        dim = 256 if kernel == "mosaic_tpu" else 8  # two 128-lane blocks, split on "tensor"
        # 2 tiles of 16; dstate 2: the TPU interpreter's time grows with the state rows, none of them is sharded
        k = to_jax(make_inputs(8, 2, dim, 2, 24, bc="g1", initial_state=True))
        # channels-last inputs as the models pass them
        u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k["z"])
        args = (u, delta, k["A"], B, C, k["D"], z, k["delta_bias"], k["initial_state"])

        def scan(u, delta, A, B, C, D, z, bias, h0):
            return selective_scan_pallas(u, delta, A, B, C, D, z, bias, True, initial_state=h0, tile=16,
                                         kernel=kernel)

        def loss(*args):
            out, last = scan(*args)
            return jnp.sum(out * out) + jnp.sum(last)

        want = scan(*args)
        want_grads = jax.grad(loss, argnums=tuple(range(9)))(*args)
        for shape in ((2, 1), (1, 2)):
            mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "tensor"))
            row, bc, chan = P("data", None, "tensor"), P("data", None, None, None), P("tensor")
            specs = (row, row, P("tensor", None), bc, bc, chan, row, chan, P("data", "tensor", None))
            sharded = jax.jit(jax.shard_map(scan, mesh=mesh, in_specs=specs, out_specs=(row, specs[-1]),
                                            check_vma=check_vma))
            for got, ref in zip(sharded(*args), want):
                np.testing.assert_allclose(np.asarray(got), np.asarray(ref), **FWD_TOL)

            def local_grads(*args):  # shard-local gradients; sum the partials of inputs replicated over an axis
                grads = list(jax.grad(loss, argnums=tuple(range(9)))(*args))
                if not check_vma:  # with check_vma, AD sums them itself (the transpose of the kernels' pcast)
                    for i, axis in ((2, "data"), (3, "tensor"), (4, "tensor"), (5, "data"), (7, "data")):
                        grads[i] = jax.lax.psum(grads[i], axis)
                return tuple(grads)

            grad_fn = jax.jit(jax.shard_map(local_grads, mesh=mesh, in_specs=specs, out_specs=specs,
                                            check_vma=check_vma))
            for got, ref in zip(grad_fn(*args), want_grads):
                np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1.2e-3, atol=4e-3)

            def summed_loss(*args):
                return jax.lax.psum(loss(*args), ("data", "tensor"))

            checked = jax.shard_map(jax.grad(summed_loss, argnums=tuple(range(9))), mesh=mesh, in_specs=specs,
                                    out_specs=specs)
            jax.make_jaxpr(checked)(*args)
        print(kernel, "ok", flush=True)


    for kernel in ("triton", "mosaic_tpu"):  # one process for both: its start-up and JAX's import once
        check(kernel)
""")


def test_runs_under_shard_map_on_two_devices():
    """Both kernels inside jax.shard_map (batch on "data", channels on "tensor") == the unsharded call, forward
    and gradients."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", SHARD_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["triton", "ok", "mosaic_tpu", "ok"], (
        result.stdout + result.stderr)


MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from ssm.scan import selective_scan, to_channels_last
    from tests.test_scan import FWD_TOL, GRAD_TOL, make_inputs, to_jax

    assert jax.device_count() == 8, jax.devices()

    def inputs(batch, dim, seqlen, bc):
        k = to_jax(make_inputs(8, batch, dim, 4, seqlen, bc=bc, initial_state=True))
        u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k["z"])
        return (u, delta, k["A"], B, C, k["D"], z, k["delta_bias"], k["initial_state"])

    def loss_of(chunk):
        def loss(args):
            u, delta, A, B, C, D, z, bias, h0 = args
            out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0, impl="pallas",
                                       chunk_size=chunk)
            return jnp.sum(out * out) + jnp.sum(last * last), out
        return loss

    def check_gradients(mesh, args, chunk, label):
        # traced under the mesh: a shard_map over tensor (none without it); out and every gradient == unsharded.
        # make_jaxpr of the jitted function (its whole body is in the jaxpr): the call that follows with the
        # same arguments reuses that trace
        loss = loss_of(chunk)
        grad = jax.jit(jax.grad(loss, has_aux=True))
        assert "shard_map" not in str(jax.make_jaxpr(grad)(args))
        want_grads, want_out = grad(args)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            replicated = jax.device_put(args, NamedSharding(mesh, P()))
            jaxpr = str(jax.make_jaxpr(grad)(replicated))
            assert "shard_map" in jaxpr and "'tensor'" in jaxpr, jaxpr[-2000:]
            got_grads, got_out = grad(replicated)
        np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), **FWD_TOL)
        for name, got, want in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"), got_grads,
                                   want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), **GRAD_TOL, err_msg=f"{label} {name}")

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    args = inputs(4, 64, 40, "g1")
    check_gradients(mesh, args, 16, "data x fsdp x tensor")
    # two B/C groups split over tensor (one a device) with the batch over data; one batch row (channels split)
    small = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4])
    for batch, bc in ((2, "g2"), (1, "g1")):
        check_gradients(small, inputs(batch, 8, 20, bc), 8, f"batch {batch} {bc}")

    # one batch row (data x fsdp = 4 does not divide it): the channels are still split over tensor
    batched = (0, 1, 3, 4, 6, 8)  # u, delta, B, C, z, initial_state (not A, D, delta_bias)
    row = tuple(a[:1] if i in batched else a for i, a in enumerate(args))
    forward = jax.jit(lambda args: loss_of(16)(args)[1])
    want_out = forward(row)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        replicated = jax.device_put(row, NamedSharding(mesh, P()))
        jaxpr = str(jax.make_jaxpr(forward)(replicated))
        assert "P(None, None, 'tensor')" in jaxpr and "'fsdp')" not in jaxpr, jaxpr[-2000:]
        got_out = forward(replicated)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), **FWD_TOL)

    # two rows: data x fsdp = 4 does not divide them, data does: the rows over data, as the runtime splits a batch
    two = inputs(2, 8, 20, "g1")
    want_out = forward(two)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        replicated = jax.device_put(two, NamedSharding(mesh, P()))
        jaxpr = str(jax.make_jaxpr(forward)(replicated))
        assert "P('data', None, 'tensor')" in jaxpr, jaxpr[-2000:]
        got_out = forward(replicated)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), **FWD_TOL)

    # rules splitting d_inner over fsdp, one of the batch's axes: the channels on fsdp, the rows on data alone
    # (P(('data', 'fsdp'), None, 'fsdp') was a DuplicateSpecError)
    from configs.schema import merged_rules
    from runtime.partitioning import use_rules
    four = inputs(4, 8, 20, "g1")
    want_out = forward(four)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), use_rules(merged_rules({"d_inner": "fsdp"})):
        replicated = jax.device_put(four, NamedSharding(mesh, P()))
        jaxpr = str(jax.make_jaxpr(forward)(replicated))
        assert "P('data', None, 'fsdp')" in jaxpr, jaxpr[-2000:]
        got_out = forward(replicated)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), **FWD_TOL)
    print("ok")
""")


def test_selective_scan_shards_the_kernels_under_a_mesh():
    """impl="pallas" traced under a (data 2, fsdp 2, tensor 2) mesh, as the trainer traces its step: the kernels
    run inside shard_map (batch on data x fsdp, channels on tensor), and out and every gradient equal the
    unsharded call's; without a mesh no shard_map. Under a (data 2, tensor 2) mesh, B and C in two groups follow
    their channels over tensor, and a batch of one row (channels split only) differentiates too; with rules
    splitting d_inner over fsdp, or two rows, the rows are split over data alone."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.parametrize("bc", ["g1|g2", "g2|g1"])
@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_channels_last_scan_takes_b_and_c_in_different_groups(impl, bc):
    """ssm.scan.selective_scan (the models' unchecked entry point) with B and C in 1 and 2 groups == the oracle:
    every impl repeats them to the finer grouping (the Pallas kernels read both with one group index)."""
    from ssm.scan import selective_scan

    kwargs = make_inputs(19, 2, 8, 4, 20, bc=bc)
    want, want_last = oracle(kwargs)
    k = to_jax(kwargs)
    u, delta, B, C, z = to_channels_last(k["u"], k["delta"], k["B"], k["C"], k["z"])
    out, last = selective_scan(u, delta, k["A"], B, C, k["D"], z, k["delta_bias"], True, impl=impl)
    np.testing.assert_allclose(jnp.swapaxes(out, 1, 2), want, **FWD_TOL)
    np.testing.assert_allclose(last, want_last, **FWD_TOL)


def test_kernel_entry_refuses_b_and_c_of_different_shapes():
    from ssm.pallas_scan import selective_scan_pallas

    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match=r"^C: expected shape \(1, 4, 1, 4\) like B .*got \(1, 4, 2, 4\)"):
        selective_scan_pallas(x, x, jnp.zeros((8, 4)), jnp.zeros((1, 4, 1, 4)), jnp.zeros((1, 4, 2, 4)))


BAD_ARRAYS = [  # (argument, the shape given instead, the message)
    ("delta", (1, 9, 8), r"delta: expected shape \(1, 10, 8\) \(batch, seqlen, dim\) like u, got \(1, 9, 8\)"),
    ("A", (8, 8), r"A: expected shape \(8, 4\) \(dim, dstate\), dstate from B, got \(8, 8\)"),
    ("A", (16, 4), r"A: expected shape \(8, 4\) .*got \(16, 4\)"),
    ("B", (1, 11, 1, 4), r"B: expected shape \(1, 10, 1, 4\) .*with u's batch and seqlen, got \(1, 11, 1, 4\)"),
    ("B", (1, 10, 4), r"B: expected shape \(batch, seqlen, groups, dstate\) .*got \(1, 10, 4\)"),
    ("D", (9,), r"D: expected shape \(8,\) \(dim,\), got \(9,\)"),
    ("z", (1, 10, 9), r"z: expected shape \(1, 10, 8\) .*got \(1, 10, 9\)"),
    ("delta_bias", (3,), r"delta_bias: expected shape \(8,\) \(dim,\), got \(3,\)"),
    ("initial_state", (1, 4, 8), r"initial_state: expected shape \(1, 8, 4\) \(batch, dim, dstate\), got \(1, 4, 8\)"),
    ("u", (10, 8), r"u: expected shape \(batch, seqlen, dim\), got \(10, 8\)"),
]


@pytest.mark.parametrize("kernel", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("name, bad, message", BAD_ARRAYS, ids=[f"{n}-{'x'.join(map(str, b))}"
                                                                for n, b, _ in BAD_ARRAYS])
def test_kernel_entry_names_bad_arrays(kernel, name, bad, message):
    """selective_scan_pallas checks its arrays' shapes and dtypes: the kernels' block specs read whatever they are
    given (a short delta, a transposed initial state, a B of another length ran and returned wrong values)."""
    from ssm.pallas_scan import selective_scan_pallas

    x, bc = (1, 10, 8), (1, 10, 1, 4)
    shapes = {**dict(u=x, delta=x, A=(8, 4), B=bc, C=bc), name: bad, **({"C": bad} if name == "B" else {})}
    with pytest.raises(ValueError, match="^" + message):
        selective_scan_pallas(**{key: jnp.zeros(shape) for key, shape in shapes.items()}, tile=4, kernel=kernel)


def test_kernel_entry_names_bad_dtypes_and_groups():
    from ssm.pallas_scan import selective_scan_pallas

    x, bc, A = jnp.zeros((1, 10, 8)), jnp.zeros((1, 10, 1, 4)), jnp.zeros((8, 4))
    with pytest.raises(TypeError, match="^u: expected a floating-point array, got dtype int32"):
        selective_scan_pallas(x.astype(jnp.int32), x, A, bc, bc, kernel="triton")
    with pytest.raises(TypeError, match="^initial_state: expected a floating-point array, got dtype int32"):
        selective_scan_pallas(x, x, A, bc, bc, initial_state=jnp.zeros((1, 8, 4), jnp.int32), kernel="triton")
    three = jnp.zeros((1, 10, 3, 4))  # 3 groups of 8 channels: the last channels read no group's B
    with pytest.raises(ValueError, match=r"^B: expected a number of groups dividing dim \(8\), got 3"):
        selective_scan_pallas(x, x, A, three, three, kernel="triton")
    # switches went through bool(): the string "no" turned softplus or the B/C row layout on
    for name in ("delta_softplus", "bc_rows", "prefetch", "interpret"):
        with pytest.raises(TypeError, match=f"^{name}: expected True or False, got 'no'"):
            selective_scan_pallas(x, x, A, bc, bc, kernel="triton", **{name: "no"})


@pytest.mark.parametrize("with_state", [False, True])
def test_empty_sequence_returns_empty_out_and_the_initial_state(with_state):
    """Zero steps, as the other impls: out (batch, dim, 0) and the initial state (zeros without one); its
    gradient passes through."""
    kwargs = to_jax(make_inputs(20, 2, 8, 4, 0, initial_state=with_state))
    out, last = selective_scan_fn(**kwargs, return_last_state=True, impl="pallas")
    want_out, want_last = selective_scan_fn(**kwargs, return_last_state=True, impl="reference")
    assert out.shape == want_out.shape == (2, 8, 0)
    np.testing.assert_array_equal(last, want_last)
    if with_state:
        grad = jax.grad(lambda h: jnp.sum(selective_scan_fn(**{**kwargs, "initial_state": h}, return_last_state=True,
                                                            impl="pallas")[1]))(kwargs["initial_state"])
        np.testing.assert_array_equal(grad, jnp.ones_like(grad))


def test_tpu_kernel_names_unsupported_widths():
    kwargs = to_jax(make_inputs(18, 1, 64, 4, 10, bc="g2"))
    with pytest.raises(ValueError, match=r"dim: the TPU Pallas kernel needs dim // groups a multiple of 128 .*got "
                                         r"dim 64 with 2 group"):
        tpu_scan(kwargs, 16)
    from ssm.pallas_scan import selective_scan_pallas

    x, bc = jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 1, 4))
    with pytest.raises(ValueError, match=r"kernel: expected one of \('triton', 'mosaic_tpu'\), got 'cuda'"):
        selective_scan_pallas(x, x, jnp.zeros((8, 4)), bc, bc, kernel="cuda")
