"""The selective scan (Mamba-1 S6) and its one-step decode form.

Math (mamba_ssm's, all in fp32 whatever the input dtype):

    delta = softplus(delta + delta_bias)                       (when asked)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (h_{-1} = initial_state or 0)
    y_t   = sum_n h_t[n] * C_t[n]
    out_t = (y_t + D * u_t) * silu(z_t)                         (D and z optional)

Two layouts:
  * ``selective_scan_fn`` / ``selective_state_update``: mamba_ssm's public layout and argument names,
    u, delta, z: (batch, dim, seqlen); B, C: (batch, dstate, seqlen) or (batch, groups, dstate, seqlen);
    the state update also in mamba_ssm's head form (state (batch, nheads, headdim, dstate)).
  * ``selective_scan``: channels-last, what the models call: u, delta, z: (batch, seqlen, dim);
    B, C: (batch, seqlen, groups, dstate).

Implementations (``impl``), all computing the same function and checked against one float64 oracle:
  * "reference": a sequential ``lax.scan`` over time with the fp32 state as carry, differentiated by JAX's
    autodiff: the plain definition, and the gradient the others are checked against. Its autodiff keeps
    every step's state (O(batch x seqlen x dim x dstate) training memory) and is slow on CPU.
  * "sequential": the same forward walk, with a hand-written backward pass (mamba_ssm's algorithm): the
    forward keeps only the state at each chunk boundary; the backward walks the chunks in reverse,
    recomputes the states inside a chunk and runs the adjoint recurrence step by step. Training memory
    O(batch x seqlen/chunk x dim x dstate + batch x chunk x dim x dstate). On a 2-core CPU its forward +
    backward is 3-5x faster than "reference"'s (docs/BENCHMARKS.md).
  * "chunked": a ``lax.scan`` over chunks of ``chunk_size`` steps; inside a chunk a parallel
    (associative) scan. Each chunk body is rematerialised (``jax.checkpoint``), so the backward pass keeps
    only the state at chunk boundaries: O(batch x seqlen x dim + batch x seqlen/chunk x dim x dstate).
  * "pallas": Pallas kernels, Triton on GPU (ssm/pallas_scan.py) and Mosaic on TPU (ssm/pallas_scan_tpu.py,
    which needs dim // groups a multiple of 128): the fp32 state on chip, the sequence walked in tiles of
    ``chunk_size`` steps, at most the kernels' DEFAULT_TILE (64: the backward holds a tile's states, in VMEM on a
    TPU, on a GPU in a per-program workspace of 128 KB at 64 steps, 32 MB for the 256 programs of batch 1 at dim
    8192, within an H100's 50 MB L2, and four times that at the chunked scan's 256); the custom VJP keeps only
    the state at tile boundaries and recomputes inside each tile (``ssm.pallas_scan.selective_scan_pallas(tile=)``
    sets a tile past that, for benchmarks). Runs in the Pallas interpreter on CPU (slow: for tests).
  * "auto": "sequential" on CPU, "chunked" on GPU/TPU.

Channels are split into ``groups`` blocks of ``dim // groups`` consecutive channels sharing B and C
(channel d uses group d // (dim // groups)); internally the state is kept as (batch, groups, dstate,
dim/groups): B and C broadcast instead of being gathered per channel, and the channels are the contiguous
axis, so each time step is a few wide vector operations (measured on a 2-core CPU at dim 512, dstate 16:
~6x faster per step than with dstate innermost; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from runtime.checks import check_bool, check_float, check_rank, shape_of
from runtime.partitioning import batch_axes, traced_axes
from ssm.pallas_scan import DEFAULT_TILE, selective_scan_pallas

IMPLS = ("auto", "reference", "sequential", "chunked", "pallas")
DEFAULT_CHUNK_SIZE = 256
_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def softplus(x: jax.Array) -> jax.Array:
    """PyTorch's softplus (threshold 20), as mamba_ssm uses it; safe to differentiate for large x."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def discretization_dt(delta: jax.Array, bias: jax.Array | None, apply_softplus: bool) -> jax.Array:
    """The step size in fp32: delta (+ bias) (then softplus), as both mamba_ssm kernels compute it."""
    dt = delta.astype(_F32)
    if bias is not None:
        dt = dt + bias.astype(_F32)
    return softplus(dt) if apply_softplus else dt


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``impl`` with "auto" resolved for ``platform`` (default: this process's backend; the planner passes the
    platform it compiles for ahead of time)."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "sequential" if (platform or jax.default_backend()) == "cpu" else "chunked"
    return impl


