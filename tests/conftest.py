"""Shared fixtures. transformers is imported before anything that could stub mamba_ssm (REFERENCE.md)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One XLA compilation cache for the whole run, shared by the xdist workers and every process a test starts (they
# inherit the environment): many tests compile the same programs (a tiny model's prefill, step and train step in
# each CLI run) and a hit reads the executable instead of compiling it again. A fresh directory per run, removed at
# the end, so nothing carries over between runs; a JAX_COMPILATION_CACHE_DIR set by the caller is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jax_compilation_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
