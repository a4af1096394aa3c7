"""Typed config dataclasses: one schema for both model families, the mesh and the run.

Field names of the model configs follow transformers' config classes (FalconMambaConfig, FalconConfig) so
that a reader who knows those finds the same words here. Every field is validated in __post_init__; errors
name the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

COMPUTE_DTYPES = ("float32", "bfloat16")
SCAN_IMPLS = ("auto", "reference", "chunked")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key, the expected and the received value."""


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"config field {key!r}: expected {expected}, got {value!r}")


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "a positive integer", value)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in choices, name, f"one of {list(choices)}", value)


@dataclass(frozen=True)
class FalconMambaConfig:
    """Falcon Mamba (and plain Mamba-1 with ``use_mixer_norms=False``).

    Math-relevant fields mirror transformers' FalconMambaConfig; ``compute_dtype``, ``scan_impl`` and
    ``scan_chunk_size`` are ours.
    """

    family: ClassVar[str] = "falcon_mamba"

    vocab_size: int = 65024
    hidden_size: int = 4096
    num_hidden_layers: int = 64
    state_size: int = 16
    intermediate_size: int = 8192
    conv_kernel: int = 4
    time_step_rank: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    # The three weightless RMS norms on dt, B and C that make Falcon Mamba differ from Mamba-1.
    use_mixer_norms: bool = True
    mixer_rms_eps: float = 1e-6
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = 11
    bos_token_id: int | None = 0
    eos_token_id: int | None = 11
    # Initialisation (mamba_ssm's scheme); used when a model is built from scratch.
    initializer_range: float = 0.1
    time_step_scale: float = 1.0
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_init_scheme: Literal["random", "constant"] = "random"
    rescale_prenorm_residual: bool = False
    # Ours: numerics and kernels.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_impl: str = "auto"
    scan_chunk_size: int = 256

    def __post_init__(self) -> None:
        _positive_int(self, "vocab_size", "hidden_size", "num_hidden_layers", "state_size",
                      "intermediate_size", "conv_kernel", "time_step_rank", "scan_chunk_size")
        for name in ("layer_norm_epsilon", "mixer_rms_eps", "time_step_min", "time_step_max",
                     "time_step_floor", "initializer_range", "time_step_scale"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
                     "a positive number", value)
        _require(self.time_step_min <= self.time_step_max, "time_step_min",
                 f"<= time_step_max ({self.time_step_max})", self.time_step_min)
        _require(self.state_size <= 256, "state_size", "<= 256 (mamba_ssm's limit)", self.state_size)
        _require(self.hidden_act == "silu", "hidden_act", "'silu' (the only activation Mamba uses)",
                 self.hidden_act)
        _choice(self, "time_step_init_scheme", ("random", "constant"))
        _choice(self, "compute_dtype", COMPUTE_DTYPES)
        _choice(self, "param_dtype", COMPUTE_DTYPES)
        _choice(self, "scan_impl", SCAN_IMPLS)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and 0 <= value),
                     name, "None or a non-negative integer", value)

    @property
    def d_inner(self) -> int:
        return self.intermediate_size

    @staticmethod
    def auto_time_step_rank(hidden_size: int) -> int:
        return math.ceil(hidden_size / 16)


@dataclass(frozen=True)
class MeshConfig:
    """Named mesh axes; -1 means "all devices the other axes leave"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        for key, value in sizes.items():
            _require(isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1),
                     key, "a positive integer or -1", value)
        _require(list(sizes.values()).count(-1) <= 1, "mesh", "at most one axis of size -1", sizes)


ModelConfig = FalconMambaConfig

MODEL_CONFIGS: dict[str, type] = {"falcon_mamba": FalconMambaConfig}


@dataclass(frozen=True)
class RunConfig:
    """What a command line runs: a model, a mesh and the run's own settings."""

    model: Any = field(default_factory=FalconMambaConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    seed: int = 0
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _require(type(self.model) in MODEL_CONFIGS.values(), "model",
                 f"a model config of family {sorted(MODEL_CONFIGS)}", self.model)
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "an integer", self.seed)


def fields_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]