def _advance(h, dt, du, B, A):
    """One step of the recurrence on grouped state. h: (b, g, n, p); dt, du: (b, g, p); B: (b, g, n);
    A: (g, n, p)."""
    return jnp.exp(dt[..., None, :] * A) * h + du[..., None, :] * B[..., None]


def _recurrence_step(h, dt, du, B, C, A):
    """One step and its output y: (b, g, p)."""
    h = _advance(h, dt, du, B, A)
    return h, _contract_c(h, C)


def _contract_c(h, C):
    """y[..., p] = sum_n h[..., n, p] C[..., n], in full fp32 (no TF32/bf16 passes on GPU/TPU)."""
    return jnp.einsum("...np,...n->...p", h, C, precision=_HIGHEST)


def _to_grouped(state, groups):
    """(b, dim, n) -> the internal (b, groups, n, dim/groups)."""
    batch, dim, dstate = state.shape
    return jnp.swapaxes(state.reshape(batch, groups, dim // groups, dstate), -1, -2)


def _from_grouped(h):
    """The internal (b, groups, n, dim/groups) -> (b, dim, n)."""
    batch, groups, dstate, per_group = h.shape
    return jnp.swapaxes(h, -1, -2).reshape(batch, groups * per_group, dstate)


def _scan_reference(dt, du, B, C, A, h0):
    """Time-major inputs: dt, du (l, b, g, p); B, C (l, b, g, n). Returns y (l, b, g, p), h_last."""

    def body(h, xs):
        return _recurrence_step(h, *xs, A)

    # No unroll: with this layout XLA:CPU runs 4096 steps at dim 512, dstate 16 in 0.03 s; unroll 2 and 4
    # were 5-8x slower on a 2-core CPU with jax 0.10.2.
    h_last, y = lax.scan(body, h0, (dt, du, B, C))
    return y, h_last


def _pad_time(xs, length, chunk_size):
    """Pads time-major arrays to a multiple of chunk_size and splits them into (n_chunks, chunk_size, ...).
    delta = 0 (and so du = 0) in the padding: exp(0 * A) = 1 and 0 * B = 0 leave the state exactly as it was."""
    pad = (-length) % chunk_size
    n_chunks = (length + pad) // chunk_size
    return tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((n_chunks, chunk_size) + x.shape[1:])
                 for x in xs)


def _states_in_chunk(h, dt, du, B, A):
    """The states after every step of one chunk, from the state h before it: (T, b, g, n, p)."""

    def body(h, xs):
        h = _advance(h, *xs, A)
        return h, h

    return lax.scan(body, h, (dt, du, B))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan_sequential(dt, du, B, C, A, h0, chunk_size):
    """Same contract as _scan_reference; a hand-written backward pass (mamba_ssm's algorithm): the forward
    keeps only the state at chunk boundaries, the backward walks the chunks in reverse, recomputes the states
    inside each chunk and runs the adjoint recurrence there. Training memory O(b l d n / chunk + b chunk d n)."""
    y, h_last, _ = _sequential_forward(dt, du, B, C, A, h0, chunk_size)
    return y, h_last


def _sequential_forward(dt, du, B, C, A, h0, chunk_size):
    length = dt.shape[0]
    chunk_size = max(1, min(chunk_size, length))

    def chunk(h, xs):
        def body(h, step):
            return _recurrence_step(h, *step, A)

        h_next, y = lax.scan(body, h, xs)
        return h_next, (y, h)

    h_last, (y, h_starts) = lax.scan(chunk, h0, _pad_time((dt, du, B, C), length, chunk_size))
    return y.reshape((-1,) + y.shape[2:])[:length], h_last, h_starts


def _sequential_fwd(dt, du, B, C, A, h0, chunk_size):
    y, h_last, h_starts = _sequential_forward(dt, du, B, C, A, h0, chunk_size)
    return (y, h_last), (dt, du, B, C, A, h_starts)


def _sequential_bwd(chunk_size, residuals, cotangents):
    dt, du, B, C, A, h_starts = residuals
    gy, gh_last = cotangents
    length = dt.shape[0]
    chunk_size = max(1, min(chunk_size, length))
    chunks = _pad_time((dt, du, B, C, gy), length, chunk_size)

    def step(carry, xs):
        # dL/dh_t from the steps after t (and from the last state); dL/dA per batch row, summed at the end.
        # Every reduction is a dot_general: XLA:CPU's reduce ops were 10-30x slower on these shapes.
        g_later, gA = carry
        before, dt_t, du_t, B_t, C_t, gy_t = xs
        decay = jnp.exp(dt_t[..., None, :] * A)
        h = decay * before + du_t[..., None, :] * B_t[..., None]
        g = g_later + gy_t[..., None, :] * C_t[..., None]                  # dL/dh_t
        g_decay = g * before * decay                                       # dL/d(dt_t * A)
        g_dt = jnp.einsum("bgnp,gnp->bgp", g_decay, A, precision=_HIGHEST)
        g_du = _contract_c(g, B_t)
        g_B = jnp.einsum("...np,...p->...n", g, du_t, precision=_HIGHEST)
        g_C = jnp.einsum("...np,...p->...n", h, gy_t, precision=_HIGHEST)
        return (g * decay, gA + g_decay * dt_t[..., None, :]), (g_dt, g_du, g_B, g_C)

    def chunk(carry, xs):
        (dt_c, du_c, B_c, C_c, gy_c), h_start = xs
        states = _states_in_chunk(h_start, dt_c, du_c, B_c, A)
        before = jnp.concatenate([h_start[None], states[:-1]])              # the state before each step
        return lax.scan(step, carry, (before, dt_c, du_c, B_c, C_c, gy_c), reverse=True)

    (gh0, gA), grads = lax.scan(chunk, (gh_last, jnp.zeros_like(gh_last)), (chunks, h_starts), reverse=True)
    g_dt, g_du, g_B, g_C = (x.reshape((-1,) + x.shape[2:])[:length] for x in grads)
    gA = jnp.einsum("bgnp,b->gnp", gA, jnp.ones(gA.shape[0], gA.dtype), precision=_HIGHEST)
    return g_dt, g_du, g_B, g_C, gA, gh0


_scan_sequential.defvjp(_sequential_fwd, _sequential_bwd)


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_left * a_right, a_right * b_left + b_right


def _scan_chunked(dt, du, B, C, A, h0, chunk_size):
    """Same contract as _scan_reference; a rematerialised associative scan inside each chunk."""
    length = dt.shape[0]
    chunk_size = max(1, min(chunk_size, length))

    @jax.checkpoint
    def chunk(h, xs):
        dt_c, du_c, B_c, C_c = xs
        decay = jnp.exp(dt_c[..., None, :] * A)                    # (T, b, g, n, p)
        drive = du_c[..., None, :] * B_c[..., None]
        drive = drive.at[0].add(decay[0] * h)                      # fold the carried state into step 0
        _, states = lax.associative_scan(_combine, (decay, drive), axis=0)
        y = _contract_c(states, C_c)
        return states[-1], y

    h_last, y = lax.scan(chunk, h0, _pad_time((dt, du, B, C), length, chunk_size))
    return y.reshape((-1,) + y.shape[2:])[:length], h_last


def _pallas_on_mesh(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, tile):
    """The Pallas kernels, inside jax.shard_map when traced under a mesh (jax.sharding.use_abstract_mesh, as the
    trainer's step is) whose axes, by the rules (runtime.partitioning.traced_axes), split the batch (default: data
    x fsdp) or the channels (d_inner, default: tensor): a kernel is one XLA
    custom call, which the SPMD partitioner would otherwise run whole on every device (all-gathering its
    inputs). Each device scans its own (batch rows, channels) block; B and C (one group per channel block, or
    shared) follow. A dimension that does not divide over its axes is not split (a batch of 1 still has its
    channels split); without such a mesh (or with Explicit axes, whose shardings the arrays carry themselves), or
    where neither divides, the call is left as it is."""
    def scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state=initial_state,
                                     tile=tile)

    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # the mesh axes that split the channels (d_inner) and the batch under the traced mesh and the run's rules; the
    # rows over the batch axes the channels leave free (rules splitting d_inner over fsdp, a batch axis: one axis
    # splits one dimension; P('fsdp', None, 'fsdp') was a DuplicateSpecError), as many as divide them, as the
    # runtime splits a batch's rows (batch_axes: data=2 x fsdp=2 and 2 rows, data)
    chan_axes, n_chan = traced_axes("d_inner")
    groups = B.shape[2]
    ch = chan_axes if chan_axes and u.shape[2] % n_chan == 0 and (groups == 1 or groups % n_chan == 0) else None
    free = tuple(axis for axis in traced_axes("batch")[0] if axis not in (ch or ()))
    bt = batch_axes(jax.sharding.get_abstract_mesh(), u.shape[0], free) or None
    if bt is None and ch is None:
        return scan(*args)
    row = P(bt, None, ch)
    bc = P(bt, None, ch if groups > 1 else None, None)
    specs = (row, row, P(ch, None), bc, bc, P(ch), row, P(ch), P(bt, ch, None))
    present = [i for i, x in enumerate(args) if x is not None]

    def local(*xs):  # the absent optional inputs stay None inside
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return scan(*full)

    # check_vma off: JAX's Pallas interpreter (the CPU path) fails vma checking inside shard_map; the gradients
    # of inputs replicated over a mesh axis (A, D, delta_bias over the batch axes) are summed by shard_map's
    # transpose all the same.
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=tuple(specs[i] for i in present),
                         out_specs=(row, P(bt, ch, None)), check_vma=False)(*(args[i] for i in present))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                   initial_state=None, impl="auto", chunk_size=None):
    """Channels-last selective scan: u, delta, z (b, l, d); B, C (b, l, g, n); A (d, n); D, delta_bias (d,).

    B and C may have different numbers of groups when one refines the other's (both are repeated to the finer
    one). Returns (out (b, l, d) in u's dtype, last_state (b, d, n) fp32). No argument checking: this is the
    inner function the models call under jit; ``selective_scan_fn`` is the checked public entry point.
    """
    impl = resolve_impl(impl)
    if B.shape[2] != C.shape[2]:
        B, C = _to_common_grouping(B, C, axis=2)
    # the padding steps of the chunked forms and kernels (dt = 0) rely on exp(0 * A) = 1, which an A of -inf
    # (exp(A_log) past float32's range) makes NaN; any A below -1e38 decays a real step to 0 as -inf does
    A = jnp.maximum(A.astype(jnp.promote_types(A.dtype, _F32)), -1e38)
    if impl == "pallas":
        tile = min(chunk_size or DEFAULT_TILE, DEFAULT_TILE)
        return _pallas_on_mesh(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, tile)
    batch, length, dim = u.shape
    groups, dstate = B.shape[2], B.shape[3]
    per_group = dim // groups

    dt = discretization_dt(delta, delta_bias, delta_softplus)
    u32 = u.astype(_F32)

    def to_time_major(x, last):  # (b, l, ...) -> (l, b, ...) with the channel axis split into groups
        return jnp.moveaxis(x, 1, 0).reshape((length, batch) + last)

    dt_t = to_time_major(dt, (groups, per_group))
    du_t = to_time_major(dt * u32, (groups, per_group))
    B_t = jnp.moveaxis(B.astype(_F32), 1, 0)
    C_t = jnp.moveaxis(C.astype(_F32), 1, 0)
    A_g = _to_grouped(A.astype(_F32)[None], groups)[0]
    if initial_state is None:
        h0 = jnp.zeros((batch, groups, dstate, per_group), _F32)
    else:
        h0 = _to_grouped(initial_state.astype(_F32), groups)

    if impl == "reference":
        y, h_last = _scan_reference(dt_t, du_t, B_t, C_t, A_g, h0)
    elif impl == "sequential":
        y, h_last = _scan_sequential(dt_t, du_t, B_t, C_t, A_g, h0, chunk_size or DEFAULT_CHUNK_SIZE)
    else:
        y, h_last = _scan_chunked(dt_t, du_t, B_t, C_t, A_g, h0, chunk_size or DEFAULT_CHUNK_SIZE)

    y = jnp.moveaxis(y.reshape(length, batch, dim), 0, 1)
    if D is not None:
        y = y + D.astype(_F32) * u32
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(u.dtype), _from_grouped(h_last)


