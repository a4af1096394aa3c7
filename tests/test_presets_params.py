"""Every published preset instantiates abstractly (nnx.eval_shape: no memory) with the published parameter count.

The exact integers are derived from each architecture's formula (below, and checked by ``formula``), then
compared with the sum of the abstract parameter shapes the model really creates. Published counts count a
tied lm_head twice for falcon-7b / 40b / 180b ("7.22B", "41.8B", "179.5B": the 40B checkpoint even stores the
copy), once for the rest; both numbers are asserted.
"""

from __future__ import annotations

import math

import jax
import pytest
from flax import nnx

from configs import load_config
from configs.schema import FalconMambaConfig
from experiments.models import family_of


def formula(c) -> int:
    """Parameters of one config from the architecture alone (independent of the model code)."""
    if isinstance(c, FalconMambaConfig):
        h, di, n, k, r = c.hidden_size, c.intermediate_size, c.state_size, c.conv_kernel, c.time_step_rank
        layer = (h                                  # RMSNorm weight
                 + h * 2 * di + (2 * di if c.use_bias else 0)   # in_proj
                 + di * k + (di if c.use_conv_bias else 0)       # depthwise conv1d
                 + di * (r + 2 * n)                  # x_proj -> dt, B, C
                 + r * di + di                       # dt_proj (with bias)
                 + di * n + di                       # A_log, D
                 + di * h + (h if c.use_bias else 0))   # out_proj
        return c.vocab_size * h + c.num_hidden_layers * layer + h + (0 if c.tie_word_embeddings else c.vocab_size * h)
    h, f, d = c.hidden_size, c.ffn_hidden_size, c.head_dim
    qkv_rows = (c.num_attention_heads + 2 * c.kv_heads) * d   # MQA: H+2 heads; MHA: 3H; NDA: H + 2 KV
    lns = {"parallel": 1, "parallel_2ln": 2, "sequential": 2}[c.block_layout]
    b = 1 if c.bias else 0
    layer = (lns * 2 * h                          # LayerNorm weight + bias
             + h * qkv_rows + b * qkv_rows        # query_key_value
             + h * h + b * h                      # dense
             + h * f + b * f + f * h + b * h)     # dense_h_to_4h, dense_4h_to_h
    return c.vocab_size * h + c.num_hidden_layers * layer + 2 * h + (0 if c.tie_word_embeddings else c.vocab_size * h)


# preset: (parameters the model holds, counting a tied lm_head a second time)
#   falcon_7b:  V=65024 h=4544 L=32 H=71 MQA (qkv rows 73*64=4672), 1 LN, no bias, f=18176:
#               layer = 2*4544 + 4544*4672 + 4544^2 + 2*4544*18176 = 207,070,080;
#               65024*4544 + 32*layer + 2*4544 = 6,921,720,704; + tied head 295,469,056 = 7,217,189,760 (7.22B)
#   falcon_40b: h=8192 L=60 H=128 KV=8 (rows 144*64=9216), 2 LNs, f=32768: layer = 679,510,016;
#               532,676,608 + 60*layer + 16,384 = 41,303,293,952; + 532,676,608 = 41,835,970,560 (41.8B)
#   falcon_180b: h=14848 L=80 H=232 KV=8 (rows 248*64=15872), 2 LNs, f=59392:
#               178,557,088,768; + 65024*14848 = 179,522,565,120 (179.5B)
#   falcon2_11b: h=4096 L=60 H=32 KV=8 (rows 48*128=6144), 1 LN, f=16384, untied: 11,102,822,400 (11.1B)
#   falcon_rw_1b: V=50304 h=2048 L=24 MHA (rows 3h), 2 LNs, biases, f=8192: layer = 50,358,272;
#               103,022,592 + 24*layer + 4096 = 1,311,625,216 (1.31B); + 103,022,592 = 1,414,647,808
#   falcon_rw_7b: V=65024 h=4096 L=36, same layout: 7,516,020,736 (7.5B); + 266,338,304 = 7,782,359,040
#   falcon_mamba_7b: V=65024 h=4096 di=8192 L=64 n=16 k=4 r=256, conv bias, untied:
#               layer = 4096 + 67,108,864 + 40,960 + 2,359,296 + 2,105,344 + 139,264 + 33,554,432 = 105,312,256;
#               2*65024*4096 + 64*layer + 4096 = 7,272,665,088 (7.27B)
PUBLISHED = {
    "falcon_7b": (6_921_720_704, 7_217_189_760),
    "falcon_40b": (41_303_293_952, 41_835_970_560),
    "falcon_180b": (178_557_088_768, 179_522_565_120),
    "falcon2_11b": (11_102_822_400, 11_102_822_400),
    "falcon_rw_1b": (1_311_625_216, 1_414_647_808),
    "falcon_rw_7b": (7_516_020_736, 7_782_359_040),
    "falcon_mamba_7b": (7_272_665_088, 7_272_665_088),
}
ROUNDED = {"falcon_7b": 7.22e9, "falcon_40b": 41.8e9, "falcon_180b": 179.5e9, "falcon2_11b": 11.1e9,
           "falcon_rw_1b": 1.31e9, "falcon_rw_7b": 7.5e9, "falcon_mamba_7b": 7.27e9}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count(preset):
    config = load_config(preset).model
    model = nnx.eval_shape(lambda: family_of(config).lm(config))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)   # abstract: nothing allocated
    held = sum(math.prod(leaf.shape) for leaf in leaves)
    tied_copy = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    unique, published = PUBLISHED[preset]
    assert held == unique == formula(config)
    assert held + tied_copy == published
    # the rounded published figure matches one of the two ways of counting to its last digit
    assert min(abs(unique - ROUNDED[preset]), abs(published - ROUNDED[preset])) < 0.005 * ROUNDED[preset]


def test_build_model_draws_its_weights_from_the_seed():
    """build_model(config, seed): the same seed the same weights, another seed other weights (for both families)."""
    import numpy as np

    from configs import load_model_config
    from experiments.models import build_model

    for preset in ("tiny_falcon_mamba", "tiny_falcon"):
        config = load_model_config(preset, ["num_hidden_layers=1", "vocab_size=32"])
        leaves = [jax.tree.leaves(nnx.state(build_model(config, seed=s), nnx.Param)) for s in (3, 3, 4)]
        assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1]))
        assert not all(np.array_equal(a, c) for a, c in zip(leaves[0], leaves[2]))
