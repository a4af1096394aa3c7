"""Logical axis names of every Falcon Mamba parameter, by parameter path ("layers.3.mixer.in_proj.kernel").

The names are mapped to mesh axes by the run config's ``mesh.rules`` (configs.schema.DEFAULT_SHARDING_RULES).
Everything along d_inner is split the same way, so the conv, the selective scan and the gating run on each
d_inner shard without communication; only in_proj/x_proj/out_proj contract across shards. in_proj keeps its x
and z halves on an axis of their own ("xz", never split): a d_inner shard holds both halves of its channels.
"""

from __future__ import annotations

from configs.schema import FalconMambaConfig

PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"embeddings\.embedding", ("vocab", "embed")),
    (r"layers\.\d+\.norm\.weight", ("norm",)),
    (r"layers\.\d+\.mixer\.in_proj\.kernel", ("embed", "xz", "d_inner")),
    (r"layers\.\d+\.mixer\.in_proj\.bias", ("xz", "d_inner")),
    (r"layers\.\d+\.mixer\.conv_kernel", ("conv", "d_inner")),
    (r"layers\.\d+\.mixer\.conv_bias", ("d_inner",)),
    (r"layers\.\d+\.mixer\.x_proj\.kernel", ("d_inner", "ssm_proj")),
    (r"layers\.\d+\.mixer\.dt_proj\.kernel", ("dt_rank", "d_inner")),
    (r"layers\.\d+\.mixer\.dt_proj\.bias", ("d_inner",)),
    (r"layers\.\d+\.mixer\.A_log", ("d_inner", "d_state")),
    (r"layers\.\d+\.mixer\.D", ("d_inner",)),
    (r"layers\.\d+\.mixer\.out_proj\.kernel", ("d_inner", "embed")),
    (r"layers\.\d+\.mixer\.out_proj\.bias", ("embed",)),
    (r"norm_f\.weight", ("norm",)),
    (r"lm_head\.kernel", ("embed", "vocab")),
)


def param_axes(config: FalconMambaConfig, mesh=None, rules=None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The parameter -> logical axes table (the same for every config: each array's own divisibility, checked
    by runtime.partitioning.spec_for, is all a mesh needs)."""
    return PARAM_AXES