# ----------------------------------------------------------------------------------------------------------
# mamba_ssm-compatible public entry points (checked arguments, (batch, dim, seqlen) layout)


# the arguments of selective_scan_fn / selective_state_update that mamba_ssm lets be None
_OPTIONAL_ARGS = ("D", "z", "delta_bias", "initial_state", "dt_bias")


def _check(name: str, x: Any, shape: tuple, what: str) -> None:
    if x is None and name in _OPTIONAL_ARGS:
        return
    if not hasattr(x, "shape") or tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {what}, got {shape_of(x)}")
    check_float(name, x)


def _check_bc(name: str, x: Any, batch: int, dim: int, trailing: tuple, layout: str) -> int:
    """Checks a B or C of shape (batch, *trailing) or (batch, groups, *trailing); returns its number of groups."""
    rank = 1 + len(trailing)
    check_rank(name, x, (rank, rank + 1), f"{layout} = {(batch,) + trailing} or with groups after batch")
    groups = 1 if x.ndim == rank else x.shape[1]
    _check(name, x, (batch,) + trailing if x.ndim == rank else (batch, groups) + trailing, layout)
    if dim % groups:
        raise ValueError(f"{name}: groups ({groups}) must divide dim ({dim})")
    return groups


def _check_common_grouping(dim: int, groups_b: int, groups_c: int) -> None:
    if dim % math.lcm(groups_b, groups_c):
        raise ValueError(f"B, C: their groups ({groups_b}, {groups_c}) need a common refinement dividing dim "
                         f"({dim}); lcm {math.lcm(groups_b, groups_c)} does not")


