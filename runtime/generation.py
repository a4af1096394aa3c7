"""Sampling and the decode loop, written once for both families (anything with the CausalLM interface).

    result = generate(model, prompt_ids, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)
    result.tokens        # (batch, max_new_tokens) int32, -1 after a row's stop token
    result = decode(model, logits, state, max_new_tokens=32)   # from a prefill's (logits, DecodeState)
    for tokens in stream(model, prompt_ids, ...): ...   # one (batch,) array per step, as it is produced

The prompt is prefilled chunk by chunk (model.prefill); the decode loop is one jit-compiled lax.while_loop
that stops when every row has produced a stop token or max_new_tokens. Streaming runs the same jitted sampling
and model step from Python, one token at a time. Each row samples with its own key (sample_logits): its tokens
depend on its prompt, its index and the seed, not on the other rows of the batch.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from runtime.checks import check_float, check_positive_int, check_rank, check_seed, is_integer
from runtime.interface import (_state_layout, check_token_ids, parameter_mesh, run_one_token,
                               traced_on_parameter_mesh)

NO_TOKEN = -1


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k None or 0 and top_p None or 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and not (is_integer(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k: expected None or an integer >= 0, got {self.top_k!r}")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The fp32 logits (batch, vocab) that sample_logits draws from, for a temperature > 0: shifted to max 0,
    divided by the temperature, then top-k, then top-p (transformers' order: TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper); a filtered-out token's logit is -inf.

    top-k keeps every token tied with the k-th largest logit, as TopKLogitsWarper does. top-p keeps what
    TopPLogitsWarper keeps: in ascending order of logit, a token is dropped where the cumulative probability up to it
    is <= 1 - top_p (both float32), and the largest is always kept. The sums are carried in about 48 bits, as torch's
    CPU cumsum carries float64 (k tied tokens of probability 1/k put a sum on 1 - top_p exactly); the probabilities
    themselves can differ from torch's softmax in the last bit, so a sum within a float32 ulp of 1 - top_p may
    still fall on the other side. Tokens tied at the cut-off go in order of vocabulary id (a stable sort): the lower
    ids are dropped first. torch.sort orders ties so with stable=True and, by default, in rows of up to 16 tokens;
    in a longer row its default order of ties is arbitrary, and transformers keeps as many tied tokens as this does
    but may keep other ones.
    """
    top_p = sampling.top_p is not None and sampling.top_p < 1
    # 1 - top_p rounded to float32, as transformers compares; traced, not static: one compilation serves every
    # temperature and top_p
    return _filter(logits, np.float32(sampling.temperature), np.float32(1 - sampling.top_p) if top_p else None,
                   top_k=sampling.top_k)


