"""The selective scan's Pallas kernels for TPU (Mosaic): forward and backward, same math as ssm/pallas_scan.py.

ssm/pallas_scan.py holds the entry point, the custom VJP and the GPU (Triton) kernels; it calls ``forward`` and
``backward`` here where the kernel is "mosaic_tpu" (the default on a TPU backend). On CPU these kernels run in
the Pallas TPU interpreter (``pltpu.InterpretParams``), which the tier-1 tests use.

Forward (channel-dense). A program owns R rows of 128 channels (R <= 8: one full (8, 128) fp32 register per
dstate row at 1024 channels) of one batch row; the grid is (batch, dim // (R * 128), n_tiles), the last axis
walking the sequence tiles in order ("arbitrary": sequential on one core) with the fp32 state in a VMEM scratch
between tiles, and Pallas double-buffering the (tile, R * 128) input and output blocks between HBM and VMEM. Per
tile: dt (softplus, delta_bias) and dt * u for the whole tile, relaid out so that each step's channels are one
(R, 128) value; B[t, k] and C[t, k] broadcast along a row of lanes; then the recurrence, one step being, for each
of the n state rows, h = exp2(dt * A log2 e) * h + B[t, k] * dt u and y += C[t, k] * h on whole registers; then
y (+ D u, * silu(z)) for the whole tile. The step loop is unrolled FORWARD_UNROLL times so that the compiler can
overlap one step's exponentials with the previous step's products. libtpu's static estimate on v6e (the
compiler's, experiments/bench/tpu_compile.py; no TPU has run this): 7 cycles per step of 128 channels, against
51 for the channel-sparse layout the backward still uses.

Backward (channel-sparse, tiles in reverse). Channels on the 128 lanes, sequence steps on sublanes, the state
dimension ``n`` leading; grid (batch, dim // 128, n_tiles). One tile: dt, dt * u and the decays exp(dt A) for all
the tile's steps into VMEM, as n (tile, 128) slabs (a static lane slice B[:, k] broadcast over the lanes); the
tile's states recomputed from the boundary state the forward saved, one (n, 1, 128) update per step (one sublane
of n registers: simple and layout-safe, an eighth of the vector unit); the adjoint recurrence over the steps in
reverse; then every gradient for the whole tile at once. dA, dD, d(delta_bias) accumulate in VMEM over the tiles
of a (batch row, channel block) and dB, dC are written per channel block (summed per group after the call).

Limits: dim // groups must be a multiple of 128, or groups == 1 with dim <= 128 (one block of all channels).
Both kernels compile for TPU v5e, v5p and v6e through Mosaic and XLA's TPU compiler on a CPU
(experiments/bench/tpu_compile.py, tests/test_tpu_compile.py); no TPU has run them yet.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ssm.pallas_scan import _F32, _optional, _optional_inputs, _out, _softplus, sum_per_group

LANES = 128
LOG2E = 1.4426950408889634
FORWARD_UNROLL = 8  # steps per iteration of the forward's step loop (static estimate: docs/GPU.md)


def check_shapes(dim: int, groups: int) -> None:
    per_group = dim // groups
    if not (per_group % LANES == 0 or (groups == 1 and dim <= LANES)):
        raise ValueError(f"dim: the TPU Pallas kernel needs dim // groups a multiple of {LANES} (or groups == 1 "
                         f"and dim <= {LANES}), got dim {dim} with {groups} group(s)")


def _lanes(dim: int) -> int:
    return min(dim, LANES)


def _backward_specs(cfg, dim: int, dstate: int):
    """The backward's block specs over the grid (batch b, channel block j, tile step k), walking the tiles
    backwards."""
    P, T, nt = _lanes(dim), cfg.tile, cfg.n_tiles
    blocks_per_group = dim // cfg.groups // P
    tile = lambda k: nt - 1 - k  # noqa: E731
    return dict(
        rows=pl.BlockSpec((None, T, P), lambda b, j, k: (b, tile(k), j)),
        # lax.div, not //: Python's floor division lowers through sign(), whose Mosaic rule asks for a TPU
        cols=pl.BlockSpec((None, None, T, dstate), lambda b, j, k: (b, lax.div(j, blocks_per_group), tile(k), 0)),
        partial_cols=pl.BlockSpec((None, None, T, dstate), lambda b, j, k: (b, j, tile(k), 0)),
        state=pl.BlockSpec((None, dstate, 1, P), lambda b, j, k: (b, 0, 0, j)),
        ckpt=pl.BlockSpec((None, None, dstate, 1, P), lambda b, j, k: (b, tile(k), 0, 0, j)),
        A=pl.BlockSpec((dstate, P), lambda b, j, k: (0, j)),
        chan=pl.BlockSpec((1, P), lambda b, j, k: (0, j)),
        partial_chan=pl.BlockSpec((None, 1, P), lambda b, j, k: (b, 0, j)),
    )


def _params(cfg):
    return dict(
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        compiler_params=None if cfg.interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
    )


def _tile_inputs(cfg, tile_index, delta_ref, bias_ref, u_ref):
    """For the whole tile, (tile, channels) fp32: pre-softplus dt, dt (0 on padding steps), u, dt u, and the
    steps' positions."""
    pre = delta_ref[...].astype(_F32)
    if cfg.has_bias:
        pre = pre + bias_ref[...].astype(_F32)
    dt = _softplus(pre) if cfg.softplus else pre
    step = tile_index * cfg.tile + lax.broadcasted_iota(jnp.int32, (cfg.tile, 1), 0)
    dt = jnp.where(step < cfg.length, dt, 0.0)
    u = u_ref[...].astype(_F32)
    return pre, dt, u, dt * u, step


