"""Logical axis names of every Falcon parameter, by parameter path ("h.3.self_attention.dense.kernel").

The names are mapped to mesh axes by the run config's ``mesh.rules`` (configs.schema.DEFAULT_SHARDING_RULES).
The fused query_key_value output is split along "heads" as one dimension; GSPMD inserts whatever the
per-layout head split needs.
"""

from __future__ import annotations

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

