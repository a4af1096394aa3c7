"""The model interface both families implement, and the input checks every entry point shares.

A family's LM subclasses CausalLM and provides ``forward(input_ids) -> fp32 logits`` (traceable, no
checks). CausalLM adds the checked, jit-compiled ``__call__``.
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


@nnx.jit
def _jit_forward(model, input_ids):
    return model.forward(input_ids)


class CausalLM(nnx.Module):
    """Base of both families' LMs. Subclasses set ``self.config`` and define ``forward``."""

    def forward(self, input_ids: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, input_ids) -> jax.Array:
        """int (batch, seq) -> float32 logits (batch, seq, vocab); checked and jit-compiled."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        return _jit_forward(self, input_ids)
