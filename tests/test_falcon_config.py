"""Falcon configs: presets against the published facts, transformers and TII config.json import/export,
and bad values named."""

from __future__ import annotations

import json

import pytest

import configs
from configs import ConfigError, FalconConfig, load_config, load_model_config, model_config_from_hf

PUBLISHED = {
    # preset: (hidden, heads, kv heads, layers, vocab, block layout, bias, alibi, rope theta, ffn, tied)
    "falcon_7b": (4544, 71, 1, 32, 65024, "parallel", False, False, 1e4, 4 * 4544, True),
    "falcon_40b": (8192, 128, 8, 60, 65024, "parallel_2ln", False, False, 1e4, 4 * 8192, True),
    "falcon_180b": (14848, 232, 8, 80, 65024, "parallel_2ln", False, False, 1e4, 4 * 14848, True),
    "falcon2_11b": (4096, 32, 8, 60, 65024, "parallel", False, False, 500042.0, 16384, False),
    "falcon_rw_1b": (2048, 32, 32, 24, 50304, "sequential", True, True, 1e4, 4 * 2048, True),
    "falcon_rw_7b": (4096, 64, 64, 36, 65024, "sequential", True, True, 1e4, 4 * 4096, True),
}

TII_7B = {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
          "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
          "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
          "model_type": "RefinedWebModel", "multi_query": True, "n_head": 71, "n_layer": 32, "parallel_attn": True,
          "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 65024}
TII_40B = {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"],
           "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_size": 8192, "initializer_range": 0.02,
           "layer_norm_epsilon": 1e-05, "model_type": "RefinedWeb", "n_head": 128, "n_head_kv": 8, "n_layer": 60,
           "parallel_attn": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 65024}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_published_configs(name):
    cfg = load_model_config(name)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.num_hidden_layers, cfg.vocab_size,
            cfg.block_layout, cfg.bias, cfg.alibi, cfg.rope_theta, cfg.ffn_hidden_size,
            cfg.tie_word_embeddings) == PUBLISHED[name]
    assert cfg.head_dim == 64 or name == "falcon2_11b" and cfg.head_dim == 128


def test_tiny_presets():
    run = load_config("tiny_falcon")
    assert run.model.family == "falcon" and run.model.qkv_layout == "multi_query" and run.seed == 0
    from transformer import FalconLM
    from flax import nnx
    params = sum(x.size for x in jax_leaves(nnx.state(FalconLM(run.model), nnx.Param)))
    assert 0.25e6 < params < 0.35e6
    alibi = load_model_config("tiny_falcon_alibi")
    assert alibi.alibi and alibi.num_attention_heads == 6 and alibi.block_layout == "sequential"


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_tii_configs_import():
    assert model_config_from_hf(TII_7B) == configs.replace(load_model_config("falcon_7b"), compute_dtype="float32")
    assert model_config_from_hf(TII_40B) == configs.replace(load_model_config("falcon_40b"), compute_dtype="float32")
    # TII's RWConfig defaults: RefinedWebModel is multi-head and sequential unless the file says otherwise
    rw = model_config_from_hf({"model_type": "RefinedWebModel", "n_head": 4, "n_layer": 3, "hidden_size": 32})
    assert (rw.qkv_layout, rw.block_layout, rw.num_hidden_layers, rw.vocab_size, rw.bos_token_id,
            rw.eos_token_id) == ("interleaved", "sequential", 3, 250880, 1, 2)
    rw40 = model_config_from_hf({"model_type": "RefinedWeb", "n_head": 4, "hidden_size": 32})
    assert rw40.kv_heads == 4 and rw40.block_layout == "parallel_2ln"


