"""The selective scan as Pallas kernels (impl="pallas"), with a custom VJP whose backward is a Pallas kernel too.

Same function as ssm.scan.selective_scan (see its docstring for the math); this module is what
``selective_scan(..., impl="pallas")`` dispatches to: the entry point, the custom VJP, and the kernels for
Pallas' GPU (Triton) backend; the TPU (Mosaic) kernels are in ssm/pallas_scan_tpu.py. On CPU the kernels run in
the Pallas interpreters so that the tier-1 tests check their logic against the float64 oracle.

Tiling. The grid is (batch, dim // block_dim): one program per (batch row, block of ``block_dim`` consecutive
channels inside one B/C group). A program walks the sequence in tiles of ``tile`` steps (an outer in-kernel
``fori_loop`` over tiles, an inner one over the steps of a tile) and keeps its fp32 state on chip as a
(dstate, block_dim) value: one step reads a (1, block_dim) row of u, delta, z (channels-last, contiguous) and a
(dstate, 1) column of B and C ((batch, groups, dstate, seqlen) layout), and the softplus / delta_bias, D skip
and silu(z) gate are fused in. A, D and delta_bias are read once per program. ``unroll`` groups the steps: a
group's loads are all issued before its steps run, so that they wait for memory once per group rather than once
per step (a step's loads never depend on the state, but in a one-step loop they are issued only after the previous
step's arithmetic); a group costs registers, as experiments/bench/triton_compile.py reports.

Saved for the backward pass: the inputs and the fp32 state at each tile boundary, (batch, n_tiles, dstate,
dim): O(batch x seqlen/tile x dim x dstate), not the state of every step; a forward that is not differentiated
writes none of them. The backward kernel walks the tiles in reverse; for each tile it recomputes the tile's
states from the saved boundary state into a per-program workspace of (tile, dstate, block_dim) fp32 values, then
runs the reverse-time adjoint recurrence over the tile. dA, dB, dC, dD and d(delta_bias) sum over programs (over
batch rows and over the channel blocks of a group): the kernel writes per-program partials and XLA sums them
after the call. du, ddelta and dz are stored in the inputs' dtypes.

Sequence splits (``splits`` > 1): the grid has batch x dim / block_dim one-warp programs, 256 at batch 1 and dim
8192, under an H100's 528 warp schedulers. With S splits, a first kernel runs each of the first S - 1 parts of the
sequence (whole tiles) from a zero state and writes its end state and its sum of dt; XLA chains them into each
part's starting state (start[s + 1] = exp(A sum dt[s]) start[s] + end[s], exact by the recurrence's linearity);
then the forward kernel runs the S parts side by side, S times the programs. The backward likewise: the adjoint's
recurrence (g <- exp(dt A) (g + C dy)) is linear too and reads no state, so a first kernel runs each of the last
S - 1 parts in reverse from a zero adjoint, XLA chains them into the adjoint each part's reverse pass starts from
(the last part's: the cotangent of the last state), and the backward kernel runs the S parts side by side, each
from its tile-boundary states, dA, dD and d(delta_bias) partials kept per part. The cost: the first passes over
(S - 1) / S of the steps (a step of the forward's three quarters of a forward step, of the backward's a sixth of
a backward step; experiments/bench/triton_compile.py). Off by default until the GPU benchmark says where it
pays.

B and C: by default (b, groups, n, seqlen), a step's column being n strided loads; ``bc_rows=True`` lays them out
(b, groups, seqlen, n), one contiguous load reshaped to a column (which is faster is for the GPU benchmark).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from runtime.checks import check_bool, check_float, check_positive_int, check_rank, is_integer, shape_of

DEFAULT_TILE = 64
MAX_BLOCK_DIM = 32
_F32 = jnp.float32
# The kernels' exponentials are exp2 (_exp); the decay's A is scaled by LOG2E once per program
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
DEFAULT_NUM_WARPS = 1
KERNELS = ("triton", "mosaic_tpu")
KERNEL_BACKENDS = {"triton": "gpu", "mosaic_tpu": "tpu"}  # where each compiles; elsewhere it is interpreted


def _exp(x):
    """exp as exp2: in Pallas' Triton lowering jnp.exp is libdevice's expf (~9 instructions around a MUFU.EX2),
    exp2 one ex2.approx, as mamba_ssm's fast-math CUDA build computes its exponentials."""
    return jnp.exp2(x * LOG2E)


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log1p(_exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


def _block_dim(per_group: int, largest: int) -> int:
    """The largest power of two <= ``largest`` dividing dim // groups (a block never straddles two groups)."""
    return math.gcd(per_group, largest)


class _Config:
    """The static shape and option set of one call (hashable, so it can be a custom_vjp nondiff argument)."""

    def __init__(self, *, length, tile, block_dim, groups, has_D, has_z, has_bias, softplus, interpret, num_warps,
                 kernel, bc_rows=False, unroll=1, prefetch=False, splits=1):
        self.length, self.tile, self.block_dim, self.groups = length, tile, block_dim, groups
        self.num_warps, self.kernel, self.bc_rows, self.unroll = num_warps, kernel, bc_rows, unroll
        self.prefetch = prefetch
        self.has_D, self.has_z, self.has_bias = has_D, has_z, has_bias
        self.softplus, self.interpret = softplus, interpret
        self.n_tiles = -(-length // tile)
        self.padded = self.n_tiles * tile
        self.splits = math.gcd(splits, self.n_tiles)  # the sequence splits, whole tiles each
        self.split_tiles = self.n_tiles // self.splits

    def compiler_params(self):
        """Pallas' Triton backend, explicitly: JAX's default GPU lowering is Mosaic GPU, which wants memory accesses
        in multiples of 128 elements and warpgroup-level programs; these kernels are written per Triton program."""
        return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=1)

    def _key(self):
        return tuple(sorted(vars(self).items()))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Config) and self._key() == other._key()


