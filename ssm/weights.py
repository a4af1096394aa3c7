"""Falcon Mamba / Mamba weights: HF names, from_pretrained and save_pretrained.

Accepted on load: transformers' names (backbone.embeddings.weight, ...) and mamba_ssm's
(backbone.embedding.weight). Written on export: transformers' names, which FalconMambaForCausalLM
(model_type falcon_mamba) or MambaForCausalLM (model_type mamba) load.
"""

from __future__ import annotations

import os

from configs.schema import FalconMambaConfig
from runtime.hf_weights import WeightSpec, load_directory, write_directory
from ssm.model import FalconMambaLM
from ssm.sharding import param_axes


def weight_specs(config: FalconMambaConfig) -> list[WeightSpec]:
    specs = [WeightSpec("backbone.embeddings.weight", ("embeddings", "embedding"),
                        aliases=("backbone.embedding.weight",))]
    for i in range(config.num_hidden_layers):
        hf = f"backbone.layers.{i}."
        ours = ("layers", i)
        mixer = ours + ("mixer",)
        specs += [
            WeightSpec(hf + "norm.weight", ours + ("norm", "weight")),
            WeightSpec(hf + "mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "stacked_linear"),
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
            specs += [WeightSpec(hf + "mixer.in_proj.bias", mixer + ("in_proj", "bias"), "stacked"),
                      WeightSpec(hf + "mixer.out_proj.bias", mixer + ("out_proj", "bias"))]
    specs.append(WeightSpec("backbone.norm_f.weight", ("norm_f", "weight")))
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs


def from_pretrained(path: str | os.PathLike, *, mesh=None, rules=None, shardings=None,
                    **overrides) -> FalconMambaLM:
    """Loads a local HF directory (config.json + model.safetensors or a sharded index).

    ``overrides`` change our own config fields (compute_dtype="bfloat16", scan_impl="chunked", ...).
    Placement: ``shardings`` {param path: Sharding} (or a callable of the path), or ``mesh`` (jax.sharding.Mesh with
    axes among data/fsdp/tensor; one it lacks splits nothing) with ``rules`` (logical axis -> mesh axes over
    configs.schema.DEFAULT_SHARDING_RULES; their 'batch' also splits the rows of the batches the model is given);
    by default the default device. Each process reads only the slices its own devices hold
    (runtime.hf_weights.load_directory).
    """
    return load_directory(path, FalconMambaConfig, FalconMambaLM, weight_specs, param_axes, mesh=mesh, rules=rules,
                          shardings=shardings, overrides=overrides)


def save_pretrained(model: FalconMambaLM, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors that transformers (and from_pretrained) load."""
    write_directory(model, path, FalconMambaLM, weight_specs, max_shard_bytes)
