"""The selective scan's Pallas kernels for TPU (Mosaic): forward and backward, same math as ssm/pallas_scan.py.

ssm/pallas_scan.py holds the entry point, the custom VJP and the GPU (Triton) kernels; it calls ``forward`` and
``backward`` here where the kernel is "mosaic_tpu" (the default on a TPU backend). On CPU these kernels run in
the Pallas TPU interpreter (``pltpu.InterpretParams``), which the tier-1 tests use.

Layout. Channels on the 128 lanes, sequence steps on sublanes, the state dimension ``n`` leading. The grid is
(batch, dim // 128, n_tiles): the last axis walks the sequence tiles in order ("arbitrary": sequential on one
core), and the fp32 state (n, 1, 128) stays in a VMEM scratch buffer from one tile to the next; Pallas
double-buffers the (tile, 128) input and output blocks between HBM and VMEM. B and C come in (batch, groups,
seqlen, n) blocks of (tile, n).

One tile, forward: dt, dt * u and the decays exp(dt A) for all the tile's steps at once into VMEM, as n
(tile, 128) slabs (a static lane slice B[:, k] broadcast over the lanes); then the recurrence over the tile's
steps, one (n, 1, 128) state update per step (row ``t`` of each slab), the states written to a third slab; then
out = sum_k C[:, k] * states[k] (+ D u, * silu(z)) for the whole tile at once. Backward, tiles in reverse: the
tile's states recomputed from the boundary state the forward saved, the adjoint recurrence over the steps in
reverse, then every gradient for the whole tile at once; dA, dD, d(delta_bias) accumulate in VMEM over the tiles
of a (batch row, channel block) and dB, dC are written per channel block (summed per group after the call).

Limits: dim // groups must be a multiple of 128, or groups == 1 with dim <= 128 (one block of all channels).
The per-step update works on (n, 1, 128) values (one sublane of n registers): simple and layout-safe, not yet
the densest use of the vector unit. Lowering for TPU is checked on CPU (jax.export); Mosaic's own compiler runs
on a TPU only, and no TPU has run these kernels yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ssm.pallas_scan import _F32, _optional, _optional_inputs, _out, _softplus, sum_per_group

LANES = 128


def check_shapes(dim: int, groups: int) -> None:
    per_group = dim // groups
    if not (per_group % LANES == 0 or (groups == 1 and dim <= LANES)):
        raise ValueError(f"dim: the TPU Pallas kernel needs dim // groups a multiple of {LANES} (or groups == 1 "
                         f"and dim <= {LANES}), got dim {dim} with {groups} group(s)")


def _lanes(dim: int) -> int:
    return min(dim, LANES)


def _specs(cfg, dim: int, dstate: int, reverse: bool):
    """Block specs over the grid (batch b, channel block j, tile step k); ``reverse`` walks the tiles backwards."""
    P, T, nt = _lanes(dim), cfg.tile, cfg.n_tiles
    blocks_per_group = dim // cfg.groups // P
    tile = (lambda k: nt - 1 - k) if reverse else (lambda k: k)
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


def _tile_inputs(cfg, tile_index, delta_ref, bias_ref, u_ref, A_ref, B_ref, dA_s, dBu_s):
    """For the whole tile: pre-softplus dt, dt (0 on padding steps), u; fills dA_s[k] = exp(dt A[k]) and
    dBu_s[k] = B[:, k] dt u, each (tile, 128)."""
    pre = delta_ref[...].astype(_F32)
    if cfg.has_bias:
        pre = pre + bias_ref[...].astype(_F32)
    dt = _softplus(pre) if cfg.softplus else pre
    step = tile_index * cfg.tile + lax.broadcasted_iota(jnp.int32, (cfg.tile, 1), 0)
    dt = jnp.where(step < cfg.length, dt, 0.0)
    u = u_ref[...].astype(_F32)
    x = dt * u
    for k in range(A_ref.shape[0]):
        dA_s[k] = jnp.exp(dt * A_ref[k:k + 1, :].astype(_F32))
        dBu_s[k] = B_ref[:, k:k + 1].astype(_F32) * x
    return pre, dt, u, x, step


def _recompute_states(cfg, h, dA_s, dBu_s, H_s, Hprev_s=None):
    """The recurrence over the tile's steps from state h (n, 1, 128): H_s[:, t] = state after step t (and
    Hprev_s[:, t] = before it). Returns the state after the tile."""
    def step(t, h):
        row = pl.ds(t, 1)
        if Hprev_s is not None:
            Hprev_s[:, row, :] = h
        h = dA_s[:, row, :] * h + dBu_s[:, row, :]
        H_s[:, row, :] = h
        return h

    return lax.fori_loop(0, cfg.tile, step, h)


def _gated_output(cfg, C_ref, H_s, u, D_ref):
    """y = sum_k C[:, k] * H_s[k] (+ D u), (tile, 128), before the z gate."""
    y = sum(C_ref[:, k:k + 1].astype(_F32) * H_s[k] for k in range(H_s.shape[0]))
    return y + D_ref[...].astype(_F32) * u if cfg.has_D else y


# ----------------------------------------------------------------------------------------------------------
# forward


def _forward_kernel(cfg, *refs):
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, *rest = refs
    n_opt = cfg.has_D + cfg.has_z + cfg.has_bias
    D_ref, z_ref, bias_ref = _optional(rest[:n_opt], (cfg.has_D, cfg.has_z, cfg.has_bias))
    out_ref, last_ref, ckpt_ref, h_s, dA_s, dBu_s, H_s = rest[n_opt:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_s[...] = h0_ref[...].astype(_F32)

    ckpt_ref[...] = h_s[...]
    _, _, u, _, _ = _tile_inputs(cfg, k, delta_ref, bias_ref, u_ref, A_ref, B_ref, dA_s, dBu_s)
    h = _recompute_states(cfg, h_s[...], dA_s, dBu_s, H_s)
    h_s[...] = h
    y = _gated_output(cfg, C_ref, H_s, u, D_ref)
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
    dstate = A_t.shape[0]
    s = _specs(cfg, dim, dstate, reverse=False)
    opt_args, opt_specs = _optional_inputs(s, D, z, bias)
    slab = pltpu.VMEM((dstate, cfg.tile, _lanes(dim)), _F32)
    out, last, ckpt = pl.pallas_call(
        functools.partial(_forward_kernel, cfg),
        grid=(batch, dim // _lanes(dim), cfg.n_tiles),
        in_specs=[s["rows"], s["rows"], s["A"], s["cols"], s["cols"], s["state"]] + opt_specs,
        out_specs=[s["rows"], s["state"], s["ckpt"]],
        out_shape=[_out(u.shape, u.dtype, u), _out((batch, dstate, 1, dim), _F32, u),
                   _out((batch, cfg.n_tiles, dstate, 1, dim), _F32, u)],
        scratch_shapes=[pltpu.VMEM((dstate, 1, _lanes(dim)), _F32), slab, slab, slab],
        name="selective_scan_fwd_tpu",
        **_params(cfg),
    )(u, delta, A_t, B, C, h0[:, :, None, :], *opt_args)
    return out, last[:, :, 0, :], ckpt


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
    pre, dt, u, x, step = _tile_inputs(cfg, tile_index, delta_ref, bias_ref, u_ref, A_ref, B_ref, dA_s, dBu_s)
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
    s = _specs(cfg, dim, dstate, reverse=True)
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