def _decays(dt, x, A_ref, B_ref, dA_s, dBu_s):
    """Fills dA_s[k] = exp(dt A[k]) and dBu_s[k] = B[:, k] dt u, each (tile, 128)."""
    for k in range(A_ref.shape[0]):
        dA_s[k] = jnp.exp(dt * A_ref[k:k + 1, :].astype(_F32))
        dBu_s[k] = B_ref[:, k:k + 1].astype(_F32) * x


def _recompute_states(cfg, h, dA_s, dBu_s, H_s, Hprev_s):
    """The recurrence over the tile's steps from state h (n, 1, 128): H_s[:, t] = state after step t and
    Hprev_s[:, t] = before it."""
    def step(t, h):
        row = pl.ds(t, 1)
        Hprev_s[:, row, :] = h
        h = dA_s[:, row, :] * h + dBu_s[:, row, :]
        H_s[:, row, :] = h
        return h

    lax.fori_loop(0, cfg.tile, step, h)


def _gated_output(cfg, C_ref, H_s, u, D_ref):
    """y = sum_k C[:, k] * H_s[k] (+ D u), (tile, 128), before the z gate."""
    y = sum(C_ref[:, k:k + 1].astype(_F32) * H_s[k] for k in range(H_s.shape[0]))
    return y + D_ref[...].astype(_F32) * u if cfg.has_D else y


# ----------------------------------------------------------------------------------------------------------
# forward: channel-dense steps


