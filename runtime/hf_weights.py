"""Moving weights between an NNX model and a Hugging Face state dict, described as data.

Each family lists WeightSpecs: the HF tensor name (plus accepted aliases), the attribute path of the NNX
parameter, and the layout change. Loading checks every tensor's presence and shape and names the tensor
when one is missing or misshapen; export yields (name, array) pairs one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.hf import model_config_to_hf
from runtime.files import write_text_atomic
from runtime.partitioning import auto_axes
from runtime.safetensors_io import CheckpointError, open_checkpoint_lazy, write_checkpoint

# Layout changes between HF (torch) and our parameters.
#   identity: same array.  linear: torch Linear weight (out, in) <-> our kernel (in, out).
#   conv: torch depthwise Conv1d weight (channels, 1, k) <-> our kernel (k, channels).
#   stacked_linear: a torch Linear weight whose output rows are P blocks of `out` (e.g. Mamba's in_proj, [x; z])
#     (P * out, in) <-> our kernel (in, P, out), the blocks on their own axis so that sharding `out` gives every
#     shard its slice of every block.  stacked: the matching bias (P * out,) <-> (P, out).
TRANSFORMS = ("identity", "linear", "conv", "stacked_linear", "stacked")


@dataclass(frozen=True)
class WeightSpec:
    hf_name: str
    path: tuple[Any, ...]
    transform: str = "identity"
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"WeightSpec {self.hf_name!r}: transform expected one of {TRANSFORMS}, "
                             f"got {self.transform!r}")


def _to_hf(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.T[:, None, :]
    if transform == "stacked_linear":
        return array.reshape(array.shape[0], -1).T
    if transform == "stacked":
        return array.reshape(-1)
    return array


def hf_shape(our_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "linear":
        return tuple(reversed(our_shape))
    if transform == "conv":
        return (our_shape[1], 1, our_shape[0])
    if transform == "stacked_linear":
        return (our_shape[1] * our_shape[2], our_shape[0])
    if transform == "stacked":
        return (our_shape[0] * our_shape[1],)
    return tuple(our_shape)


def _read_ours(hf_array, index: tuple[slice, ...], transform: str, shape: tuple[int, ...]) -> np.ndarray:
    """The slice ``index`` of our (transformed) array, read from the HF-layout array (a memory map: only
    the rows the slice needs are touched)."""
    if transform == "linear":
        return hf_array[index[1], index[0]].T
    if transform == "conv":
        return hf_array[index[1], 0, index[0]].T
    if transform in ("stacked_linear", "stacked"):
        part_axis = 1 if transform == "stacked_linear" else 0
        block = shape[part_axis + 1]
        out = range(*index[part_axis + 1].indices(block))
        parts = []
        for p in range(*index[part_axis].indices(shape[part_axis])):
            rows = slice(p * block + out.start, p * block + out.stop)
            parts.append(hf_array[rows, index[0]].T if transform == "stacked_linear" else hf_array[rows])
        return np.stack(parts, axis=part_axis)
    return hf_array[index]


def resolve(module: Any, path: tuple[Any, ...]) -> Any:
    node = module
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _tensor_name(tensors: Mapping[str, Any], spec: WeightSpec, source: str) -> str:
    """The checkpoint's name for ``spec``: its HF name or the first alias present; fails naming them all."""
    candidates = (spec.hf_name,) + spec.aliases
    name = next((n for n in candidates if n in tensors), None)
    if name is None:
        raise CheckpointError(f"{source}: missing tensor {' or '.join(repr(n) for n in candidates)}")
    return name


def param_path(path: tuple[Any, ...]) -> str:
    """The dotted parameter path ("layers.0.mixer.in_proj.kernel") of a WeightSpec path."""
    return ".".join(str(key) for key in path)


def sharding_from_rules(name: str, path: str, shape: tuple[int, ...], table, mesh, rules) -> Any:
    """NamedSharding of parameter ``path`` from a family's PARAM_AXES table and logical -> mesh axis rules
    (runtime.partitioning, the trainer's mapping). Fails naming the checkpoint tensor when a dimension does
    not divide."""
    from jax.sharding import NamedSharding

    from runtime.partitioning import MeshError, logical_axes, spec_for

    try:
        return NamedSharding(mesh, spec_for(f"tensor {name!r} (parameter {path!r})", shape,
                                            logical_axes(table, path), mesh, rules))
    except MeshError as err:
        raise CheckpointError(f"tensor {name!r}: {err}" if name not in str(err) else str(err)) from err


