"""Falcon weights: HF names (transformer.h.N.*), from_pretrained and save_pretrained.

transformers' FalconForCausalLM and TII's original RWForCausalLM checkpoints use the same tensor names; the
fused query_key_value weight keeps its HF row order (see transformer.model.split_qkv). Written on export:
transformers' names and a model_type "falcon" config.json.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from configs.schema import FalconConfig
from runtime.hf_weights import WeightSpec, load_directory, write_directory
from runtime.safetensors_io import CheckpointError
from transformer.model import FalconLM
from transformer.sharding import param_axes

QKV_ROWS = {
    "multi_query": "(num_attention_heads + 2) * head_dim rows: all queries, then one key and one value head",
    "interleaved": "3 * num_attention_heads * head_dim rows: [q_h k_h v_h] for each head",
    "grouped": "(num_attention_heads + 2 * num_kv_heads) * head_dim rows: per kv head its queries, key, value",
}


def weight_specs(config: FalconConfig) -> list[WeightSpec]:
    specs = [WeightSpec("transformer.word_embeddings.weight", ("word_embeddings", "embedding"))]
    linears = [("self_attention.query_key_value", ("self_attention", "query_key_value")),
               ("self_attention.dense", ("self_attention", "dense")),
               ("mlp.dense_h_to_4h", ("mlp", "dense_h_to_4h")),
               ("mlp.dense_4h_to_h", ("mlp", "dense_4h_to_h"))]
    norms = {"parallel": ["input_layernorm"], "parallel_2ln": ["ln_attn", "ln_mlp"],
             "sequential": ["input_layernorm", "post_attention_layernorm"]}[config.block_layout]
    for i in range(config.num_hidden_layers):
        hf = f"transformer.h.{i}."
        ours = ("h", i)
        for norm in norms:
            specs += [WeightSpec(hf + norm + ".weight", ours + (norm, "weight")),
                      WeightSpec(hf + norm + ".bias", ours + (norm, "bias"))]
        for name, path in linears:
            specs.append(WeightSpec(hf + name + ".weight", ours + path + ("kernel",), "linear"))
            if config.bias:
                specs.append(WeightSpec(hf + name + ".bias", ours + path + ("bias",)))
    specs += [WeightSpec("transformer.ln_f.weight", ("ln_f", "weight")),
              WeightSpec("transformer.ln_f.bias", ("ln_f", "bias"))]
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return specs


def check_qkv_rows(tensors: Mapping[str, np.ndarray], config: FalconConfig, source: str) -> None:
    """Names the tensor and the layout when a fused query_key_value has the wrong row count (a config whose
    heads, kv heads, multi_query or new_decoder_architecture do not match the weights)."""
    rows = (config.num_attention_heads + 2 * config.kv_heads) * config.head_dim
    for i in range(config.num_hidden_layers):
        for suffix in ("weight", "bias"):
            name = f"transformer.h.{i}.self_attention.query_key_value.{suffix}"
            if name in tensors and tensors[name].shape[0] != rows:
                raise CheckpointError(
                    f"{source}: tensor {name!r} has {tensors[name].shape[0]} rows (shape "
                    f"{tuple(tensors[name].shape)}), the config's {config.qkv_layout} layout needs {rows}: "
                    f"{QKV_ROWS[config.qkv_layout]} (num_attention_heads {config.num_attention_heads}, kv heads "
                    f"{config.kv_heads}, head_dim {config.head_dim})")


def from_pretrained(path: str | os.PathLike, *, mesh=None, rules=None, shardings=None, **overrides) -> FalconLM:
    """Loads a local HF directory (config.json + model.safetensors or a sharded index).

    ``overrides`` change our own config fields (compute_dtype="bfloat16", attention_impl="blockwise", ...).
    Placement: ``shardings`` {param path: Sharding} (or a callable of the path), or ``mesh`` (jax.sharding.Mesh with
    axes among data/fsdp/tensor; one it lacks splits nothing) with ``rules`` (logical axis -> mesh axes over
    configs.schema.DEFAULT_SHARDING_RULES; their 'batch' also splits the rows of the batches the model is given);
    by default the default device. Each process reads only the slices its own devices hold
    (runtime.hf_weights.load_directory). The fused query_key_value must have the rows of the
    config's layout.
    """
    return load_directory(path, FalconConfig, FalconLM, weight_specs, param_axes, mesh=mesh, rules=rules,
                          shardings=shardings, overrides=overrides, check_tensors=check_qkv_rows)


def save_pretrained(model: FalconLM, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors that transformers' FalconForCausalLM (and from_pretrained) load."""
    write_directory(model, path, FalconLM, weight_specs, max_shard_bytes)
