"""The Falcon transformer family in JAX: attention (RoPE / ALiBi, MQA / GQA / MHA), the model, its HF weights.

    import transformer
    model = transformer.from_pretrained("path/to/falcon")   # local HF directory
    logits = model(input_ids)                               # (batch, seq) -> fp32 (batch, seq, vocab)
"""

from transformer.attention import (alibi_bias, alibi_slopes, apply_rope, attention, rope_cos_sin, rope_inv_freq,
                                   rotate_half)
from transformer.model import FalconLM, split_qkv
from transformer.weights import from_pretrained, save_pretrained, weight_specs

__all__ = [
    "FalconLM", "alibi_bias", "alibi_slopes", "apply_rope", "attention", "from_pretrained", "rope_cos_sin",
    "rope_inv_freq", "rotate_half", "save_pretrained", "split_qkv", "weight_specs",
]
