"""Import and export of Hugging Face config.json files.

Handled formats: transformers' ``falcon_mamba``, ``mamba`` and ``falcon`` configs, mamba_ssm's own config.json
(``d_model``, ``n_layer``, ``ssm_cfg``) and TII's original Falcon configs (model_type ``RefinedWebModel`` for
7B and RW, ``RefinedWeb`` for 40B, with ``n_head``, ``n_layer``, ``n_head_kv``). Keys that do not affect the math
(``use_cache``, ``architectures``, ``torch_dtype``...) are ignored on import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from configs.schema import ConfigError, FalconConfig, FalconMambaConfig, is_int, is_number

FALCON_MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")
# config.json booleans that choose the Falcon layout; transformers (and TII's code) test them for truth
FALCON_SWITCHES = ("new_decoder_architecture", "multi_query", "parallel_attn", "bias", "alibi")

def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config.json not found at {str(path)!r}")
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{str(path)!r}: expected a JSON object, got invalid JSON at line {err.lineno}, "
                              f"column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data


def _positive(hf: Mapping[str, Any], key: str, default: Any, name: str = "", integer: bool = True) -> Any:
    """hf[key] (``default`` when absent), checked before the importer does arithmetic with it: a positive integer
    (a positive number where not ``integer``; 16.0 is 16, as the loader reads it); the message names ``name``
    (default: the key) in config.json."""
    value = hf.get(key, default)
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not ((is_int(value) if integer else is_number(value)) and value > 0):
        raise ConfigError(f"config.json {name or key}: expected a positive {'integer' if integer else 'number'}, "
                          f"got {value!r}")
    return value


def _mapping(hf: Mapping[str, Any], key: str) -> dict[str, Any]:
    """hf[key] as a dict: a mapping, or {} where absent or null."""
    value = hf.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"config.json {key}: expected a mapping, got {value!r}")
    return dict(value or {})


def _eos_ids(value: Any) -> Any:
    """config.json's eos_token_id: an id, null, or a list of ids (kept whole as a tuple; one id as itself)."""
    if isinstance(value, list):
        return None if not value else value[0] if len(value) == 1 else tuple(value)
    return value


def _eos_to_hf(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _mamba_from_transformers(hf: Mapping[str, Any], falcon: bool) -> FalconMambaConfig:
    hidden = _positive(hf, "hidden_size", 768)
    expand = _positive(hf, "expand", 2, integer=False)
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        # transformers derives intermediate_size from expand, then lets an explicit value win
        # (falcon-mamba-7b says expand 16 and intermediate_size 8192; the latter is right).
        # (null counts as absent: it fell to our 2 x hidden_size, whatever expand said).
        "intermediate_size": (int(expand * hidden) if hf.get("intermediate_size") is None
                              else hf["intermediate_size"]),
        "time_step_rank": hf.get("time_step_rank"),  # "auto" or null: the schema's ceil(hidden_size / 16)
        "use_mixer_norms": falcon,
        # transformers' default for both classes is tied embeddings.
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        # transformers' defaults where the file says nothing.
        "vocab_size": hf.get("vocab_size", 50280),
        "num_hidden_layers": hf.get("num_hidden_layers", 32),
        "pad_token_id": hf.get("pad_token_id", 0),
        "bos_token_id": hf.get("bos_token_id", 0),
        "eos_token_id": hf.get("eos_token_id", 0),
    }
    passthrough = {"state_size", "conv_kernel", "use_bias", "use_conv_bias", "layer_norm_epsilon",
                   "mixer_rms_eps", "residual_in_fp32", "hidden_act", "initializer_range", "time_step_scale",
                   "time_step_min", "time_step_max", "time_step_floor", "time_step_init_scheme",
                   "rescale_prenorm_residual"}
    # Other keys (use_cache, architectures, torch_dtype, ...) carry no math and are not ours to reject.
    kwargs.update({key: value for key, value in hf.items() if key in passthrough})
    kwargs["eos_token_id"] = _eos_ids(kwargs["eos_token_id"])
    from configs.loader import from_dict  # local: loader imports schema only

    return from_dict(FalconMambaConfig, kwargs, prefix="config.json:")


