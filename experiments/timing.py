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
    """The python, jax and flax versions, this process's backend and device kind, and the torch and transformers
    versions where installed (the package versions and device as experiments.bench.provenance gives them)."""
    import platform

    from experiments.bench import jax_device, package_version

    device = jax_device()
    info = {"python": platform.python_version(), "jax": package_version("jax"), "flax": package_version("flax"),
            "backend": device["backend"], "device": str(device["device_kind"])}
    info.update({name: version for name in ("torch", "transformers") if (version := package_version(name))})
    return info