@partial(jax.jit, static_argnames=("top_k",))
def _filter(logits, temperature, drop_below, top_k):
    logits = logits.astype(jnp.float32)  # shifted to max 0 first: a tiny temperature cannot overflow the top to inf
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k:
        kth = lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if drop_below is not None:
        batch = logits.shape[0]
        index = lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        ascending, order = lax.sort((logits, index), dimension=1, num_keys=1, is_stable=True)
        cumulative = _cumsum_like_torch(jax.nn.softmax(ascending, axis=-1))
        drop = (cumulative <= drop_below).at[:, -1].set(False)
        drop = jnp.zeros_like(drop).at[jnp.arange(batch)[:, None], order].set(drop, unique_indices=True)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum; XLA keeps float arithmetic as
    written)."""
    s = a + b
    b_part = s - a
    return s, (a - (s - b_part)) + (b - b_part)


def _add_pairs(x, y):
    """The sum of two double-float numbers (hi, lo), normalised."""
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


def _cumsum_like_torch(x: jax.Array) -> jax.Array:
    """The cumulative sum of float32 x along its last axis, each sum carried in about 48 bits (hi + lo pairs) and
    rounded to float32: torch's CPU cumsum of float32 accumulates in float64, and a plain float32 cumsum misses its
    rounding where it matters, at sums that land exactly on 1 - top_p (k tied tokens of probability 1/k each).
    A Hillis-Steele scan, log2(vocab) steps of a shifted add in a fori_loop: quick to compile (a 65024-token
    associative_scan took seconds on CPU) and no vocab-long sequential loop on an accelerator."""
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

    def add_shifted(level, pair):
        shift = jnp.left_shift(1, level)
        before = tuple(jnp.where(index >= shift, jnp.roll(part, shift, axis=-1), 0) for part in pair)
        return _add_pairs(before, pair)

    hi, lo = lax.fori_loop(0, max(1, (x.shape[-1] - 1).bit_length()), add_shifted, (x, jnp.zeros_like(x)))
    return hi + lo


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens (batch,) int32 from fp32 logits (batch, vocab), filtered by filter_logits. Row i draws with
    fold_in(key, i): a row's token depends on its logits, the key and its index, not on the other rows of the
    batch."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, sampling)
    row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(row_keys, logits).astype(jnp.int32)


def _sample(logits, key, done, stop_tokens, sampling):
    """A token per row from the logits: (tokens, emitted: NO_TOKEN for rows already done, key, done)."""
    key, sub = jax.random.split(key)
    tokens = sample_logits(logits, sub, sampling)
    emitted = jnp.where(done, NO_TOKEN, tokens)
    return tokens, emitted, key, done | jnp.isin(tokens, stop_tokens)


# A token is fed to the model only when another is to be sampled after it: max_new_tokens tokens cost
# max_new_tokens - 1 model steps and KV-cache positions, and stream yields each token as soon as it is sampled.
_jit_sample = jax.jit(_sample, static_argnames=("sampling",))
# Both donate the state (generation's own, from init_state and the prefill): XLA updates the KV cache in place, not
# a copy of it per token, and it exists once. Both are traced under the parameters' mesh (traced_on_parameter_mesh),
# as prefill and step are.
_jit_feed = traced_on_parameter_mesh(nnx.jit(run_one_token, donate_argnames=("state",)))


@traced_on_parameter_mesh
@nnx.jit(static_argnames=("sampling", "max_new_tokens"), donate_argnames=("state",))
def _decode_loop(model, logits, state, key, stop_tokens, sampling, max_new_tokens):
    batch = logits.shape[0]
    tokens, emitted, key, done = _sample(logits, key, jnp.zeros((batch,), bool), stop_tokens, sampling)
    out = jnp.full((batch, max_new_tokens), NO_TOKEN, jnp.int32).at[:, 0].set(emitted)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, tokens, state, key, done = carry
        logits, state = run_one_token(model, tokens, state)
        tokens, emitted, key, done = _sample(logits, key, done, stop_tokens, sampling)
        return i + 1, out.at[:, i].set(emitted), tokens, state, key, done

    steps, out, _, state, *_ = lax.while_loop(cond, body, (jnp.int32(1), out, tokens, state, key, done))
    return out, steps, state  # the state returned so that its donated buffers carry the loop's


@dataclass
class Generated:
    tokens: np.ndarray          # (batch, max_new_tokens) int32; NO_TOKEN (-1) after a row's stop token
    steps: int                  # tokens sampled per row, NO_TOKENs included (<= max_new_tokens); the model ran
                                # steps - 1 decode steps (the last token is not fed)

    def row(self, i: int) -> list[int]:
        """Row i's generated tokens, up to and including its stop token."""
        row = self.tokens[i]
        return row[row != NO_TOKEN].tolist()


def check_sampling(max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=0) -> Sampling:
    """The decode arguments that need no model checked (experiments.generate checks them before loading one):
    their Sampling. max_new_tokens must be positive, as in transformers."""
    check_positive_int("max_new_tokens", max_new_tokens)
    if max_new_tokens >= 2**31:  # the loop counts steps in int32
        raise ValueError(f"max_new_tokens: expected fewer than 2**31, got {max_new_tokens}")
    check_seed("seed", seed)
    return Sampling(temperature, top_k, top_p)


def _checked(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed) -> tuple[Sampling, jax.Array]:
    """The decode arguments checked once, before any prefill: (Sampling, stop-token array)."""
    sampling = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    return sampling, _stop_array(stop_tokens, model.config.vocab_size)