# ----------------------------------------------------------------------------------------------------------
# block specs. Arrays the kernels see (batch axis squeezed):
#   rows  u, delta, z, dout, du, ddelta, dz: (b, padded, dim)       -> (padded, block_dim)
#   cols  B, C, dB, dC partials:              (b, groups|blocks, n, padded) -> (n, padded); with bc_rows
#         (b, groups|blocks, padded, n) -> (padded, n), a step's n values contiguous
#   state h0, last, dh0:                      (b, n, dim)           -> (n, block_dim)
#   chan  A^T: (n, dim) -> (n, block_dim); D, delta_bias: (1, dim) -> (1, block_dim)
#   split_state, split_chan (grid (b, j, s)): per sequence split, the forward's starting states and the
#         backward's incoming adjoints and dA partials (b, splits, n, dim) -> (n, block_dim); the first passes'
#         sums of dt and the backward's dD, dbias partials (b, splits, 1, dim) -> (1, block_dim)


def _specs(cfg: _Config, dim: int, dstate: int):
    P, L = cfg.block_dim, cfg.padded
    blocks_per_group = dim // cfg.groups // P
    return dict(
        rows=pl.BlockSpec((None, L, P), lambda b, j, *_: (b, 0, j)),
        cols=pl.BlockSpec((None, None) + _bc_block(cfg, dstate), lambda b, j, *_: (b, j // blocks_per_group, 0, 0)),
        partial_cols=pl.BlockSpec((None, None) + _bc_block(cfg, dstate), lambda b, j, *_: (b, j, 0, 0)),
        state=pl.BlockSpec((None, dstate, P), lambda b, j, *_: (b, 0, j)),
        A=pl.BlockSpec((dstate, P), lambda b, j, *_: (0, j)),
        chan=pl.BlockSpec((1, P), lambda b, j, *_: (0, j)),
        ckpt=pl.BlockSpec((None, cfg.n_tiles, dstate, P), lambda b, j, *_: (b, 0, 0, j)),
        work=pl.BlockSpec((None, None, None, cfg.tile, dstate, P), lambda b, j, s: (b, j, s, 0, 0, 0)),
        split_state=pl.BlockSpec((None, None, dstate, P), lambda b, j, s: (b, s, 0, j)),
        split_chan=pl.BlockSpec((None, None, 1, P), lambda b, j, s: (b, s, 0, j)),
    )


def _bc_block(cfg, dstate):
    return (cfg.padded, dstate) if cfg.bc_rows else (dstate, cfg.padded)


def _column(cfg, ref, t):
    """Step t of B or C as an (n, 1) fp32 column, from either layout."""
    if cfg.bc_rows:
        return _row(ref, t).reshape(-1, 1)
    return ref[:, pl.ds(t, 1)].astype(_F32)


def _set_column(cfg, ref, t, value):
    """Writes an (n, 1) column as step t of dB or dC."""
    if cfg.bc_rows:
        ref[pl.ds(t, 1), :] = value.reshape(1, -1)
    else:
        ref[:, pl.ds(t, 1)] = value


def _channel_constants(cfg, A_ref, D_ref, bias_ref):
    """A log2 e (n, P), D and delta_bias (1, P) as fp32 values, read once per program: a ref read inside the step
    loop is a global load (and, for A, a register-layout conversion) on every step."""
    return (A_ref[...].astype(_F32) * LOG2E, D_ref[...].astype(_F32) if cfg.has_D else None,
            bias_ref[...].astype(_F32) if cfg.has_bias else None)


def _row(ref, t):
    """Step t of a (padded, P) block as a (1, P) fp32 row."""
    return ref[pl.ds(t, 1), :].astype(_F32)


def _step_size(cfg, t, delta, bias):
    """Step t's dt from its delta row (1, P): (delta + bias, dt after bias / softplus / the padding mask)."""
    pre = delta + bias if cfg.has_bias else delta
    dt = _softplus(pre) if cfg.softplus else pre
    return pre, jnp.where(t < cfg.length, dt, 0.0)  # padding steps leave the state as it is


def _advance(cfg, t, delta, u, B, bias, A2, h):
    """Step t of the recurrence from its delta, u rows (1, P) and B column (n, 1): dt (_step_size), the decay
    exp(dt A) = exp2(dt A2) (n, P) (A2 = A log2 e) and h <- decay h + B dt u. Returns (dt before bias and
    softplus, dt, decay, the new h)."""
    pre, dt = _step_size(cfg, t, delta, bias)
    decay = jnp.exp2(dt * A2)
    return pre, dt, decay, decay * h + B * (dt * u)


def _grouped_steps(cfg, count, step_of, load, body, carry):
    """A loop over ``count`` sequence steps (the k-th being step_of(k)) in groups of cfg.unroll: each group's loads,
    load(t), are all issued before its steps, body(t, loaded, carry), run. A step's loads do not depend on the
    recurrence, but in a one-step loop each waits for the previous step's arithmetic; grouped, a group pays about
    one memory latency instead of cfg.unroll of them (at the cost of the registers that hold the group's inputs).
    With cfg.prefetch, the loads run one group ahead (software pipelining): group k+1's loads are issued before
    group k's steps and carried into the next iteration, so that their latency overlaps a group of arithmetic
    (the last iteration reloads its own group rather than reading past the loop's steps)."""
    n_groups = count // cfg.unroll

    def steps(k):
        return [step_of(k * cfg.unroll + i) for i in range(cfg.unroll)]

    def run(k, loaded, carry):
        for t, inputs in zip(steps(k), loaded):
            carry = body(t, inputs, carry)
        return carry

    if not cfg.prefetch:
        return lax.fori_loop(0, n_groups, lambda k, carry: run(k, [load(t) for t in steps(k)], carry), carry)

    def group(k, state):
        carry, loaded = state
        ahead = [load(t) for t in steps(jnp.minimum(k + 1, n_groups - 1))]
        return run(k, loaded, carry), ahead

    return lax.fori_loop(0, n_groups, group, (carry, [load(t) for t in steps(0)]))[0]


def _optional_inputs(specs, D, z, bias):
    """The optional inputs present (in the kernels' order D, z, delta_bias) and their block specs."""
    present = [(x, spec) for x, spec in ((D, specs["chan"]), (z, specs["rows"]), (bias, specs["chan"]))
               if x is not None]
    return [x for x, _ in present], [spec for _, spec in present]


def _optional(cfg, refs):
    """A kernel's refs after its fixed inputs -> (D_ref, z_ref, bias_ref, the refs after them): each optional
    input's ref where cfg has it, else None."""
    refs = list(refs)
    return [refs.pop(0) if flag else None for flag in (cfg.has_D, cfg.has_z, cfg.has_bias)] + [refs]


# ----------------------------------------------------------------------------------------------------------
# forward kernel


def _split_ends_kernel(cfg: _Config, *refs):
    """The forward's first pass where the sequence is split (cfg.splits > 1): program (b, j, s) runs split s's
    steps from a zero state and writes its end state and its sum of dt (the split's decay is exp(A sum dt))."""
    u_ref, delta_ref, A_ref, B_ref, *rest = refs
    bias_ref = rest[0] if cfg.has_bias else None
    end_ref, dt_sum_ref = rest[-2:]
    A2 = A_ref[...].astype(_F32) * LOG2E
    bias = bias_ref[...].astype(_F32) if cfg.has_bias else None

    def step(t, inputs, carry):
        h, dt_sum = carry
        _, dt, _, h = _advance(cfg, t, *inputs, bias, A2, h)
        return h, dt_sum + dt

    steps = cfg.split_tiles * cfg.tile
    start = pl.program_id(2) * steps
    h, dt_sum = _grouped_steps(cfg, steps, lambda i: start + i,
                               lambda t: (_row(delta_ref, t), _row(u_ref, t), _column(cfg, B_ref, t)), step,
                               (jnp.zeros_like(A2), jnp.zeros((1, cfg.block_dim), _F32)))
    end_ref[...] = h
    dt_sum_ref[...] = dt_sum


def _split_starts(cfg: _Config, specs, u, delta, A_t, B, h0, bias):
    """(b, splits, n, d): the state each sequence split starts from, from the splits' end states and decays
    (_split_ends_kernel) chained in order: start[s + 1] = exp(A sum dt[s]) start[s] + end[s]."""
    batch, _, dim = u.shape
    others = cfg.splits - 1
    ends, dt_sums = pl.pallas_call(
        functools.partial(_split_ends_kernel, cfg),
        grid=(batch, dim // cfg.block_dim, others),
        in_specs=[specs["rows"], specs["rows"], specs["A"], specs["cols"]] + ([specs["chan"]] if cfg.has_bias else []),
        out_specs=[specs["split_state"], specs["split_chan"]],
        out_shape=[_out((batch, others) + A_t.shape, _F32, u), _out((batch, others, 1, dim), _F32, u)],
        interpret=cfg.interpret,
        compiler_params=cfg.compiler_params(),
        name="selective_scan_split_ends",
    )(u, delta, A_t, B, *([bias] if cfg.has_bias else []))
    starts = [h0]
    for split in range(others):
        starts.append(jnp.exp(A_t.astype(_F32) * dt_sums[:, split]) * starts[-1] + ends[:, split])
    return jnp.stack(starts, axis=1)


def _forward_kernel(cfg: _Config, checkpoints: bool, *refs):
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, *rest = refs
    D_ref, z_ref, bias_ref, rest = _optional(cfg, rest)
    out_ref, last_ref, *ckpt_ref = rest
    ckpt_ref = ckpt_ref[0] if checkpoints else None
    A2, D, bias = _channel_constants(cfg, A_ref, D_ref, bias_ref)

    def load(t):
        return (_row(delta_ref, t), _row(u_ref, t), _column(cfg, B_ref, t), _column(cfg, C_ref, t),
                _row(z_ref, t) if cfg.has_z else None)

    def step(t, inputs, h):
        delta, u, B, C, z = inputs
        *_, h = _advance(cfg, t, delta, u, B, bias, A2, h)
        y = jnp.sum(h * C, axis=0, keepdims=True)
        if cfg.has_D:
            y = y + D * u
        if cfg.has_z:
            y = y * z * _sigmoid(z)
        out_ref[pl.ds(t, 1), :] = y.astype(out_ref.dtype)
        return h

    def tile(k, h):
        if checkpoints:
            ckpt_ref[k] = h
        start = k * cfg.tile
        return _grouped_steps(cfg, cfg.tile, lambda i: start + i, load, step, h)

    if cfg.splits == 1:
        last_ref[...] = lax.fori_loop(0, cfg.n_tiles, tile, h0_ref[...].astype(_F32))
        return
    split = pl.program_id(2)  # this program's tiles: split s's, from the state it starts from (_split_starts)
    h = lax.fori_loop(0, cfg.split_tiles, lambda r, h: tile(split * cfg.split_tiles + r, h), h0_ref[...])

    @pl.when(split == cfg.splits - 1)
    def _():
        last_ref[...] = h


def _forward(cfg: _Config, u, delta, A_t, B, C, h0, D, z, bias, checkpoints=True):
    """Padded channels-last u, delta, z (b, Lp, d); A_t (n, d); B, C (b, g, n, Lp); h0 (b, n, d) fp32;
    D, bias (1, d). Returns out (b, Lp, d) in u's dtype, last (b, n, d) and, with ``checkpoints`` (what the
    backward needs), the tile-boundary states (b, n_tiles, n, d), else None."""
    batch, _, dim = u.shape
    dstate = A_t.shape[0]
    s = _specs(cfg, dim, dstate)
    opt_args, opt_specs = _optional_inputs(s, D, z, bias)
    out_specs = [s["rows"], s["state"]] + ([s["ckpt"]] if checkpoints else [])
    out_shape = [_out(u.shape, u.dtype, u), _out((batch, dstate, dim), _F32, u)]
    out_shape += [_out((batch, cfg.n_tiles, dstate, dim), _F32, u)] if checkpoints else []
    grid, h0_spec = (batch, dim // cfg.block_dim), s["state"]
    if cfg.splits > 1:
        h0, grid, h0_spec = _split_starts(cfg, s, u, delta, A_t, B, h0, bias), grid + (cfg.splits,), s["split_state"]
    out, last, *ckpt = pl.pallas_call(
        functools.partial(_forward_kernel, cfg, checkpoints),
        grid=grid,
        in_specs=[s["rows"], s["rows"], s["A"], s["cols"], s["cols"], h0_spec] + opt_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=cfg.compiler_params(),
        name="selective_scan_fwd",
    )(u, delta, A_t, B, C, h0, *opt_args)
    return out, last, (ckpt + [None])[0]


# ----------------------------------------------------------------------------------------------------------
# backward kernel


def _split_adjoints_kernel(cfg: _Config, *refs):
    """The backward's first pass where the sequence is split (cfg.splits > 1): program (b, j, s) runs split s + 1's
    steps in reverse from a zero adjoint and writes the adjoint it ends with (that of the state before the split,
    from the split's own outputs) and its sum of dt. The adjoint's recurrence does not read the states."""
    delta_ref, A_ref, C_ref, dout_ref, *rest = refs
    z_ref = rest.pop(0) if cfg.has_z else None
    bias_ref = rest.pop(0) if cfg.has_bias else None
    adjoint_ref, dt_sum_ref = rest
    A2 = A_ref[...].astype(_F32) * LOG2E
    bias = bias_ref[...].astype(_F32) if cfg.has_bias else None

    def step(t, inputs, carry):
        g, dt_sum = carry
        delta, C, dy, zt = inputs
        _, dt = _step_size(cfg, t, delta, bias)
        if cfg.has_z:
            dy = dy * zt * _sigmoid(zt)
        return (g + C * dy) * jnp.exp2(dt * A2), dt_sum + dt

    steps = cfg.split_tiles * cfg.tile
    end = (pl.program_id(2) + 2) * steps  # split s + 1 ends here
    g, dt_sum = _grouped_steps(cfg, steps, lambda i: end - 1 - i,
                               lambda t: (_row(delta_ref, t), _column(cfg, C_ref, t), _row(dout_ref, t),
                                          _row(z_ref, t) if cfg.has_z else None), step,
                               (jnp.zeros_like(A2), jnp.zeros((1, cfg.block_dim), _F32)))
    adjoint_ref[...] = g
    dt_sum_ref[...] = dt_sum


def _split_incoming_adjoints(cfg: _Config, specs, delta, A_t, C, dout, z, bias, dlast):
    """(b, splits, n, d): the adjoint each sequence split's reverse pass starts from (that of its last state), from
    the later splits' own adjoints and decays (_split_adjoints_kernel) chained in reverse: incoming[S - 1] = dlast,
    incoming[s - 1] = exp(A sum dt[s]) incoming[s] + own[s]."""
    batch, _, dim = delta.shape
    others = cfg.splits - 1
    optional, optional_specs = _optional_inputs(specs, None, z, bias)
    own, dt_sums = pl.pallas_call(
        functools.partial(_split_adjoints_kernel, cfg),
        grid=(batch, dim // cfg.block_dim, others),
        in_specs=[specs["rows"], specs["A"], specs["cols"], specs["rows"]] + optional_specs,
        out_specs=[specs["split_state"], specs["split_chan"]],
        out_shape=[_out((batch, others) + A_t.shape, _F32, delta), _out((batch, others, 1, dim), _F32, delta)],
        interpret=cfg.interpret,
        compiler_params=cfg.compiler_params(),
        name="selective_scan_split_adjoints",
    )(delta, A_t, C, dout, *optional)
    incoming = [dlast.astype(_F32)]
    for split in range(others - 1, -1, -1):  # own[split] is split split + 1's
        incoming.append(jnp.exp(A_t.astype(_F32) * dt_sums[:, split]) * incoming[-1] + own[:, split])
    return jnp.stack(incoming[::-1], axis=1)


def _backward_kernel(cfg: _Config, *refs):
    u_ref, delta_ref, A_ref, B_ref, C_ref, ckpt_ref, dout_ref, dlast_ref, *rest = refs
    D_ref, z_ref, bias_ref, rest = _optional(cfg, rest)
    du_ref, ddelta_ref, dz_ref, dA_ref, dB_ref, dC_ref, dD_ref, dbias_ref, dh0_ref, work_ref = with_dz(rest, cfg.has_z)
    A2, D, bias = _channel_constants(cfg, A_ref, D_ref, bias_ref)

    def recompute_inputs(t):
        return _row(delta_ref, t), _row(u_ref, t), _column(cfg, B_ref, t)

    def recompute(start):
        def step(t, inputs, h):  # work[t - start] = the state before step t
            work_ref[t - start] = h
            return _advance(cfg, t, *inputs, bias, A2, h)[-1]
        return step

    def reverse_inputs(start):
        def load(t):
            return (_row(delta_ref, t), _row(u_ref, t), _column(cfg, B_ref, t), _column(cfg, C_ref, t),
                    work_ref[t - start], _row(dout_ref, t), _row(z_ref, t) if cfg.has_z else None)
        return load

    def reverse_step(t, inputs, carry):
        g, dA, dD, dbias = carry
        delta, u, B, C, h_prev, dy, zt = inputs                  # dy: d loss / d out, (1, P)
        pre, dt, decay, h = _advance(cfg, t, delta, u, B, bias, A2, h_prev)
        if cfg.has_z:
            gate = _sigmoid(zt)
            y = jnp.sum(h * C, axis=0, keepdims=True) + (D * u if cfg.has_D else 0.0)
            dz_ref[pl.ds(t, 1), :] = (dy * y * gate * (1.0 + zt * (1.0 - gate))).astype(dz_ref.dtype)
            dy = dy * zt * gate                                  # d loss / d (y + D u)
        du = dy * D if cfg.has_D else jnp.zeros_like(dy)
        if cfg.has_D:
            dD = dD + dy * u
        g = g + C * dy                                           # adjoint of h_t, (n, P)
        _set_column(cfg, dC_ref, t, jnp.sum(h * dy, axis=1, keepdims=True))
        _set_column(cfg, dB_ref, t, jnp.sum(g * (dt * u), axis=1, keepdims=True))
        dx = jnp.sum(g * B, axis=0, keepdims=True)               # d loss / d (dt u), (1, P)
        dlog = g * decay * h_prev                                # d loss / d (dt A), (n, P)
        ddt = dx * u + jnp.sum(dlog * A2, axis=0, keepdims=True) * LN2   # A = A2 ln 2
        dA = dA + dlog * dt
        du = du + dx * dt
        if cfg.softplus:
            ddt = ddt * jnp.where(pre > 20.0, 1.0, _sigmoid(pre))
        ddt = jnp.where(t < cfg.length, ddt, 0.0)
        if cfg.has_bias:
            dbias = dbias + ddt
        du_ref[pl.ds(t, 1), :] = du.astype(du_ref.dtype)
        ddelta_ref[pl.ds(t, 1), :] = ddt.astype(ddelta_ref.dtype)
        return g * decay, dA, dD, dbias

    split = pl.program_id(2)  # this program's tiles: split s's (all of them without splits), in reverse

    def tile(r, carry):
        k = (split + 1) * cfg.split_tiles - 1 - r
        start = k * cfg.tile
        _grouped_steps(cfg, cfg.tile, lambda i: start + i, recompute_inputs, recompute(start), ckpt_ref[k])
        return _grouped_steps(cfg, cfg.tile, lambda i: start + cfg.tile - 1 - i, reverse_inputs(start), reverse_step,
                              carry)

    row = jnp.zeros((1, cfg.block_dim), _F32)
    g, dA, dD, dbias = lax.fori_loop(0, cfg.split_tiles, tile,
                                     (dlast_ref[...].astype(_F32), jnp.zeros_like(A2), row, row))
    dA_ref[...] = dA
    dD_ref[...] = dD
    dbias_ref[...] = dbias

    @pl.when(split == 0)
    def _():
        dh0_ref[...] = g


def _backward(cfg: _Config, res, dout, dlast):
    u, delta, A_t, B, C, D, z, bias, ckpt = res
    batch, padded, dim = u.shape
    dstate = A_t.shape[0]
    n_blocks = dim // cfg.block_dim
    s = _specs(cfg, dim, dstate)
    opt_args, opt_specs = _optional_inputs(s, D, z, bias)
    rows = backward_rows(u, delta, z)
    S = cfg.splits  # the programs of one (b, j) split the sequence: their dA, dD, dbias partials are per split
    partial_cols = _out((batch, n_blocks) + _bc_block(cfg, dstate), _F32, u)
    state = _out((batch, dstate, dim), _F32, u)
    split_state = _out((batch, S, dstate, dim), _F32, u)
    split_chan = _out((batch, S, 1, dim), _F32, u)
    work = _out((batch, n_blocks, S, cfg.tile, dstate, cfg.block_dim), _F32, u)
    incoming = (_split_incoming_adjoints(cfg, s, delta, A_t, C, dout, z, bias, dlast) if S > 1
                else dlast.astype(_F32)[:, None])
    grads = pl.pallas_call(
        functools.partial(_backward_kernel, cfg),
        grid=(batch, n_blocks, S),
        in_specs=[s["rows"], s["rows"], s["A"], s["cols"], s["cols"], s["ckpt"], s["rows"], s["split_state"]]
        + opt_specs,
        out_specs=[s["rows"]] * len(rows) + [s["split_state"], s["partial_cols"], s["partial_cols"], s["split_chan"],
                                             s["split_chan"], s["state"], s["work"]],
        out_shape=rows + [split_state, partial_cols, partial_cols, split_chan, split_chan, state, work],
        interpret=cfg.interpret,
        compiler_params=cfg.compiler_params(),
        name="selective_scan_bwd",
    )(u, delta, A_t, B, C, ckpt, dout, incoming, *opt_args)
    du, ddelta, dz, dA, dB, dC, dD, dbias, dh0, _ = with_dz(grads, z is not None)

    return (du, ddelta, dA.sum((0, 1)).astype(A_t.dtype),
            sum_per_group(dB, cfg.groups).astype(B.dtype), sum_per_group(dC, cfg.groups).astype(C.dtype),
            None if D is None else dD.sum((0, 1)).astype(D.dtype),
            dz,
            None if bias is None else dbias.sum((0, 1)).astype(bias.dtype), dh0)


def _kernels(cfg: _Config):
    """(forward, backward) of cfg.kernel: this module's Triton kernels or ssm/pallas_scan_tpu.py's Mosaic ones."""
    if cfg.kernel == "mosaic_tpu":
        from ssm import pallas_scan_tpu  # imports this module's helpers

        return pallas_scan_tpu.forward, pallas_scan_tpu.backward
    return _forward, _backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, A_t, B, C, D, z, bias, h0):  # not differentiated: no tile-boundary states written
    out, last, _ = _kernels(cfg)[0](cfg, u, delta, A_t, B, C, h0, D, z, bias, checkpoints=False)
    return out, last


def _scan_fwd(cfg, u, delta, A_t, B, C, D, z, bias, h0):
    out, last, ckpt = _kernels(cfg)[0](cfg, u, delta, A_t, B, C, h0, D, z, bias)
    return (out, last), (u, delta, A_t, B, C, D, z, bias, ckpt)


def _scan_bwd(cfg, res, cotangents):
    dout, dlast = cotangents
    return _kernels(cfg)[1](cfg, res, dout, dlast)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                          initial_state=None, tile=None, interpret=None, block_dim=MAX_BLOCK_DIM,
                          num_warps=DEFAULT_NUM_WARPS, kernel=None, bc_rows=False, unroll=1, prefetch=False,
                          splits=1):
    """ssm.scan.selective_scan's contract (channels-last u, delta, z (b, l, d); B, C (b, l, g, n)) on the Pallas
    kernels. tile: sequence steps per tile (default DEFAULT_TILE, capped at seqlen; for the TPU kernel at most
    pallas_scan_tpu.MAX_TILE, rounded up to a multiple of 16); interpret: run the kernels in the Pallas interpreter
    (default: where the platform is not the kernel's own, KERNEL_BACKENDS). kernel: "triton" (GPU, this module) or
    "mosaic_tpu" (ssm/pallas_scan_tpu.py); default: chosen where the call is lowered (lax.platform_dependent),
    "mosaic_tpu" for a TPU, else "triton", so that a step compiled ahead of time for a TPU (experiments.plan
    target=) or exported for one gets the TPU kernel from a CPU process. block_dim (a power of two: the channels of
    one program, capped by the channels per B/C group), num_warps (per program), bc_rows (B and C laid out (padded,
    n), one contiguous load per step, instead of (n, padded), n strided loads), unroll (a power of two: steps whose
    loads are issued together; capped to divide the tile), prefetch (loads issued one group of steps ahead) and
    splits (the forward's and backward's sequence splits, capped to divide the number of tiles: the module
    docstring) are the Triton kernel's tuning knobs that experiments/bench/gpu_scan.py sweeps."""
    for name, value in (("block_dim", block_dim), ("unroll", unroll)):
        if not is_integer(value) or value < 1 or value & (value - 1):
            raise ValueError(f"{name}: expected a power of two, got {value!r}")
    check_positive_int("splits", splits)
    check_positive_int("tile", tile, allow_none=True)  # a negative one ran no step (uninitialised outputs)
    check_positive_int("num_warps", num_warps)
    for name, value in (("delta_softplus", delta_softplus), ("bc_rows", bc_rows), ("prefetch", prefetch)):
        check_bool(name, value)  # each went through bool(): a string "no" was true
    if interpret is not None:
        check_bool("interpret", interpret)
    _check_arrays(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if kernel is None:  # each platform's kernel, picked where the call is lowered
        def on(kernel, native):
            def scan(*arrays):
                return selective_scan_pallas(*arrays[:8], delta_softplus, initial_state=arrays[8], tile=tile,
                                             interpret=not native if interpret is None else interpret,
                                             block_dim=block_dim, num_warps=num_warps, kernel=kernel,
                                             bc_rows=bc_rows, unroll=unroll, prefetch=prefetch, splits=splits)
            return scan
        kernels = {"cpu": on("triton", False), "cuda": on("triton", True), "rocm": on("triton", True)}
        from ssm.pallas_scan_tpu import check_shapes

        try:  # every branch is traced: the TPU kernel only for channels it can lay out on lanes
            check_shapes(u.shape[2], B.shape[2])
            kernels["tpu"] = on("mosaic_tpu", True)
        except ValueError:
            if jax.default_backend() == "tpu":
                raise
        return lax.platform_dependent(u, delta, A, B, C, D, z, delta_bias, initial_state, **kernels)
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    batch, length, dim = u.shape
    groups, dstate = B.shape[2], B.shape[3]
    if length == 0:  # no steps: nothing for a kernel to do
        last = jnp.zeros((batch, dim, dstate), _F32) if initial_state is None else initial_state.astype(_F32)
        return jnp.zeros((batch, 0, dim), u.dtype), last
    tile = min(tile or DEFAULT_TILE, length)
    if kernel == "mosaic_tpu":
        from ssm.pallas_scan_tpu import MAX_TILE, check_shapes

        check_shapes(dim, groups)
        tile = -(-min(tile, MAX_TILE) // 16) * 16  # whole (16, 128) bf16 / (8, 128) fp32 register tiles
    cfg = _Config(length=length, tile=tile, block_dim=_block_dim(dim // groups, block_dim), groups=groups,
                  has_D=D is not None, has_z=z is not None, has_bias=delta_bias is not None,
                  softplus=bool(delta_softplus),
                  interpret=jax.default_backend() != KERNEL_BACKENDS[kernel] if interpret is None else bool(interpret),
                  num_warps=int(num_warps), kernel=kernel, bc_rows=bool(bc_rows) and kernel == "triton",
                  unroll=math.gcd(int(unroll), tile) if kernel == "triton" else 1,
                  prefetch=bool(prefetch) and kernel == "triton", splits=splits if kernel == "triton" else 1)
    pad = cfg.padded - length
    rows = lambda x: None if x is None else jnp.pad(x, ((0, 0), (0, pad), (0, 0)))  # noqa: E731
    if kernel == "mosaic_tpu" or cfg.bc_rows:  # (b, g, Lp, n): a tile of B is a (tile, n) block
        cols = lambda x: jnp.pad(jnp.moveaxis(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))  # noqa: E731
    else:  # (b, g, n, Lp): a step of B is an (n, 1) column
        cols = lambda x: jnp.pad(jnp.moveaxis(x, 1, 3), ((0, 0), (0, 0), (0, 0), (0, pad)))  # noqa: E731
    chan = lambda x: None if x is None else x.reshape(1, dim)  # noqa: E731
    if initial_state is None:
        h0 = jnp.zeros((batch, dstate, dim), _F32)
    else:
        h0 = jnp.swapaxes(initial_state.astype(_F32), 1, 2)
    states = dstate
    if kernel == "triton" and dstate & (dstate - 1):  # Pallas' Triton lowering takes power-of-two arrays only (the
        states = 1 << (dstate - 1).bit_length()       # (n, block_dim) state): rows of A = B = C = h0 = 0 added stay 0
        A = jnp.pad(A, ((0, 0), (0, states - dstate)))
        B, C = (jnp.pad(x, ((0, 0),) * 3 + ((0, states - dstate),)) for x in (B, C))
        h0 = jnp.pad(h0, ((0, 0), (0, states - dstate), (0, 0)))
    if kernel == "triton":  # every thread of a program reads a step's whole B and C columns: in fp32, rather than
        B, C = B.astype(_F32), C.astype(_F32)  # each thread unpacking 2n bf16 values (a fifth of a forward step)
    args = _vary_alike(rows(u), rows(delta), A.T, cols(B), cols(C), chan(D), rows(z), chan(delta_bias), h0)
    out, last = _scan(cfg, *args)
    return out[:, :length], jnp.swapaxes(last[:, :dstate], 1, 2)


def _check_arrays(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """ValueError (TypeError for a dtype) naming the argument, what was expected and what came, for
    selective_scan_pallas's arrays: the kernels' block specs read any shape they are given (in the interpreter an
    out-of-range block reads clamped or padded values: wrong results, no error)."""
    check_rank("u", u, (3,), "(batch, seqlen, dim)")
    batch, length, dim = u.shape
    check_rank("B", B, (4,), f"(batch, seqlen, groups, dstate) = ({batch}, {length}, groups, dstate)")
    groups, dstate = B.shape[2], B.shape[3]
    for name, x, shape, what in (
            ("delta", delta, u.shape, "(batch, seqlen, dim) like u"),
            ("A", A, (dim, dstate), "(dim, dstate), dstate from B"),
            ("B", B, (batch, length, groups, dstate), "(batch, seqlen, groups, dstate) with u's batch and seqlen"),
            ("C", C, B.shape, "like B (the kernels read both with one group index)"),
            ("D", D, (dim,), "(dim,)"),
            ("z", z, u.shape, "(batch, seqlen, dim) like u"),
            ("delta_bias", delta_bias, (dim,), "(dim,)"),
            ("initial_state", initial_state, (batch, dim, dstate), "(batch, dim, dstate)")):
        if x is None and name in ("D", "z", "delta_bias", "initial_state"):
            continue
        if not hasattr(x, "shape") or tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)} {what}, got {shape_of(x)}")
        check_float(name, x)
    check_float("u", u)
    if groups == 0 or dim % groups:
        raise ValueError(f"B: expected a number of groups dividing dim ({dim}), got {groups}")


def _vary_alike(*arrays):
    """Under jax.shard_map (check_vma): makes every input vary over the union of the inputs' manual mesh axes,
    so that the kernels' outputs have one well-defined variance; the cotangent of that cast is a psum, which
    sums the per-shard partial gradients of the inputs that were not varying (A, D over the batch axes)."""
    varying = set().union(*(jax.typeof(x).manual_axis_type.varying for x in arrays if x is not None))
    return [None if x is None else
            lax.pcast(x, tuple(sorted(varying - jax.typeof(x).manual_axis_type.varying)), to="varying")
            for x in arrays]


def backward_rows(u, delta, z):
    """The backward kernels' du, ddelta and (with z) dz outputs (b, padded, d): in u's, delta's and z's dtypes,
    rounded once from the kernels' fp32 values as they are stored (an fp32 output cast afterwards would round
    the same and move 5x the bytes of a bf16 one)."""
    return [_out(x.shape, x.dtype, u) for x in (u, delta, z) if x is not None]


def with_dz(outputs, has_z):
    """The backward kernel's outputs (refs inside it, arrays after it) with None in dz's place where there is no z
    (no dz is allocated or written then)."""
    du, ddelta, *rest = outputs
    return [du, ddelta] + (rest[:1] if has_z else [None]) + rest[has_z:]


def sum_per_group(x, groups):
    """(b, n_blocks, ...) per-channel-block partials of dB or dC -> (b, groups, ...), summing a group's blocks."""
    return x.reshape((x.shape[0], groups, x.shape[1] // groups) + x.shape[2:]).sum(axis=2)


def _out(shape, dtype, like):
    """An output's ShapeDtypeStruct, varying over the same manual mesh axes as ``like`` (an input)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)
