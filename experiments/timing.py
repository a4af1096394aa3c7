"""Wall-clock timing helpers shared by the demo and the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable

import jax


def time_call(fn: Callable, *args, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn(*args) after warmup calls (compilation), blocking on JAX results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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