def test_transformers_config_import_and_export(tmp_path):
    from transformers import AutoConfig, FalconConfig as HFFalconConfig

    for name in ("falcon_7b", "falcon_40b", "falcon2_11b", "falcon_rw_1b"):
        cfg = configs.replace(load_model_config(name), compute_dtype="float32")
        (tmp_path / "config.json").write_text(json.dumps(configs.model_config_to_hf(cfg)))
        hf = AutoConfig.from_pretrained(tmp_path)
        assert isinstance(hf, HFFalconConfig) and hf.num_attention_heads == cfg.num_attention_heads
        assert model_config_from_hf(tmp_path) == cfg
        assert model_config_from_hf(json.loads(hf.to_json_string())) == cfg
    # transformers 4.x keys: rope_theta and rope_scaling {"type": ...}
    old = model_config_from_hf({"model_type": "falcon", "rope_theta": 5e5, "rope_scaling": {"type": "dynamic",
                                                                                         "factor": 2.0}})
    assert (old.rope_theta, old.rope_scaling_type, old.rope_scaling_factor) == (5e5, "dynamic", 2.0)
    # transformers' defaults: 71 heads, num_kv_heads = heads, ffn 4h
    default = model_config_from_hf({"model_type": "falcon"})
    assert default == FalconConfig() and default.num_kv_heads == 71 and default.kv_heads == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=64, num_attention_heads=6), r"'num_attention_heads': expected a divisor of hidden_size \(64\)"),
    (dict(hidden_size=48, num_attention_heads=6, num_kv_heads=4, new_decoder_architecture=True),
     r"'num_kv_heads': expected a divisor of num_attention_heads \(6\), got 4"),
    (dict(hidden_size=48, num_attention_heads=6, num_kv_heads=2, multi_query=False),
     r"'num_kv_heads': expected num_attention_heads \(6\) for multi-head attention"),
    (dict(num_ln_in_parallel_attn=2), r"'num_ln_in_parallel_attn': expected None or 1 without new_decoder_arch"),
    (dict(new_decoder_architecture=True, num_kv_heads=1, parallel_attn=False), r"'parallel_attn': expected true"),
    (dict(rope_scaling_type="yarn"), r"'rope_scaling_type': expected one of \[None, 'linear', 'dynamic'\]"),
    (dict(alibi=True, rope_scaling_type="linear"), r"'rope_scaling_type': expected None with alibi"),
    (dict(attention_impl="flash"), r"'attention_impl': expected one of \['auto', 'xla', 'blockwise'\]"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FalconConfig(**kwargs)


def test_hf_settings_transformers_reads_past_are_dropped():
    """transformers builds and runs these: a sequential block ignores num_ln_in_parallel_attn, an ALiBi model its
    RoPE scaling; they were refused."""
    seq = model_config_from_hf({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4,
                                "parallel_attn": False, "num_ln_in_parallel_attn": 2})
    assert seq.block_layout == "sequential" and seq.num_ln_in_parallel_attn is None
    alibi = model_config_from_hf({"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4,
                                  "alibi": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert alibi.alibi and alibi.rope_scaling_type is None


def test_bad_hf_configs_are_named():
    with pytest.raises(ConfigError, match=r"config.json:num_attention_heads': expected a divisor of hidden_size"):
        model_config_from_hf({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 6})
    with pytest.raises(ConfigError, match=r"'n_head' \(8\) and 'num_attention_heads' \(4\) disagree"):
        model_config_from_hf({"model_type": "RefinedWebModel", "n_head": 8, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match=r"rope_type: expected one of \['default', 'linear', 'dynamic'\].*'yarn'"):
        model_config_from_hf({"model_type": "falcon", "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"model_type: expected .* \['falcon', 'RefinedWeb', 'RefinedWebModel'\]"):
        model_config_from_hf({"model_type": "llama"})
    # a string or a list where a mapping belongs was a raw "dictionary update sequence" error
    small = {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64}
    with pytest.raises(ConfigError, match=r"^config.json rope_scaling: expected a mapping, got 'linear'$"):
        model_config_from_hf({**small, "rope_scaling": "linear"})
    with pytest.raises(ConfigError, match=r"^config.json rope_parameters: expected a mapping, got \[1, 2\]$"):
        model_config_from_hf({**small, "rope_parameters": [1, 2]})
    with pytest.raises(ConfigError, match=r"^config.json rope_scaling.type: expected one of .*, got 'yarn'$"):
        model_config_from_hf({**small, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    # transformers' default token ids (11) past a tiny vocabulary: accepted, as transformers does
    assert model_config_from_hf({**small, "vocab_size": 10}).eos_token_id == 11


def test_preset_overrides():
    run = load_config("tiny_falcon", ["model.attention_impl=blockwise", "model.num_kv_heads=2"])
    assert run.model.attention_impl == "blockwise" and run.model.kv_heads == 1  # ignored by multi-query
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_head'; did you mean"):
        load_config("tiny_falcon", ["model.n_head=2"])


def test_null_layout_switches_read_as_transformers_reads_them():
    """transformers keeps a null multi_query / parallel_attn and tests it for truth (multi-head attention,
    sequential blocks); the importer dropped the null and our defaults (true) gave the other layouts."""
    from transformers import FalconConfig as HFFalconConfig

    small = {"model_type": "falcon", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64}
    for key, view, expected in (("multi_query", "qkv_layout", "interleaved"),
                                ("parallel_attn", "block_layout", "sequential")):
        assert getattr(HFFalconConfig.from_dict({**small, key: None}), key) is None
        cfg = model_config_from_hf({**small, key: None})
        assert getattr(cfg, view) == expected and getattr(cfg, key) is False
    assert model_config_from_hf({**small, "alibi": None, "bias": None}) == model_config_from_hf(small)
