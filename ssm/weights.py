"""Falcon Mamba / Mamba weights: HF names, from_pretrained and save_pretrained.

Accepted on load: transformers' names (backbone.embeddings.weight, ...) and mamba_ssm's
(backbone.embedding.weight). Written on export: transformers' names, which FalconMambaForCausalLM
(model_type falcon_mamba) or MambaForCausalLM (model_type mamba) load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from configs import loader
from configs.hf import model_config_from_hf, model_config_to_hf
from configs.schema import FalconMambaConfig
from runtime.hf_weights import WeightSpec, export_weights, load_weights
from runtime.safetensors_io import open_checkpoint, write_checkpoint
from ssm.model import FalconMambaLM


def weight_specs(config: FalconMambaConfig) -> list[WeightSpec]:
    specs = [WeightSpec("backbone.embeddings.weight", ("embeddings", "embedding"),
                        aliases=("backbone.embedding.weight",))]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        ours = ("layers", i)
        mixer = ours + ("mixer",)
        specs += [
            WeightSpec(hf + "norm.weight", ours + ("norm", "weight")),
            WeightSpec(hf + "mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear"),
            WeightSpec(hf + "mixer.conv1d.weight", mixer + ("conv_kernel",), "conv"),
            WeightSpec(hf + "mixer.x_proj.weight", mixer + ("x_proj", "kernel"), "linear"),
            WeightSpec(hf + "mixer.dt_proj.weight", mixer + ("dt_proj", "kernel"), "linear"),
            WeightSpec(hf + "mixer.dt_proj.bias", mixer + ("dt_proj", "bias")),
            WeightSpec(hf + "mixer.A_log", mixer + ("A_log",)),
            WeightSpec(hf + "mixer.D", mixer + ("D",)),
            WeightSpec(hf + "mixer.out_proj.weight", mixer + ("out_proj", "kernel"), "linear"),
        ]
        if config.use_conv_bias:
            specs.append(WeightSpec(hf + "mixer.conv1d.bias", mixer + ("conv_bias",)))
        if config.use_bias:
            specs += [WeightSpec(hf + "mixer.in_proj.bias", mixer + ("in_proj", "bias")),
                      WeightSpec(hf + "mixer.out_proj.bias", mixer + ("out_proj", "bias"))]
    specs.append(WeightSpec("backbone.norm_f.weight", ("norm_f", "weight")))
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs


def from_pretrained(path: str | os.PathLike, **overrides) -> FalconMambaLM:
    """Loads a local HF directory (config.json + model.safetensors or a sharded index).

    ``overrides`` change our own config fields (compute_dtype="bfloat16", scan_impl="chunked", ...).
    """
    path = Path(path)
    config = model_config_from_hf(path)
    if overrides:
        config = loader.replace(config, **overrides)
    model = FalconMambaLM(config)
    load_weights(model, open_checkpoint(path), weight_specs(config), source=str(path))
    return model


def save_pretrained(model: FalconMambaLM, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors that transformers (and from_pretrained) load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, export_weights(model, weight_specs(model.config)), max_shard_bytes=max_shard_bytes)
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(model_config_to_hf(model.config), indent=2))
    os.replace(tmp, path / "config.json")
