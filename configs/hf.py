"""Import and export of Hugging Face config.json files.

Handled formats: transformers' ``falcon_mamba`` and ``mamba`` configs, and mamba_ssm's own config.json
(``d_model``, ``n_layer``, ``ssm_cfg``). Keys that do not affect the math (``use_cache``, ``architectures``,
``torch_dtype``...) are ignored on import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from configs.schema import ConfigError, FalconMambaConfig

def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config.json not found at {str(path)!r}")
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: expected a JSON object, got {type(data).__name__}")
    return data


def _mamba_from_transformers(hf: Mapping[str, Any], falcon: bool) -> FalconMambaConfig:
    hidden = hf.get("hidden_size", 768)
    expand = hf.get("expand", 2)
    rank = hf.get("time_step_rank", "auto")
    kwargs: dict[str, Any] = {
        "hidden_size": hidden,
        # transformers derives intermediate_size from expand, then lets an explicit value win
        # (falcon-mamba-7b says expand 16 and intermediate_size 8192; the latter is right).
        "intermediate_size": hf.get("intermediate_size", int(expand * hidden)),
        "time_step_rank": FalconMambaConfig.auto_time_step_rank(hidden) if rank == "auto" else rank,
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
    if isinstance(kwargs["eos_token_id"], list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
    from configs.loader import from_dict  # local: loader imports schema only

    return from_dict(FalconMambaConfig, kwargs, prefix="config.json:")


def _mamba_from_mamba_ssm(hf: Mapping[str, Any]) -> FalconMambaConfig:
    ssm_cfg = dict(hf.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ConfigError(f"config.json ssm_cfg.layer: expected 'Mamba1', got {layer!r}")
    d_model = hf["d_model"]
    vocab = hf["vocab_size"]
    multiple = hf.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    rank = ssm_cfg.get("dt_rank", "auto")
    from configs.loader import from_dict

    return from_dict(FalconMambaConfig, {
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": hf["n_layer"],
        "state_size": ssm_cfg.get("d_state", 16),
        "intermediate_size": int(ssm_cfg.get("expand", 2) * d_model),
        "conv_kernel": ssm_cfg.get("d_conv", 4),
        "time_step_rank": math.ceil(d_model / 16) if rank == "auto" else rank,
        "use_bias": ssm_cfg.get("bias", False),
        "use_conv_bias": ssm_cfg.get("conv_bias", True),
        "layer_norm_epsilon": 1e-5,
        "use_mixer_norms": False,
        "residual_in_fp32": hf.get("residual_in_fp32", True),
        "tie_word_embeddings": hf.get("tie_embeddings", True),
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }, prefix="config.json:")


def model_config_from_hf(source: str | Path | Mapping[str, Any]) -> Any:
    """A model config from a HF config.json (path to the file or its directory, or the parsed dict)."""
    hf = dict(source) if isinstance(source, Mapping) else read_json(source)
    model_type = hf.get("model_type")
    if model_type == "falcon_mamba":
        return _mamba_from_transformers(hf, falcon=True)
    if model_type == "mamba":
        return _mamba_from_transformers(hf, falcon=False)
    if model_type is None and "d_model" in hf and "n_layer" in hf:
        if not hf.get("rms_norm", True):
            raise ConfigError("config.json rms_norm: expected true (Mamba-1 LMs use RMSNorm), got false")
        return _mamba_from_mamba_ssm(hf)
    raise ConfigError(
        f"config.json model_type: expected one of ['falcon_mamba', 'mamba'] (or a mamba_ssm config with "
        f"d_model and n_layer), got {model_type!r}")


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
            "eos_token_id": config.eos_token_id,
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
    raise ConfigError(f"model_config_to_hf: expected a model config, got {type(config).__name__}")