def _check_divisible(name: str, path: str, shape: tuple[int, ...], sharding) -> None:
    """Names the tensor when ``sharding`` cannot split ``shape`` evenly (a checkpoint/config that does not
    fit the mesh)."""
    if not isinstance(sharding, jax.sharding.Sharding):
        raise CheckpointError(f"tensor {name!r} (parameter {path!r}): expected a jax.sharding.Sharding from "
                              f"shardings, got {sharding!r}")
    try:
        shard = sharding.shard_shape(shape)
    except (ValueError, IndexError) as err:  # IndexError: a spec longer than the shape
        raise CheckpointError(f"tensor {name!r} (parameter {path!r}, shape {shape}) does not fit the mesh "
                              f"sharding {sharding}: {err}") from None
    if len(shard) != len(shape):
        raise CheckpointError(f"tensor {name!r} (parameter {path!r}): sharding {sharding} has rank "
                              f"{len(shard)}, the parameter has shape {shape}")


def load_weights_streaming(module: Any, tensors: Mapping[str, Any], specs: list[WeightSpec], shardings,
                           source: str = "checkpoint") -> list[str]:
    """Fills an abstract module (built with nnx.eval_shape) tensor by tensor, straight into sharded arrays.

    ``tensors``: name -> LazyTensor (runtime.safetensors_io.open_checkpoint_lazy) or array. ``shardings``:
    a callable (hf_name, param_path, shape) -> jax.sharding.Sharding. For each tensor, every addressable
    device's slice is read from a memory map of that tensor alone (the HF slice, transposed to our layout),
    converted to the parameter dtype and placed by jax.make_array_from_callback; the map is dropped before
    the next tensor. Host memory thus holds one tensor's pages plus one slice copy at a time, and a process
    reads only the slices of its own devices. Returns the names of tensors no spec used."""
    used = set()
    for spec in specs:
        name = _tensor_name(tensors, spec, source)
        param = resolve(module, spec.path)
        abstract = param.get_value()
        shape, dtype = tuple(abstract.shape), abstract.dtype
        expected = hf_shape(shape, spec.transform)
        source_tensor = tensors[name]
        if tuple(source_tensor.shape) != expected:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(source_tensor.shape)}, the config "
                                  f"needs {expected}")
        if not jnp.issubdtype(source_tensor.dtype, jnp.floating):  # an int tensor would load as a float of it
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {source_tensor.dtype}, expected a floating "
                                  f"point dtype (the parameter is {dtype})")
        path = param_path(spec.path)
        sharding = shardings(name, path, shape)
        _check_divisible(name, path, shape, sharding)
        hf_array = source_tensor.open() if hasattr(source_tensor, "open") else np.asarray(source_tensor)
        cache: dict[tuple, np.ndarray] = {}

        def callback(index, hf_array=hf_array, transform=spec.transform, dtype=dtype, cache=cache, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in cache:
                cache[key] = np.array(_read_ours(hf_array, index, transform, shape), dtype=dtype, copy=True)
            return cache[key]

        param.set_value(jax.make_array_from_callback(shape, sharding, callback))
        del hf_array, cache, callback
        used.add(name)
    leftover = [path for path, leaf in _leaves_with_paths(module) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if leftover:
        raise CheckpointError(f"{source}: parameters {leftover} were not filled from the checkpoint (no spec)")
    return sorted(set(tensors) - used)


def _leaves_with_paths(module: Any):
    state = nnx.state(module)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        yield jax.tree_util.keystr(path), leaf


def resolve_shardings(mesh=None, rules=None, shardings=None, table=None):
    """(hf_name, param_path, shape) -> Sharding, from what a from_pretrained caller gave:
    ``shardings`` {param path: Sharding} (e.g. experiments.mesh.param_shardings) or a callable of the path;
    or ``mesh`` plus optional ``rules`` (logical axis -> mesh axes over DEFAULT_SHARDING_RULES) with the
    family's parameter -> logical axes ``table``; or nothing: the default device."""
    from jax.sharding import SingleDeviceSharding

    if shardings is not None and mesh is not None:
        raise CheckpointError("mesh, shardings: expected at most one of them (shardings places every parameter), "
                              "got both")
    if shardings is not None:
        if callable(shardings):
            return lambda name, path, shape: _on_auto_axes(shardings(path))

        def lookup(name, path, shape):
            if path not in shardings:
                raise CheckpointError(f"tensor {name!r}: shardings has no entry for parameter {path!r}")
            return _on_auto_axes(shardings[path])
        return lookup
    if mesh is not None:
        from configs.schema import merged_rules
        from runtime.partitioning import check_mesh_axes

        check_mesh_axes(mesh)
        merged = merged_rules(rules)
        return lambda name, path, shape: sharding_from_rules(name, path, shape, table, mesh, merged)
    device = SingleDeviceSharding(jax.devices()[0])
    return lambda name, path, shape: device


def _on_auto_axes(sharding):
    """A NamedSharding moved onto its mesh's devices and axes with every axis Auto (runtime.partitioning.auto_axes);
    any other sharding as it is."""
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
        return jax.sharding.NamedSharding(auto_axes(sharding.mesh), sharding.spec, memory_kind=sharding.memory_kind)
    return sharding


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


def check_all_tensors_used(tensors: Mapping[str, Any], specs: list[WeightSpec], config, source: str) -> None:
    """Refuses a checkpoint holding tensors that no spec reads: the sign of a config that does not describe it
    (a missing num_hidden_layers falling back to its default, say), which would otherwise load a cut-down model.
    Ignored, as transformers ignores them: rotary inv_freq buffers (rotary_emb, TII's maybe_rotary), and
    lm_head.weight when the config ties the output projection to the embeddings and it equals them (one that
    differs is refused: transformers 5 then loads the two untied, another model than the tied one)."""
    used = {_tensor_name(tensors, spec, source) for spec in specs}
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in tensors:
        embedding = _tensor_name(tensors, next(spec for spec in specs if spec.path[-1] == "embedding"), source)
        if not _same_values(tensors["lm_head.weight"], tensors[embedding]):
            raise CheckpointError(f"{source}: 'lm_head.weight' differs from {embedding!r}, but config.json ties "
                                  f"them (tie_word_embeddings true, transformers' default); transformers loads a "
                                  f"stored head that differs untied: pass tie_word_embeddings=False to load it")
    left = sorted(name for name in set(tensors) - used if not name.endswith(".inv_freq")
                  and not (name == "lm_head.weight" and tied))
    if left:
        shown = ", ".join(repr(n) for n in left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise CheckpointError(f"{source}: {len(left)} tensor(s) that the config does not use: {shown}; "
                              f"does config.json describe this checkpoint (num_hidden_layers "
                              f"{getattr(config, 'num_hidden_layers', '?')})?")


def _same_values(a, b, rows: int = 4096) -> bool:
    """Whether two (lazy) 2-D tensors are equal, compared a block of rows at a time (bounded host memory)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    a, b = (x.open() if hasattr(x, "open") else np.asarray(x) for x in (a, b))
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def load_directory(path, config_cls, model_cls, weight_specs, param_axes, *, mesh=None, rules=None,
                   shardings=None, overrides: Mapping[str, Any], check_tensors=None) -> Any:
    """A family's from_pretrained: the config of a local HF directory (``read_config``), the model built
    abstractly (nnx.eval_shape: no random init), then each parameter read tensor by tensor from memory maps
    straight into its device array, placed as ``resolve_shardings`` says with the family's
    ``param_axes(config, mesh, rules)`` table. A checkpoint with tensors the config does not use (more layers
    than num_hidden_layers, say) is refused before anything is read (``check_all_tensors_used``), as is one that
    ``check_tensors(tensors, config, source)`` rejects."""
    config = read_config(Path(path), config_cls, overrides)
    if isinstance(mesh, jax.sharding.Mesh):
        mesh = auto_axes(mesh)  # a jax.make_mesh mesh's Explicit axes
    model = nnx.eval_shape(lambda: model_cls(config))
    tensors = open_checkpoint_lazy(path)
    specs = weight_specs(config)
    check_all_tensors_used(tensors, specs, config, str(path))
    if check_tensors is not None:
        check_tensors(tensors, config, str(path))
    load_weights_streaming(model, tensors, specs,
                           resolve_shardings(mesh, rules, shardings, param_axes(config, mesh, rules)),
                           source=str(path))
    if rules is not None:
        model.set_sharding_rules(rules)  # its calls split its rows and are traced as the rules say (CausalLM)
    return model


def write_directory(model: Any, path, model_cls: type, weight_specs, max_shard_bytes: int) -> None:
    """A family's save_pretrained: a HF directory of safetensors (sharded past max_shard_bytes, streamed tensor
    by tensor) + config.json, each written atomically, for a ``model_cls`` model (another family's model failed
    on a missing attribute)."""
    if not isinstance(model, model_cls):
        raise TypeError(f"model: expected a {model_cls.__name__}, got {type(model).__name__}")
    specs = weight_specs(model.config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, export_weights(model, specs), max_shard_bytes=max_shard_bytes)
    write_text_atomic(path / "config.json", json.dumps(model_config_to_hf(model.config), indent=2))