def _start(model, input_ids, max_new_tokens, attention_mask, lengths, chunk_size, tokens_on_device):
    # checked before init_state sizes the state from its shape: a ragged list named (not NumPy's message), no rows
    # named as input_ids (not init_state's batch_size)
    input_ids = check_token_ids(input_ids, model.config.vocab_size)
    batch, prompt = input_ids.shape
    positions = lambda n: prompt + n - 1  # noqa: E731  the last token sampled is not fed
    _check_memory(model, batch, max_new_tokens, positions, tokens_on_device=tokens_on_device)
    state = model.init_state(batch, max_len=positions(max_new_tokens))
    # the prefill, the loop and stream's steps update this one state in place (donated)
    logits, state = model._prefill(input_ids, state, chunk_size, attention_mask, lengths, copy_state=False)
    return _finite(logits), state


def device_memory() -> tuple[int, str] | None:
    """(bytes, where the figure comes from) that new arrays can take on the device they land on (JAX's default,
    where init_state allocates): bytes_limit less bytes_in_use of its memory_stats() where the backend reports
    them (GPU, TPU); on CPU, the host's physical memory; None where neither is known."""
    device = jax.config.jax_default_device
    device = jax.devices(device)[0] if device is None or isinstance(device, str) else device
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):  # a backend without memory statistics
        stats = None
    if stats and "bytes_limit" in stats:
        limit, used = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
        return limit - used, f"{device}: memory_stats() bytes_limit {limit} less bytes_in_use {used}"
    if device.platform == "cpu":
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return physical, "the host's physical memory"
    return None


def _state_bytes(model, batch: int, positions: int) -> int:
    """The bytes of init_state(batch, positions) on one device: all of them, or on a mesh the largest shard's."""
    leaves = jax.tree.leaves(_state_layout(model, batch, positions))  # shapes only: nothing is allocated
    mesh = parameter_mesh(model)
    shardings = model.state_shardings(mesh, batch) if mesh is not None else [None] * len(leaves)
    return sum(math.prod(sharding.shard_shape(leaf.shape) if sharding else leaf.shape) * leaf.dtype.itemsize
               for leaf, sharding in zip(leaves, shardings, strict=True))


def _check_memory(model, batch, max_new_tokens, positions, tokens_on_device) -> None:
    """ValueError naming max_new_tokens where what decoding allocates for it cannot fit in device_memory(): a
    decode state of ``positions(max_new_tokens)`` positions (one: it is updated in place; on a mesh, a device's
    shard of it) and, where ``tokens_on_device`` (the jitted loop, not stream), the (batch, max_new_tokens) int32
    tokens. A lower bound (XLA's temporaries come on top): what it refuses would end in an out-of-memory error that
    names nothing. A KV cache grows with the positions; Falcon Mamba's state does not, so only the tokens limit its
    generations."""
    small = _state_bytes(model, batch, positions(1))
    per_position = _state_bytes(model, batch, positions(2)) - small  # 0 for a constant-size state
    state = small + per_position * (max_new_tokens - 1)
    tokens = 4 * batch * max_new_tokens if tokens_on_device else 0
    needed = state + tokens
    memory = device_memory()
    if memory is None or needed <= memory[0]:
        return
    available, source = memory
    per_token = per_position + (4 * batch if tokens_on_device else 0)
    most = (available - (small - per_position)) // per_token if per_token else 0
    kind = f"the KV cache of {positions(max_new_tokens)} positions" if per_position else "the decode state"
    tokens = f"; the generated int32 tokens take {_size(tokens)}" if tokens_on_device else ""
    where = " on each device of the mesh" if parameter_mesh(model) is not None else ""
    raise ValueError(f"max_new_tokens: expected at most {max(most, 0)} (what fits in the {_size(available)} "
                     f"available: {source}), got {max_new_tokens}, which needs at least {_size(needed)}: {kind} "
                     f"for a batch of {batch} is {_size(state)}{where}{tokens}")


def _size(n: int) -> str:
    return f"{n} bytes" + (f" ({n / 2**30:.1f} GiB)" if n >= 2**30 else "")


def _finite(logits: jax.Array) -> jax.Array:
    """The logits decoding starts from, refused when not finite (greedy decoding of NaN picked token 0)."""
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise ValueError("logits: expected finite values, got NaN or Inf (a prefill that overflowed?)")
    return logits