# mamba_ssm's Mamba(**ssm_cfg) arguments (besides d_model; "layer" is create_block's): the dt_* ones initialise
# dt_proj, as transformers' time_step_* fields do; use_fast_path picks kernels, not math.
MAMBA_SSM_DT_INIT = {"dt_min": "time_step_min", "dt_max": "time_step_max", "dt_init": "time_step_init_scheme",
                     "dt_scale": "time_step_scale", "dt_init_floor": "time_step_floor"}
MAMBA_SSM_CFG_KEYS = {"d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "use_fast_path",
                      *MAMBA_SSM_DT_INIT}


def _mamba_from_mamba_ssm(hf: Mapping[str, Any]) -> FalconMambaConfig:
    ssm_cfg = _mapping(hf, "ssm_cfg")
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ConfigError(f"config.json ssm_cfg.layer: expected 'Mamba1', got {layer!r}")
    # mamba_ssm 2's hybrid layers (an MLP after each mixer, attention layers) are not Mamba-1 Falcon Mamba
    for key, none in (("d_intermediate", 0), ("attn_layer_idx", [])):
        if hf.get(key) not in (None, none):
            raise ConfigError(f"config.json {key}: expected {none!r} (a plain Mamba-1 stack), got {hf[key]!r}")
    d_model = _positive(hf, "d_model", None)  # this reader is chosen by d_model and n_layer being there
    vocab = _positive(hf, "vocab_size", 50277)  # mamba_ssm's MambaConfig default
    multiple = _positive(hf, "pad_vocab_size_multiple", 8)
    expand = _positive(ssm_cfg, "expand", 2, name="ssm_cfg.expand", integer=False)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    # mamba_ssm passes ssm_cfg to Mamba(**ssm_cfg), which refuses any other key: a misspelt d_state was read as 16
    unknown = sorted(set(ssm_cfg) - MAMBA_SSM_CFG_KEYS)
    if unknown:
        raise ConfigError(f"config.json ssm_cfg: expected keys among {sorted(MAMBA_SSM_CFG_KEYS)} (mamba_ssm's "
                          f"Mamba arguments), got {unknown}")
    # its dt_proj initialisation, under transformers' names (they fell back to the defaults unseen)
    init = {ours: ssm_cfg[theirs] for theirs, ours in MAMBA_SSM_DT_INIT.items() if theirs in ssm_cfg}
    from configs.loader import from_dict

    return from_dict(FalconMambaConfig, {
        **init,
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": hf["n_layer"],
        "state_size": ssm_cfg.get("d_state", 16),
        "intermediate_size": int(expand * d_model),
        "conv_kernel": ssm_cfg.get("d_conv", 4),
        "time_step_rank": ssm_cfg.get("dt_rank"),  # "auto" or null: the schema's ceil(d_model / 16)
        "use_bias": ssm_cfg.get("bias", False),
        "use_conv_bias": ssm_cfg.get("conv_bias", True),
        "layer_norm_epsilon": 1e-5,
        "use_mixer_norms": False,
        "residual_in_fp32": hf.get("residual_in_fp32", True),
        "tie_word_embeddings": hf.get("tie_embeddings", True),
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }, prefix="config.json:")


