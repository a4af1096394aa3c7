"""Falcon Mamba as thin NNX modules over the pure functions in scan.py and conv.py.

Activations are channels-last (batch, seq, features). The recurrent state of one layer is its conv state
(batch, conv_kernel-1, d_inner) and its fp32 SSM state (batch, d_inner, d_state).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from configs.schema import FalconMambaConfig
from runtime.checks import check_positive_int
from runtime.interface import CausalLM, DecodeState, call_layer, init_rngs, spec_of
from runtime.layers import Dense, Embed, RMSNorm, StackedDense, dtype_of, matmul_precision, rms_normalize
from ssm.conv import causal_conv1d
from ssm.scan import discretization_dt, selective_scan


class LayerState(NamedTuple):
    conv: jax.Array   # (batch, conv_kernel - 1, d_inner), compute dtype
    ssm: jax.Array    # (batch, d_inner, d_state), fp32


def conv_state_at(previous: jax.Array, xs: jax.Array, n_valid: jax.Array) -> jax.Array:
    """The kernel-1 conv inputs ending at each row's last real token: rows of concat(previous, xs) ending at
    kernel-1 + n_valid. previous (batch, kernel-1, d), xs (batch, seq, d), n_valid (batch,)."""
    width = previous.shape[1]
    full = jnp.concatenate([previous.astype(xs.dtype), xs], axis=1)
    return jax.vmap(lambda row, end: jax.lax.dynamic_slice_in_dim(row, end, width, axis=0))(full, n_valid)


def _inverse_softplus(x):
    return x + jnp.log(-jnp.expm1(-x))


class MambaMixer(nnx.Module):
    def __init__(self, config: FalconMambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        d_model, d_inner, n, rank = (config.hidden_size, config.intermediate_size, config.state_size,
                                     config.time_step_rank)
        dense = lambda i, o, bias, **kw: Dense(i, o, use_bias=bias, dtype=dtype, param_dtype=pdtype,  # noqa: E731
                                              rngs=rngs, **kw)
        # x and z in one kernel (d_model, 2, d_inner): a d_inner shard holds both halves of its channels.
        self.in_proj = StackedDense(d_model, 2, d_inner, use_bias=config.use_bias, dtype=dtype, param_dtype=pdtype,
                                    rngs=rngs)
        conv_bound = config.conv_kernel ** -0.5  # torch Conv1d default init, fan_in = kernel (depthwise)
        self.conv_kernel = nnx.Param(jax.random.uniform(rngs.params(), (config.conv_kernel, d_inner), pdtype,
                                                        -conv_bound, conv_bound))
        self.conv_bias = nnx.Param(jnp.zeros((d_inner,), pdtype)) if config.use_conv_bias else None
        self.x_proj = dense(d_inner, rank + 2 * n, False)
        dt_std = rank ** -0.5 * config.time_step_scale
        self.dt_proj = dense(rank, d_inner, True, init_scale=dt_std)
        if config.time_step_init_scheme == "constant":
            self.dt_proj.kernel.set_value(jnp.full((rank, d_inner), dt_std, pdtype))
        # dt_proj bias: softplus^-1 of dt drawn log-uniformly in [time_step_min, time_step_max] (mamba_ssm).
        log_dt = jax.random.uniform(rngs.params(), (d_inner,), jnp.float32, math.log(config.time_step_min),
                                    math.log(config.time_step_max))
        dt = jnp.maximum(jnp.exp(log_dt), config.time_step_floor)
        self.dt_proj.bias.set_value(_inverse_softplus(dt).astype(pdtype))
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d_inner, n)))
                               .astype(pdtype))
        self.D = nnx.Param(jnp.ones((d_inner,), pdtype))
        self.out_proj = dense(d_inner, d_model, config.use_bias)
        if config.rescale_prenorm_residual:
            self.out_proj.kernel.set_value(self.out_proj.kernel[...] / math.sqrt(config.num_hidden_layers))
        self.dtype = dtype

    def __call__(self, x: jax.Array, state: LayerState | None = None,
                 n_valid: jax.Array | None = None) -> tuple[jax.Array, LayerState]:
        """x (batch, seq, d_model) -> (out, new state). ``n_valid`` (batch,): only each row's first n_valid
        tokens are real; the rest (right padding) leave the conv and SSM states exactly as they were."""
        valid = _valid_mask(x.shape[1], n_valid)
        xc, z, conv_state = self._conv_branch(x, state, n_valid, valid)
        dt, B, C = self._selection(xc)
        delta_bias, delta_softplus = self.dt_proj.bias[...], True
        if valid is not None:  # delta = 0 at padding: exp(0 * A) = 1 and 0 * B * u = 0 keep the state exact
            dt = jnp.where(valid[..., None], discretization_dt(dt, delta_bias, True), 0.0)
            delta_bias, delta_softplus = None, False
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, ssm_state = selective_scan(
            xc, dt, A, B[:, :, None, :], C[:, :, None, :], self.D[...], z, delta_bias,
            delta_softplus=delta_softplus, initial_state=None if state is None else state.ssm,
            impl=self.config.scan_impl, chunk_size=self.config.scan_chunk_size)
        return self.out_proj(y), LayerState(conv_state, ssm_state)

    def _conv_branch(self, x, state, n_valid, valid):
        """in_proj -> causal conv (carrying the conv state) -> silu: (xc, z, new conv state). ``valid`` is
        _valid_mask(seq, n_valid)."""
        xz = self.in_proj(x)
        xs, z = xz[..., 0, :], xz[..., 1, :]
        if valid is not None:
            xs = jnp.where(valid[..., None], xs, 0)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        previous = None if state is None else state.conv
        xc, conv_state = causal_conv1d(xs, self.conv_kernel[...], conv_bias, previous, silu=True)
        if valid is not None:  # the conv state is the last kernel-1 inputs up to each row's last real token
            conv_state = conv_state_at(previous if previous is not None else jnp.zeros_like(conv_state), xs, n_valid)
        return xc.astype(self.dtype), z, conv_state

    def _selection(self, xc):
        """x_proj -> (dt, B, C), the Falcon Mamba RMS norms, dt_proj without its bias: (dt, B, C)."""
        cfg = self.config
        n, rank = cfg.state_size, cfg.time_step_rank
        dt, B, C = jnp.split(self.x_proj(xc), [rank, rank + n], axis=-1)
        if cfg.use_mixer_norms:  # the Falcon Mamba difference: weightless RMS norms on dt, B and C
            dt, B, C = (rms_normalize(v, cfg.mixer_rms_eps) for v in (dt, B, C))
        # dt_proj without its bias; the bias is added in fp32 before the softplus, as mamba_ssm does.
        dt = jnp.dot(dt, self.dt_proj.kernel[...].astype(self.dtype), precision=matmul_precision(self.dtype),
                     preferred_element_type=jnp.float32).astype(self.dtype)
        return dt, B, C

    def step_sizes(self, x: jax.Array) -> jax.Array:
        """The scan's step size softplus(dt_proj(x) + bias) along a sequence from zero states: fp32
        (batch, seq, d_inner). For analysis (experiments.induction_heads.mixer_dt)."""
        xc, _, _ = self._conv_branch(x, None, None, None)
        dt, _, _ = self._selection(xc)
        return discretization_dt(dt, self.dt_proj.bias[...], True)

    def empty_state(self, batch_size: int) -> LayerState:
        cfg = self.config
        return LayerState(jnp.zeros((batch_size, cfg.conv_kernel - 1, cfg.intermediate_size), self.dtype),
                          jnp.zeros((batch_size, cfg.intermediate_size, cfg.state_size), jnp.float32))


def _valid_mask(length: int, n_valid):
    """(batch, length) True at each row's first n_valid positions; None when every position is real."""
    return None if n_valid is None else jnp.arange(length)[None, :] < n_valid[:, None]


