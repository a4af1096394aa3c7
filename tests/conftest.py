"""Shared fixtures. transformers is imported before anything that could stub mamba_ssm (REFERENCE.md)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
