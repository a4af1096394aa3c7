"""Falcon Mamba in JAX: the selective scan, the causal conv, the model and its HF weights.

    import ssm
    model = ssm.from_pretrained("path/to/falcon-mamba")     # local HF directory
    logits = model(input_ids)                               # (batch, seq) -> fp32 (batch, seq, vocab)
    out = ssm.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True)   # mamba_ssm's layout
"""

from ssm.conv import causal_conv1d, causal_conv1d_fn, causal_conv1d_update
from ssm.model import FalconMambaLM, LayerState
from ssm.scan import selective_scan, selective_scan_fn, selective_state_update
from ssm.weights import from_pretrained, save_pretrained, weight_specs

__all__ = [
    "FalconMambaLM", "LayerState", "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_update", "from_pretrained",
    "save_pretrained", "selective_scan", "selective_scan_fn", "selective_state_update", "weight_specs",
]