class MambaBlock(nnx.Module):
    """x -> RMSNorm -> mixer -> + residual (the residual kept in fp32 with residual_in_fp32)."""

    def __init__(self, config: FalconMambaConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=pdtype)
        self.mixer = MambaMixer(config, rngs=rngs)
        self.residual_in_fp32 = config.residual_in_fp32

    def __call__(self, x, state=None, n_valid=None):
        residual = x.astype(jnp.float32) if self.residual_in_fp32 else x
        y, state = self.mixer(self.norm(x), state, n_valid)
        return (residual + y).astype(residual.dtype), state


class FalconMambaLM(CausalLM):
    """embeddings -> blocks -> norm_f -> lm_head (tied to the embeddings or not)."""

    def __init__(self, config: FalconMambaConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = init_rngs(config, FalconMambaConfig, rngs, seed)
        self.config = config
        dtype, pdtype = dtype_of(config.compute_dtype), dtype_of(config.param_dtype)
        self.embeddings = Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=pdtype, rngs=rngs,
                                std=0.02)
        self.layers = nnx.List([MambaBlock(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=pdtype)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def run(self, input_ids, state: DecodeState | None, n_valid=None, remat=None):
        """Final-norm hidden states (batch, seq, hidden) and the new state. state None: a plain forward from
        zero states. ``n_valid`` (batch,): only each row's first n_valid tokens are real (right padding).
        ``remat``: a jax.checkpoint policy for each layer (runtime.interface.call_layer)."""
        h = self.embeddings(input_ids)
        new_layers = []
        for i, layer in enumerate(self.layers):
            h, layer_state = call_layer(layer, remat, h, None if state is None else state.layers[i], n_valid)
            new_layers.append(layer_state)
        if state is None:
            return self.norm_f(h), None
        added = jnp.full_like(state.lengths, input_ids.shape[1]) if n_valid is None else n_valid
        return self.norm_f(h), DecodeState(new_layers, state.lengths + added)

    @property
    def input_embedding(self) -> Embed:
        return self.embeddings

    def empty_state(self, batch_size: int, max_len: int | None = None) -> DecodeState:
        """Zero conv and SSM states for every layer; their size does not depend on ``max_len`` (unused)."""
        check_positive_int("batch_size", batch_size)
        return DecodeState([layer.mixer.empty_state(batch_size) for layer in self.layers],
                           jnp.zeros((batch_size,), jnp.int32))

    def state_specs(self, mesh) -> DecodeState:
        """d_inner (and d_state) split like each layer's A_log (d_inner, d_state); the rows (the first dimension)
        are CausalLM.state_shardings'."""
        layers = []
        for layer in self.layers:
            a_log = layer.mixer.A_log.get_value()
            d_inner, d_state = spec_of(a_log, 0), spec_of(a_log, 1)
            layers.append(LayerState(PartitionSpec(None, None, d_inner), PartitionSpec(None, d_inner, d_state)))
        return DecodeState(layers, PartitionSpec())

    def state_capacity(self, state: DecodeState) -> int | None:
        return None  # constant-size state: any length fits
