"""Logical axis names of every Falcon parameter, by parameter path ("h.3.self_attention.dense.kernel").

The names are mapped to mesh axes by the run config's ``mesh.rules`` (configs.schema.DEFAULT_SHARDING_RULES).
The fused query_key_value output is split along "heads" as one dimension, which keeps whole heads (and whole
kv groups) on each shard when the layout's head groups divide over the mesh axes of "heads" (checked by
``param_axes``). The multi-query layout (falcon-7b: 71 query heads, then one k and one v head shared by all)
has no such split: its attention weights use the logical axis "multi_query_heads", replicated by default,
because splitting them over tensor cuts heads and makes GSPMD reshuffle q, k and v across shards in every
layer, forward and backward (tests/test_sharding.py counts the collective-permutes).
"""

from __future__ import annotations

from configs.schema import FalconConfig, merged_rules
from runtime.partitioning import MeshError, split_over

_NORM = r"(input_layernorm|post_attention_layernorm|ln_attn|ln_mlp)"

PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"word_embeddings\.embedding", ("vocab", "embed")),
    (rf"h\.\d+\.{_NORM}\.(weight|bias)", ("norm",)),
    (r"h\.\d+\.self_attention\.query_key_value\.kernel", ("embed", "heads")),
    (r"h\.\d+\.self_attention\.query_key_value\.bias", ("heads",)),
    (r"h\.\d+\.self_attention\.dense\.kernel", ("heads", "embed")),
    (r"h\.\d+\.self_attention\.dense\.bias", ("embed",)),
    (r"h\.\d+\.mlp\.dense_h_to_4h\.kernel", ("embed", "mlp")),
    (r"h\.\d+\.mlp\.dense_h_to_4h\.bias", ("mlp",)),
    (r"h\.\d+\.mlp\.dense_4h_to_h\.kernel", ("mlp", "embed")),
    (r"h\.\d+\.mlp\.dense_4h_to_h\.bias", ("embed",)),
    (r"ln_f\.(weight|bias)", ("norm",)),
    (r"lm_head\.kernel", ("embed", "vocab")),
)


MULTI_QUERY_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (pattern, tuple("multi_query_heads" if axis == "heads" else axis for axis in axes))
    for pattern, axes in PARAM_AXES)


def param_axes(config: FalconConfig, mesh=None, rules=None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The parameter -> logical axes table of ``config``'s qkv layout. With a ``mesh`` (axes data/fsdp/tensor;
    ``rules`` over DEFAULT_SHARDING_RULES), also checks that the layout's head groups divide over the mesh
    axes of "heads": kv groups (grouped layout) or heads (interleaved), so no shard holds part of a group."""
    if config.qkv_layout == "multi_query":
        return MULTI_QUERY_PARAM_AXES
    if mesh is not None:
        axes, parts, across = split_over(mesh, merged_rules(rules)["heads"])
        field, groups = (("num_kv_heads", config.num_kv_heads) if config.qkv_layout == "grouped"
                         else ("num_attention_heads", config.num_attention_heads))
        if groups % parts:
            raise MeshError(f"model.{field}: {groups} {config.qkv_layout} head groups of query_key_value are not "
                            f"divisible by mesh axes {across} (mesh.rules.heads = {list(axes)}); a shard "
                            f"would hold part of a group and GSPMD would reshuffle q, k and v every layer")
    return PARAM_AXES