def rows_per_block(dim: int, groups: int) -> int:
    """The forward's 128-lane rows per program (a program's channels fill an (R, 128) register: R <= 8, and a
    block never straddles two B/C groups)."""
    return 1 if dim <= LANES else math.gcd(dim // groups // LANES, 8)


def _to_steps(value, ref, R):
    """(tile, R * P) -> ref (tile * R, P): rows t * R .. t * R + R - 1 hold step t's channels, one per row."""
    P = value.shape[1] // R
    for r in range(R):
        ref[pl.ds(r, value.shape[0], stride=R), :] = value[:, r * P:(r + 1) * P]


def _from_steps(ref, R, tile):
    """_to_steps' inverse: ref (tile * R, P) -> (tile, R * P)."""
    parts = [ref[pl.ds(r, tile, stride=R), :] for r in range(R)]
    return parts[0] if R == 1 else jnp.concatenate(parts, axis=1)


def _forward_kernel(cfg, R, *refs):
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, *rest = refs
    n_opt = cfg.has_D + cfg.has_z + cfg.has_bias
    D_ref, z_ref, bias_ref = _optional(rest[:n_opt], (cfg.has_D, cfg.has_z, cfg.has_bias))
    out_ref, last_ref, ckpt_ref, h_s, dt_s, x_s, y_s, Bb_s, Cb_s = rest[n_opt:]
    k = pl.program_id(2)
    n, P = A_ref.shape[0], A_ref.shape[2]

    @pl.when(k == 0)
    def _():
        h_s[...] = h0_ref[...].astype(_F32)

    ckpt_ref[...] = h_s[...]
    _, dt, u, x, _ = _tile_inputs(cfg, k, delta_ref, bias_ref, u_ref)
    _to_steps(dt, dt_s, R)
    _to_steps(x, x_s, R)
    B, C = B_ref[...].astype(_F32), C_ref[...].astype(_F32)
    for i in range(n):  # B[t, i] and C[t, i] broadcast over a row of lanes
        Bb_s[i] = jnp.broadcast_to(B[:, i:i + 1], (cfg.tile, P))
        Cb_s[i] = jnp.broadcast_to(C[:, i:i + 1], (cfg.tile, P))
    A = A_ref[...].astype(_F32) * LOG2E  # exp(dt A) = exp2(dt A log2(e))

    def step(t, h):
        rows, row = pl.ds(pl.multiple_of(t * R, R), R), pl.ds(t, 1)
        dt_t, x_t = dt_s[rows, :], x_s[rows, :]
        h = tuple(jnp.exp2(dt_t * A[i]) * h[i] + Bb_s[i, row, :] * x_t for i in range(n))
        y = h[0] * Cb_s[0, row, :]
        for i in range(1, n):
            y = y + h[i] * Cb_s[i, row, :]
        y_s[rows, :] = y
        return h

    h = jnp.stack(lax.fori_loop(0, cfg.tile, step, tuple(h_s[i] for i in range(n)), unroll=FORWARD_UNROLL))
    h_s[...] = h
    y = _from_steps(y_s, R, cfg.tile)
    if cfg.has_D:
        y = y + D_ref[...].astype(_F32) * u
    if cfg.has_z:
        y = y * jax.nn.silu(z_ref[...].astype(_F32))
    out_ref[...] = y.astype(out_ref.dtype)

    @pl.when(k == cfg.n_tiles - 1)
    def _():
        last_ref[...] = h


def forward(cfg, u, delta, A_t, B, C, h0, D, z, bias):
    """Padded channels-last u, delta, z (b, Lp, d); A_t (n, d); B, C (b, g, Lp, n); h0 (b, n, d) fp32; D, bias
    (1, d). Returns out (b, Lp, d) in u's dtype, last (b, n, d) and the tile-boundary states (b, nt, n, 1, d)."""
    batch, _, dim = u.shape
    n, P = A_t.shape[0], _lanes(dim)
    R = rows_per_block(dim, cfg.groups)
    W, T, nt = R * P, cfg.tile, cfg.n_tiles
    blocks_per_group = max(dim // cfg.groups // W, 1)
    rows = pl.BlockSpec((None, T, W), lambda b, j, k: (b, k, j))
    # lax.div, not //: Python's floor division lowers through sign(), whose Mosaic rule asks for a TPU
    cols = pl.BlockSpec((None, None, T, n), lambda b, j, k: (b, lax.div(j, blocks_per_group), k, 0))
    state = pl.BlockSpec((None, n, R, P), lambda b, j, k: (b, 0, j, 0))
    ckpt = pl.BlockSpec((None, None, n, R, P), lambda b, j, k: (b, k, 0, j, 0))
    opt_args, opt_specs = _optional_inputs(dict(rows=rows, chan=pl.BlockSpec((1, W), lambda b, j, k: (0, j))),
                                           D, z, bias)
    split = lambda x: x.reshape(x.shape[:-1] + (dim // P, P))  # noqa: E731  (..., d) -> (..., d / P, P)
    steps, lanes = pltpu.VMEM((T * R, P), _F32), pltpu.VMEM((n, T, P), _F32)
    out, last, ckpt_states = pl.pallas_call(
        functools.partial(_forward_kernel, cfg, R),
        grid=(batch, dim // W, nt),
        in_specs=[rows, rows, pl.BlockSpec((n, R, P), lambda b, j, k: (0, j, 0)), cols, cols, state] + opt_specs,
        out_specs=[rows, state, ckpt],
        out_shape=[_out(u.shape, u.dtype, u), _out((batch, n, dim // P, P), _F32, u),
                   _out((batch, nt, n, dim // P, P), _F32, u)],
        scratch_shapes=[pltpu.VMEM((n, R, P), _F32), steps, steps, steps, lanes, lanes],
        name="selective_scan_fwd_tpu",
        **_params(cfg),
    )(u, delta, split(A_t), B, C, split(h0), *opt_args)
    return out, last.reshape(batch, n, dim), ckpt_states.reshape(batch, nt, n, 1, dim)


# ----------------------------------------------------------------------------------------------------------
# backward


def _backward_kernel(cfg, *refs):
    u_ref, delta_ref, A_ref, B_ref, C_ref, ckpt_ref, dout_ref, dlast_ref, *rest = refs
    n_opt = cfg.has_D + cfg.has_z + cfg.has_bias
    D_ref, z_ref, bias_ref = _optional(rest[:n_opt], (cfg.has_D, cfg.has_z, cfg.has_bias))
    (du_ref, ddelta_ref, dz_ref, dA_ref, dB_ref, dC_ref, dD_ref, dbias_ref, dh0_ref,
     g_s, dA_acc, dD_acc, dbias_acc, dA_s, dBu_s, Hprev_s, H_s, G_s) = rest[n_opt:]
    r = pl.program_id(2)
    n = A_ref.shape[0]

    @pl.when(r == 0)
    def _():
        g_s[...] = dlast_ref[...].astype(_F32)
        dA_acc[...] = jnp.zeros_like(dA_acc)
        dD_acc[...] = jnp.zeros_like(dD_acc)
        dbias_acc[...] = jnp.zeros_like(dbias_acc)

    tile_index = cfg.n_tiles - 1 - r
    pre, dt, u, x, step = _tile_inputs(cfg, tile_index, delta_ref, bias_ref, u_ref)
    _decays(dt, x, A_ref, B_ref, dA_s, dBu_s)
    _recompute_states(cfg, ckpt_ref[...], dA_s, dBu_s, H_s, Hprev_s)
    dy = dout_ref[...].astype(_F32)                     # d loss / d out
    if cfg.has_z:
        zt = z_ref[...].astype(_F32)
        gate = jax.nn.sigmoid(zt)
        y = _gated_output(cfg, C_ref, H_s, u, D_ref)
        dz_ref[...] = (dy * y * gate * (1.0 + zt * (1.0 - gate))).astype(dz_ref.dtype)
        dy = dy * zt * gate                             # d loss / d (y + D u)
    else:
        dz_ref[...] = jnp.zeros_like(dz_ref)
    for k in range(n):                                  # dC, and C[:, k] dy into G_s as the adjoint's input
        dC_ref[:, k:k + 1] = jnp.sum(H_s[k] * dy, axis=1, keepdims=True)
        G_s[k] = C_ref[:, k:k + 1].astype(_F32) * dy

    def reverse_step(i, g):                             # G_s[:, t] = d loss / d state after step t
        row = pl.ds(cfg.tile - 1 - i, 1)
        g = g + G_s[:, row, :]
        G_s[:, row, :] = g
        return g * dA_s[:, row, :]

    g_s[...] = lax.fori_loop(0, cfg.tile, reverse_step, g_s[...])
    dx = jnp.zeros_like(dt)                             # d loss / d (dt u)
    ddt = jnp.zeros_like(dt)
    for k in range(n):
        dx = dx + B_ref[:, k:k + 1].astype(_F32) * G_s[k]
        dlog = G_s[k] * dA_s[k] * Hprev_s[k]            # d loss / d (dt A[k])
        ddt = ddt + dlog * A_ref[k:k + 1, :].astype(_F32)
        dA_acc[k] = dA_acc[k] + jnp.sum(dlog * dt, axis=0, keepdims=True)
        dB_ref[:, k:k + 1] = jnp.sum(G_s[k] * x, axis=1, keepdims=True)
    ddt = ddt + dx * u
    du = dx * dt
    if cfg.has_D:
        du = du + dy * D_ref[...].astype(_F32)
        dD_acc[...] += jnp.sum(dy * u, axis=0, keepdims=True)
    if cfg.softplus:
        ddt = ddt * jnp.where(pre > 20.0, 1.0, jax.nn.sigmoid(pre))
    ddt = jnp.where(step < cfg.length, ddt, 0.0)
    if cfg.has_bias:
        dbias_acc[...] += jnp.sum(ddt, axis=0, keepdims=True)
    du_ref[...] = du.astype(du_ref.dtype)
    ddelta_ref[...] = ddt.astype(ddelta_ref.dtype)

    @pl.when(r == cfg.n_tiles - 1)
    def _():
        dh0_ref[...] = g_s[...]
        dA_ref[...] = dA_acc[...]
        dD_ref[...] = dD_acc[...]
        dbias_ref[...] = dbias_acc[...]


def backward(cfg, res, dout, dlast):
    """The VJP of ``forward``: gradients in the layouts of its inputs (dA partials summed, dB, dC per group)."""
    u, delta, A_t, B, C, D, z, bias, ckpt = res
    batch, padded, dim = u.shape
    dstate = A_t.shape[0]
    P = _lanes(dim)
    n_blocks = dim // P
    s = _backward_specs(cfg, dim, dstate)
    opt_args, opt_specs = _optional_inputs(s, D, z, bias)
    rows = _out((batch, padded, dim), _F32, u)
    state = _out((batch, dstate, 1, dim), _F32, u)
    partial_cols = _out((batch, n_blocks, padded, dstate), _F32, u)
    partial_chan = _out((batch, 1, dim), _F32, u)
    slab = pltpu.VMEM((dstate, cfg.tile, P), _F32)
    du, ddelta, dz, dA, dB, dC, dD, dbias, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, cfg),
        grid=(batch, n_blocks, cfg.n_tiles),
        in_specs=[s["rows"], s["rows"], s["A"], s["cols"], s["cols"], s["ckpt"], s["rows"], s["state"]]
        + opt_specs,
        out_specs=[s["rows"], s["rows"], s["rows"], s["state"], s["partial_cols"], s["partial_cols"],
                   s["partial_chan"], s["partial_chan"], s["state"]],
        out_shape=[rows, rows, rows, state, partial_cols, partial_cols, partial_chan, partial_chan, state],
        scratch_shapes=[pltpu.VMEM((dstate, 1, P), _F32), pltpu.VMEM((dstate, 1, P), _F32),
                        pltpu.VMEM((1, P), _F32), pltpu.VMEM((1, P), _F32), slab, slab, slab, slab, slab],
        name="selective_scan_bwd_tpu",
        **_params(cfg),
    )(u, delta, A_t, B, C, ckpt, dout, dlast[:, :, None, :], *opt_args)

    return (du.astype(u.dtype), ddelta.astype(delta.dtype), dA.sum(0)[:, 0, :].astype(A_t.dtype),
            sum_per_group(dB, cfg.groups).astype(B.dtype), sum_per_group(dC, cfg.groups).astype(C.dtype),
            None if D is None else dD.sum(0).astype(D.dtype),
            None if z is None else dz.astype(z.dtype),
            None if bias is None else dbias.sum(0).astype(bias.dtype), dh0[:, :, 0, :])