def _falcon_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta and scaling from transformers 5's ``rope_parameters`` or 4.x's ``rope_theta``/``rope_scaling``."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = _mapping(hf, key)
    field = "rope_type" if "rope_type" in params else "type"  # 4.x's rope_scaling says type
    kind = params.get(field, "default")
    if kind not in ("default", "linear", "dynamic"):
        raise ConfigError(f"config.json {key}.{field}: expected one of ['default', 'linear', 'dynamic'], "
                          f"got {kind!r}")
    out: dict[str, Any] = {"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}
    if kind != "default":
        out["rope_scaling_type"] = kind
        out["rope_scaling_factor"] = params.get("factor")
    return out


def _falcon_from_hf(hf: Mapping[str, Any], model_type: str) -> FalconConfig:
    hf = dict(hf)
    # TII's names (transformers' FalconConfig silently ignores them and falls back to 71 heads, 32 layers).
    for old, new in (("n_head", "num_attention_heads"), ("n_layer", "num_hidden_layers"),
                     ("n_head_kv", "num_kv_heads"), ("n_embed", "hidden_size")):
        if old in hf:
            if new in hf and hf[new] != hf[old]:
                raise ConfigError(f"config.json {old!r} ({hf[old]!r}) and {new!r} ({hf[new]!r}) disagree")
            hf[new] = hf.pop(old)
    if hf.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError("config.json apply_residual_connection_post_layernorm: expected false (no Falcon "
                          "checkpoint uses it), got true")
    if hf.get("activation", "gelu") != "gelu":
        raise ConfigError(f"config.json activation: expected 'gelu', got {hf['activation']!r}")
    if model_type == "falcon":  # transformers' FalconConfig defaults
        kwargs: dict[str, Any] = {}
    else:
        # TII's RWConfig defaults: vocab 250880, hidden 64, 2 layers, 8 heads, bos 1, eos 2, and for
        # RefinedWebModel (7B, RW) multi_query and parallel_attn false. RefinedWeb (40B) is always the new
        # decoder architecture with ln_attn/ln_mlp; its n_head_kv defaults to n_head.
        kwargs = {"vocab_size": 250880, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                  "bos_token_id": 1, "eos_token_id": 2, "multi_query": False, "parallel_attn": False}
        if model_type == "RefinedWeb":
            # multi_query is ignored by the new architecture; transformers' default keeps configs comparable.
            kwargs.update(new_decoder_architecture=True, parallel_attn=True, num_ln_in_parallel_attn=2,
                          multi_query=True)
    passthrough = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_kv_heads",
                   "new_decoder_architecture", "multi_query", "parallel_attn", "bias", "alibi",
                   "num_ln_in_parallel_attn", "ffn_hidden_size", "layer_norm_epsilon", "max_position_embeddings",
                   "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"}
    # Other keys (use_cache, dropout, architectures, torch_dtype, ...) carry no math and are not ours to reject.
    # null means "derive it" for the sizes, but "no such token" for a token id (transformers keeps the None), and
    # false for a layout switch: transformers keeps the None and tests it for truth (multi_query null builds
    # multi-head attention, parallel_attn null sequential blocks; our defaults, true, built the other layouts)
    kwargs.update({key: value for key, value in hf.items()
                   if key in passthrough and (value is not None or key.endswith("_token_id"))})
    kwargs.update({key: False for key in FALCON_SWITCHES if key in hf and hf[key] is None})
    if model_type == "RefinedWeb" and not kwargs["new_decoder_architecture"]:
        raise ConfigError("config.json new_decoder_architecture: expected true for model_type 'RefinedWeb', got false")
    # settings transformers reads past: the layer norm count of a sequential block (it has input_layernorm and
    # post_attention_layernorm whatever the count), RoPE scaling in an ALiBi model (no rotary embedding)
    if not kwargs.get("new_decoder_architecture") and not kwargs.get("parallel_attn", True):
        kwargs.pop("num_ln_in_parallel_attn", None)
    rope = _falcon_rope(hf)
    if kwargs.get("alibi"):
        rope = {"rope_theta": rope["rope_theta"]}
    kwargs.update(rope)
    if "eos_token_id" in kwargs:
        kwargs["eos_token_id"] = _eos_ids(kwargs["eos_token_id"])
    from configs.loader import from_dict

    return from_dict(FalconConfig, kwargs, prefix="config.json:")


