"""The model interface both families implement, and the input checks every entry point shares.

A family's LM subclasses CausalLM and provides three traceable methods (no checks inside):

    run(input_ids, state) -> (hidden (batch, seq, hidden), new_state)   # state None: a fresh forward
    logits(hidden)        -> fp32 logits (..., vocab)
    init_state(batch_size, max_len=None) -> state pytree

CausalLM builds the public, checked and jit-compiled API on them: __call__ (full logits), prefill (chunk by
chunk, carrying the state), step (one token) and log_likelihood (chunked, never seqlen x vocab logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids", ndim: int = 2) -> jax.Array:
    """Checks rank, integer dtype and the vocabulary range (jnp indexing would clamp silently)."""
    if isinstance(input_ids, (list, tuple)):
        input_ids = np.asarray(input_ids)
    if not hasattr(input_ids, "shape") or input_ids.ndim != ndim:
        layout = "(batch, seq)" if ndim == 2 else "(batch,)"
        got = tuple(input_ids.shape) if hasattr(input_ids, "shape") else type(input_ids).__name__
        raise ValueError(f"{name}: expected an integer array of shape {layout}, got shape {got}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {input_ids.dtype}")
    if any(s == 0 for s in input_ids.shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(input_ids.shape)}")
    if not isinstance(input_ids, jax.core.Tracer):
        values = np.asarray(input_ids)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token ids must be in [0, {vocab_size}) (vocab_size), got {bad}")
    return jnp.asarray(input_ids, jnp.int32)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0):
        raise ValueError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")


@nnx.jit
def _jit_forward(model, input_ids):
    return model.forward(input_ids)


@nnx.jit
def _jit_chunk_last_logits(model, input_ids, state):
    hidden, state = model.run(input_ids, state)
    return model.logits(hidden[:, -1]), state


@nnx.jit
def _jit_chunk_log_likelihood(model, input_ids, targets, state):
    """log p(targets[:, t] | input_ids[:, :t+1]) for the chunk; targets may be one shorter than the chunk."""
    hidden, state = model.run(input_ids, state)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :targets.shape[1]]), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], state


class CausalLM(nnx.Module):
    """Base of both families' LMs. Subclasses set ``self.config`` and define run, logits, init_state."""

    def run(self, input_ids, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, hidden):  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, input_ids: jax.Array) -> jax.Array:
        """Unchecked, traceable full-sequence logits (for use inside jit, e.g. a training loss)."""
        hidden, _ = self.run(input_ids, None)
        return self.logits(hidden)

    def __call__(self, input_ids) -> jax.Array:
        """int (batch, seq) -> float32 logits (batch, seq, vocab); checked and jit-compiled."""
        return _jit_forward(self, check_token_ids(input_ids, self.config.vocab_size))

    def _chunks(self, length: int, chunk_size):
        check_chunk_size(chunk_size)
        size = length if chunk_size is None else int(chunk_size)
        return [(start, min(start + size, length)) for start in range(0, length, size)]

    def prefill(self, input_ids, state, chunk_size=None):
        """Feeds the prompt chunk by chunk, carrying ``state``; returns (last-position logits (batch, vocab),
        state). Any chunk size gives the logits and state of one full pass."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        logits = None
        for start, end in self._chunks(input_ids.shape[1], chunk_size):
            logits, state = _jit_chunk_last_logits(self, input_ids[:, start:end], state)
        return logits, state

    def step(self, token_ids, state):
        """One decode step: token_ids (batch,) -> (logits (batch, vocab), state)."""
        token_ids = check_token_ids(token_ids, self.config.vocab_size, name="token_ids", ndim=1)
        return _jit_chunk_last_logits(self, token_ids[:, None], state)

    def log_likelihood(self, input_ids, chunk_size=None):
        """log p(x_{t+1} | x_{<=t}) for t in [0, seq-1): (batch, seq-1) fp32, computed chunk by chunk so that
        no (seq, vocab) logits exist at once."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        batch, length = input_ids.shape
        if length < 2:
            raise ValueError(f"input_ids: expected at least 2 tokens per row for a likelihood, got {length}")
        state = self.init_state(batch, max_len=length)
        pieces = []
        for start, end in self._chunks(length, chunk_size):
            targets = input_ids[:, start + 1:end + 1]
            if targets.shape[1] == 0:
                break
            logp, state = _jit_chunk_log_likelihood(self, input_ids[:, start:end], targets, state)
            pieces.append(logp)
        return jnp.concatenate(pieces, axis=1)
