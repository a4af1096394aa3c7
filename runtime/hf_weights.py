"""Moving weights between an NNX model and a Hugging Face state dict, described as data.

Each family lists WeightSpecs: the HF tensor name (plus accepted aliases), the attribute path of the NNX
parameter, and the layout change. Loading checks every tensor's presence and shape and names the tensor
when one is missing or misshapen; export yields (name, array) pairs one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from runtime.safetensors_io import CheckpointError

# Layout changes between HF (torch) and our parameters.
#   identity: same array.  linear: torch Linear weight (out, in) <-> our kernel (in, out).
#   conv: torch depthwise Conv1d weight (channels, 1, k) <-> our kernel (k, channels).
TRANSFORMS = ("identity", "linear", "conv")


@dataclass(frozen=True)
class WeightSpec:
    hf_name: str
    path: tuple[Any, ...]
    transform: str = "identity"
    aliases: tuple[str, ...] = ()


def _to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.reshape(array.shape[0], array.shape[-1]).T
    return array


def _to_hf(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.T[:, None, :]
    return array


def hf_shape(our_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "linear":
        return tuple(reversed(our_shape))
    if transform == "conv":
        return (our_shape[1], 1, our_shape[0])
    return tuple(our_shape)


def resolve(module: Any, path: tuple[Any, ...]) -> Any:
    node = module
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def load_weights(module: Any, tensors: Mapping[str, np.ndarray], specs: list[WeightSpec],
                 source: str = "checkpoint") -> list[str]:
    """Copies every spec'd tensor into ``module``; returns the names of tensors no spec used."""
    used = set()
    for spec in specs:
        name = next((n for n in (spec.hf_name,) + spec.aliases if n in tensors), None)
        if name is None:
            names = " or ".join(repr(n) for n in (spec.hf_name,) + spec.aliases)
            raise CheckpointError(f"{source}: missing tensor {names}")
        param = resolve(module, spec.path)
        expected = hf_shape(tuple(param.shape), spec.transform)
        array = tensors[name]
        if tuple(array.shape) != expected:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the config "
                                  f"needs {expected}")
        param.set_value(jnp.asarray(_to_ours(np.asarray(array), spec.transform), dtype=param[...].dtype))
        used.add(name)
    return sorted(set(tensors) - used)


def export_weights(module: Any, specs: list[WeightSpec], dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) for every spec, one at a time."""
    for spec in specs:
        array = np.asarray(resolve(module, spec.path)[...])
        if dtype is not None:
            array = array.astype(dtype)
        yield spec.hf_name, np.ascontiguousarray(_to_hf(array, spec.transform))


def read_config(path, expected_cls, overrides: Mapping[str, Any]):
    """The model config of a local HF directory, checked to be of ``expected_cls``, with our own field
    overrides (compute_dtype=..., scan_impl=...) applied."""
    from configs import loader
    from configs.hf import model_config_from_hf

    config = model_config_from_hf(path)
    if not isinstance(config, expected_cls):
        raise CheckpointError(f"{str(path)!r}: config.json describes a {config.family!r} model, expected "
                              f"{expected_cls.family!r}")
    return loader.replace(config, **overrides) if overrides else config


def write_directory(model: Any, path, specs: list[WeightSpec], max_shard_bytes: int) -> None:
    """A HF directory: safetensors (sharded past max_shard_bytes, streamed tensor by tensor) + config.json,
    each written atomically."""
    import json
    import os
    from pathlib import Path

    from configs.hf import model_config_to_hf
    from runtime.safetensors_io import write_checkpoint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, export_weights(model, specs), max_shard_bytes=max_shard_bytes)
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(model_config_to_hf(model.config), indent=2))
    os.replace(tmp, path / "config.json")
