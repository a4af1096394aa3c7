"""Wall-clock timing helpers shared by the demo and the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp

from runtime.checks import check_positive_int, is_integer


def time_call(fn: Callable, *args, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn(*args) after warmup calls (compilation), blocking on JAX results."""
    check_positive_int("repeats", repeats)  # no time to take the median of (an IndexError)
    if not (is_integer(warmup) and warmup >= 0):
        raise ValueError(f"warmup: expected an integer >= 0, got {warmup!r}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def format_row(row: dict) -> str:
    """One benchmark row as ``key=value`` pairs on a line, floats to 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def random_array(shape, dtype, seed: int = 0) -> jax.Array:
    """Standard-normal data to time on: constant data (zeros, ones) can run faster than real data does."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def versions() -> dict[str, str]:
    import platform

    import flax

    info = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info