def _to_common_grouping(B, C, axis):
    """Repeats B's and C's groups to the finest grouping both refine to (channel d keeps its B and C)."""
    groups = math.lcm(B.shape[axis], C.shape[axis])
    return (jnp.repeat(B, groups // B.shape[axis], axis=axis), jnp.repeat(C, groups // C.shape[axis], axis=axis))


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, (bool, np.bool_)) or number <= 0:
        raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
    return number


def _check_u_dim(u):
    check_rank("u", u, (3,), "(batch, dim, seqlen)")
    check_float("u", u)
    if 0 in u.shape[:2]:  # seqlen 0 is a scan of no step; batch or dim 0 a ZeroDivisionError in the chunking
        raise ValueError(f"u: expected batch >= 1 and dim >= 1 (seqlen may be 0), got shape {tuple(u.shape)}")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, impl="auto", chunk_size=None):
    """mamba_ssm.selective_scan_fn with the same layout, names and math, plus ``initial_state``.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen) or
    (batch, groups, dstate, seqlen); D, delta_bias: (dim,); initial_state: (batch, dim, dstate).
    Returns out (batch, dim, seqlen) in u's dtype, and with ``return_last_state`` also the fp32 last state
    (batch, dim, dstate).
    """
    _check_u_dim(u)
    batch, dim, length = u.shape
    _check("delta", delta, (batch, dim, length), "(batch, dim, seqlen) like u")
    if not hasattr(A, "shape") or A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim, dstate) with dim={dim}, got {shape_of(A)}")
    if jnp.iscomplexobj(A):
        raise TypeError("A: expected a real array (complex A is not supported), got a complex one")
    _check("A", A, A.shape, "(dim, dstate)")
    dstate = A.shape[1]
    if not 1 <= dstate <= 256:
        raise ValueError(f"A: expected 1 <= dstate <= 256 (mamba_ssm's limit), got {dstate}")
    groups_b = _check_bc("B", B, batch, dim, (dstate, length), "(batch, [groups,] dstate, seqlen)")
    groups_c = _check_bc("C", C, batch, dim, (dstate, length), "(batch, [groups,] dstate, seqlen)")
    _check_common_grouping(dim, groups_b, groups_c)
    _check("D", D, (dim,), "(dim,)")
    _check("z", z, (batch, dim, length), "(batch, dim, seqlen) like u")
    _check("delta_bias", delta_bias, (dim,), "(dim,)")
    _check("initial_state", initial_state, (batch, dim, dstate), "(batch, dim, dstate)")
    check_bool("delta_softplus", delta_softplus)
    check_bool("return_last_state", return_last_state)
    resolve_impl(impl)
    chunk_size = _positive_int_or_none("chunk_size", chunk_size)

    u_t, delta_t, B_t, C_t, z_t = to_channels_last(u, delta, B, C, z)
    out, last_state = _selective_scan_jit(u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias, bool(delta_softplus),
                                          initial_state, impl, chunk_size)
    out = jnp.swapaxes(out, 1, 2)
    return (out, last_state) if return_last_state else out


