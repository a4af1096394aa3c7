"""The one config system for both model families, the mesh and the run.

    from configs import load_config, load_model_config, model_config_from_hf
    run = load_config("tiny_falcon_mamba", ["model.hidden_size=128", "seed=1"])
"""

from configs.hf import model_config_from_hf, model_config_to_hf
from configs.loader import (dump_config, from_dict, list_presets, load_config, load_model_config, parse_overrides,
                            replace, to_dict)
from configs.schema import (ConfigError, DataConfig, DistributedConfig, FalconConfig, FalconMambaConfig, MeshConfig,
                            OptimConfig, RunConfig)

__all__ = [
    "ConfigError", "DataConfig", "DistributedConfig", "FalconConfig", "FalconMambaConfig", "MeshConfig",
    "OptimConfig", "RunConfig", "dump_config", "from_dict", "list_presets", "load_config",
    "load_model_config", "model_config_from_hf", "model_config_to_hf", "parse_overrides", "replace", "to_dict",
]