def model_config_from_hf(source: str | Path | Mapping[str, Any]) -> Any:
    """A model config from a HF config.json (path to the file or its directory, or the parsed dict)."""
    if not isinstance(source, (Mapping, str, os.PathLike)):
        raise ConfigError(f"model_config_from_hf source: expected a path to config.json (or its directory) or a "
                          f"mapping, got {source!r}")
    hf = dict(source) if isinstance(source, Mapping) else read_json(source)
    model_type = hf.get("model_type")
    if model_type == "falcon_mamba":
        return _mamba_from_transformers(hf, falcon=True)
    if model_type == "mamba":
        return _mamba_from_transformers(hf, falcon=False)
    if model_type in FALCON_MODEL_TYPES:
        return _falcon_from_hf(hf, model_type)
    if model_type is None and "d_model" in hf and "n_layer" in hf:
        if not hf.get("rms_norm", True):
            raise ConfigError("config.json rms_norm: expected true (Mamba-1 LMs use RMSNorm), got false")
        return _mamba_from_mamba_ssm(hf)
    raise ConfigError(
        f"config.json model_type: expected one of ['falcon_mamba', 'mamba'] (or a mamba_ssm config with "
        f"d_model and n_layer) for Mamba, or one of {list(FALCON_MODEL_TYPES)} for Falcon, got {model_type!r}")


def model_config_to_hf(config: Any) -> dict[str, Any]:
    """A config.json dict that transformers loads into the equivalent PyTorch model."""
    if isinstance(config, FalconMambaConfig):
        falcon = config.use_mixer_norms
        out = {
            "architectures": ["FalconMambaForCausalLM" if falcon else "MambaForCausalLM"],
            "model_type": "falcon_mamba" if falcon else "mamba",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "state_size": config.state_size,
            "intermediate_size": config.intermediate_size,
            "conv_kernel": config.conv_kernel,
            "time_step_rank": config.time_step_rank,
            "use_bias": config.use_bias,
            "use_conv_bias": config.use_conv_bias,
            "layer_norm_epsilon": config.layer_norm_epsilon,
            "residual_in_fp32": config.residual_in_fp32,
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_act": config.hidden_act,
            "pad_token_id": config.pad_token_id,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": _eos_to_hf(config.eos_token_id),
            "initializer_range": config.initializer_range,
            "time_step_scale": config.time_step_scale,
            "time_step_min": config.time_step_min,
            "time_step_max": config.time_step_max,
            "time_step_floor": config.time_step_floor,
            "time_step_init_scheme": config.time_step_init_scheme,
            "rescale_prenorm_residual": config.rescale_prenorm_residual,
            "torch_dtype": config.param_dtype,
        }
        if config.intermediate_size % config.hidden_size == 0:
            out["expand"] = config.intermediate_size // config.hidden_size
        if falcon:
            out["mixer_rms_eps"] = config.mixer_rms_eps
        return out
    if isinstance(config, FalconConfig):
        rope: dict[str, Any] = {"rope_type": config.rope_scaling_type or "default", "rope_theta": config.rope_theta}
        if config.rope_scaling_type:
            rope["factor"] = config.rope_scaling_factor
        return {
            "architectures": ["FalconForCausalLM"],
            "model_type": "falcon",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_kv_heads": config.num_kv_heads,
            "new_decoder_architecture": config.new_decoder_architecture,
            "multi_query": config.multi_query,
            "parallel_attn": config.parallel_attn,
            "bias": config.bias,
            "alibi": config.alibi,
            "num_ln_in_parallel_attn": config.num_ln_in_parallel_attn,
            "ffn_hidden_size": config.ffn_hidden_size,
            "activation": "gelu",
            "layer_norm_epsilon": config.layer_norm_epsilon,
            "rope_parameters": rope,
            # transformers 4.x reads rope_theta and rope_scaling instead (Falcon2-11B's theta 500042 included)
            "rope_theta": config.rope_theta,
            **({"rope_scaling": {"type": config.rope_scaling_type, "factor": config.rope_scaling_factor}}
               if config.rope_scaling_type else {}),
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": _eos_to_hf(config.eos_token_id),
            "pad_token_id": config.pad_token_id,
            "initializer_range": config.initializer_range,
            "torch_dtype": config.param_dtype,
        }
    raise ConfigError(f"model_config_to_hf: expected a model config, got {type(config).__name__}")