def to_channels_last(u, delta, B, C, z=None):
    """mamba_ssm's layout -> the one selective_scan and the kernels take: u, delta, z (batch, dim, seqlen) ->
    (batch, seqlen, dim); B, C (batch, dstate, seqlen) or (batch, groups, dstate, seqlen) -> (batch, seqlen,
    groups, dstate). z may be None."""
    def bc(x):
        return jnp.moveaxis(x if x.ndim == 4 else x[:, None], 3, 1)

    rows = [None if x is None else jnp.swapaxes(x, 1, 2) for x in (u, delta, z)]
    return rows[0], rows[1], bc(B), bc(C), rows[2]


@functools.partial(jax.jit, static_argnums=(8, 10, 11))
def _selective_scan_jit(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, impl, chunk_size):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=initial_state,
                          impl=impl, chunk_size=chunk_size)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm.selective_state_update, functional: returns (out, new_state) instead of writing in place.

    state: (batch, dim, dstate); x, dt, z: (batch, dim); A: (dim, dstate); B, C: (batch, dstate) or
    (batch, groups, dstate); D, dt_bias: (dim,). out has x's dtype, new_state has state's dtype; the math
    is fp32. Groups are blocks of dim / groups channels, as in selective_scan_fn (mamba_ssm's 3-D form takes
    only (batch, dstate)).

    mamba_ssm's head form is taken too: state (batch, nheads, headdim, dstate); x, dt, z (batch, nheads,
    headdim); A (nheads, headdim, dstate); B, C (batch, ngroups, dstate) with head h reading group
    h // (nheads / ngroups); D, dt_bias (nheads, headdim). It is the 3-D form over nheads * headdim channels.
    """
    if hasattr(state, "shape") and state.ndim == 4:
        return _state_update_heads(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    check_rank("state", state, (3,), "(batch, dim, dstate) or (batch, nheads, headdim, dstate)")
    batch, dim, dstate = state.shape
    _check("state", state, (batch, dim, dstate), "(batch, dim, dstate)")
    _check("x", x, (batch, dim), "(batch, dim)")
    _check("dt", dt, (batch, dim), "(batch, dim)")
    _check("A", A, (dim, dstate), "(dim, dstate)")
    groups_b = _check_bc("B", B, batch, dim, (dstate,), "(batch, [groups,] dstate)")
    groups_c = _check_bc("C", C, batch, dim, (dstate,), "(batch, [groups,] dstate)")
    _check_common_grouping(dim, groups_b, groups_c)
    _check("D", D, (dim,), "(dim,)")
    _check("z", z, (batch, dim), "(batch, dim)")
    _check("dt_bias", dt_bias, (dim,), "(dim,)")
    check_bool("dt_softplus", dt_softplus)
    return _state_update_jit(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))


def _state_update_heads(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """selective_state_update's head form, checked, as its 3-D form over nheads * headdim channels."""
    batch, nheads, headdim, dstate = state.shape
    heads = (batch, nheads, headdim)
    for name, value, shape, what in (("x", x, heads, "(batch, nheads, headdim)"),
                                     ("dt", dt, heads, "(batch, nheads, headdim)"),
                                     ("A", A, (nheads, headdim, dstate), "(nheads, headdim, dstate)"),
                                     ("z", z, heads, "(batch, nheads, headdim)"),
                                     ("D", D, (nheads, headdim), "(nheads, headdim)"),
                                     ("dt_bias", dt_bias, (nheads, headdim), "(nheads, headdim)")):
        _check(name, value, shape, what)
    for name, value in (("B", B), ("C", C)):
        groups = value.shape[1] if hasattr(value, "ndim") and value.ndim == 3 else 1
        if nheads % groups:
            raise ValueError(f"{name}: expected a number of groups dividing nheads ({nheads}), got {groups}")
    dim = nheads * headdim
    flat = lambda v, shape: None if v is None else v.reshape(shape)  # noqa: E731
    out, new_state = selective_state_update(
        state.reshape(batch, dim, dstate), flat(x, (batch, dim)), flat(dt, (batch, dim)), flat(A, (dim, dstate)),
        B, C, flat(D, (dim,)), flat(z, (batch, dim)), flat(dt_bias, (dim,)), dt_softplus)
    return out.reshape(heads), new_state.reshape(state.shape)


@functools.partial(jax.jit, static_argnums=(9,))
def _state_update_jit(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    B = B if B.ndim == 3 else B[:, None]
    C = C if C.ndim == 3 else C[:, None]
    B, C = _to_common_grouping(B, C, axis=1)
    batch, dim, _ = state.shape
    groups = B.shape[1]
    dt = discretization_dt(dt, dt_bias, dt_softplus)
    x32 = x.astype(_F32)
    grouped = lambda v: v.reshape(batch, groups, dim // groups)  # noqa: E731
    h, y = _recurrence_step(_to_grouped(state.astype(_F32), groups), grouped(dt), grouped(dt * x32),
                            B.astype(_F32), C.astype(_F32), _to_grouped(A.astype(_F32)[None], groups)[0])
    y = y.reshape(batch, dim)
    if D is not None:
        y = y + D.astype(_F32) * x32
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(x.dtype), _from_grouped(h).astype(state.dtype)
