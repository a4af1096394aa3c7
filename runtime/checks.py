"""Argument checks shared by the pure functions (scan, conv) and the model interface: errors that name the
argument, what was expected and what was received."""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np


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


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_bool(name: str, value: Any) -> None:
    """TypeError naming ``name`` unless value is True or False (a string "no" would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_seed(name: str, value: Any) -> None:
    """ValueError naming ``name`` unless value is an integer (Python, NumPy or a 0-d integer array) that a 32-bit
    jax.random key holds, in [-2**31, 2**32) (-1 is the key of 2**32 - 1; 2**70 an OverflowError inside JAX, 1.5
    a tracer error)."""
    if getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.integer):
        value = int(value)
    if not (is_integer(value) and -2**31 <= value < 2**32):
        raise ValueError(f"{name}: expected an integer in [-2**31, 2**32), got {value!r}")


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """ValueError naming ``name`` unless value is a positive Python or NumPy integer (or None, where allowed)."""
    if (value is None and allow_none) or (is_integer(value) and value > 0):
        return
    raise ValueError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {value!r}")