def _stop_array(stop_tokens: Sequence[int], vocab_size: int) -> jax.Array:
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise ValueError(f"stop_tokens: expected a sequence of token ids, got {stop_tokens!r}")
    stop_tokens = list(np.asarray(stop_tokens).ravel()) if hasattr(stop_tokens, "shape") else list(stop_tokens)
    for token in stop_tokens:
        if not is_integer(token) or not 0 <= token < vocab_size:
            raise ValueError(f"stop_tokens: expected integer ids in [0, {vocab_size}), got {token!r}")
    return jnp.asarray(stop_tokens or [NO_TOKEN], jnp.int32)


def _run_loop(model, logits, state, seed, stops, sampling, max_new_tokens) -> Generated:
    out, steps, _ = _decode_loop(model, logits, state, jax.random.PRNGKey(seed), stops, sampling, max_new_tokens)
    return Generated(np.asarray(out), int(steps))


def decode(model, logits, state, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = ()) -> Generated:
    """Decodes up to max_new_tokens in one jit-compiled loop from a prefilled (logits, state): prefill's
    last-position logits (batch, vocab) and its DecodeState (a KV cache needs room for max_new_tokens - 1 more:
    the last token is not fed)."""
    sampling, stops = _checked(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed)
    check_rank("logits", logits, (2,), "(batch, vocab_size): prefill's last-position logits")
    check_float("logits", logits)
    if logits.shape[1] != model.config.vocab_size:
        raise ValueError(f"logits: expected shape (batch, {model.config.vocab_size}) (vocab_size), got "
                         f"{tuple(logits.shape)}")
    logits = model._rows_split(_finite(jnp.asarray(logits, jnp.float32)))  # the loop carries fp32 logits
    model._check_state(state, logits.shape[0])
    # the loop's writes past the cache would clamp; the last token sampled is never fed
    model._check_fits(state, max_new_tokens - 1, name="max_new_tokens",
                      note=f" (the last of {max_new_tokens} new tokens is not fed to the model)")
    capacity = model.state_capacity(state)  # the state exists: the loop adds its copy and the tokens
    _check_memory(model, logits.shape[0], max_new_tokens, lambda n: capacity, tokens_on_device=True)
    # the caller's state stays valid: the loop updates a copy in place
    state = jax.tree.map(jnp.copy, model._on_model_devices(state))
    return _run_loop(model, logits, state, seed, stops, sampling, max_new_tokens)


def generate(model, input_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (), attention_mask=None,
             lengths=None, chunk_size: int | None = None) -> Generated:
    """Prefills the prompts, then decodes up to max_new_tokens in one jit-compiled loop (as decode does)."""
    sampling, stops = _checked(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed)
    logits, state = _start(model, input_ids, max_new_tokens, attention_mask, lengths, chunk_size, True)
    return _run_loop(model, logits, state, seed, stops, sampling, max_new_tokens)


def stream(model, input_ids, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (), attention_mask=None,
           lengths=None, chunk_size: int | None = None) -> Iterator[np.ndarray]:
    """Like generate, but yields each step's tokens (batch,) as soon as they exist (NO_TOKEN for finished
    rows). Same seed, same tokens as generate. The arguments are checked and the prompts prefilled when it is
    called (a bad argument raises here, not at the first next())."""
    sampling, stops = _checked(model, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed)
    logits, state = _start(model, input_ids, max_new_tokens, attention_mask, lengths, chunk_size, False)
    return _steps(model, logits, state, seed, stops, sampling, max_new_tokens)


def _steps(model, logits, state, seed, stops, sampling, max_new_tokens) -> Iterator[np.ndarray]:
    key, done = jax.random.PRNGKey(seed), jnp.zeros((logits.shape[0],), bool)
    for i in range(max_new_tokens):
        if i:
            logits, state = _jit_feed(model, tokens, state)  # the previous iteration's tokens
        tokens, emitted, key, done = _jit_sample(logits, key, done, stops, sampling=sampling)
        yield np.asarray(emitted)
        if bool(jnp.all(done)):
            return
