"""Argument checks shared by the pure functions (scan, conv) and the model interface: errors that name the
argument, what was expected and what was received."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def shape_of(x: Any):
    """x's shape as a tuple for an error message, or its type's name where it has none."""
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def check_rank(name: str, x: Any, ranks: tuple[int, ...], layout: str) -> None:
    """ValueError naming ``name`` unless x is an array of one of ``ranks`` dimensions (``layout`` says which)."""
    if not hasattr(x, "shape") or x.ndim not in ranks:
        raise ValueError(f"{name}: expected shape {layout}, got {shape_of(x)}")


def check_float(name: str, x: Any) -> None:
    """TypeError naming ``name`` unless x (an array, a Python number or None) is floating-point."""
    if x is None:
        return
    dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {dtype}")
