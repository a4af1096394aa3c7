"""Building and loading either model family from its config (everything in experiments/ goes through here)."""

from __future__ import annotations

import os
from pathlib import Path

import ssm
import transformer
from configs.hf import model_config_from_hf
from configs.schema import FalconConfig, FalconMambaConfig


def build_model(config, seed: int = 0):
    """A randomly initialised model of the config's family."""
    if isinstance(config, FalconMambaConfig):
        return ssm.FalconMambaLM(config, seed=seed)
    if isinstance(config, FalconConfig):
        return transformer.FalconLM(config, seed=seed)
    raise TypeError(f"config: expected FalconMambaConfig or FalconConfig, got {type(config).__name__}")


def load_pretrained(path: str | os.PathLike, **overrides):
    """A local Hugging Face directory of either family (the family is read from its config.json)."""
    config = model_config_from_hf(Path(path))
    package = ssm if isinstance(config, FalconMambaConfig) else transformer
    return package.from_pretrained(path, **overrides)
