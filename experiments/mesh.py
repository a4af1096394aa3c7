"""The device mesh and the shardings of parameters, optimizer state and batches.

Parameters are handled as a flat dict {path: array} with dotted paths ("layers.0.mixer.in_proj.kernel").
A family's PARAM_AXES table names each parameter's logical axes; the run's ``mesh.rules`` maps logical axes to
mesh axes. Every error names the mesh axis, its size and the parameter dimension that does not fit.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from configs.schema import MESH_AXES, MeshConfig
from runtime.partitioning import MeshError, entry_axes, logical_axes, spec_for  # noqa: F401  (re-exported)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Axis sizes (data, fsdp, tensor) with -1 resolved; fails unless their product is ``num_devices``."""
    sizes = {axis: getattr(config, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    described = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise MeshError(f"mesh.{axis}=-1: the other axes ({described}) use {fixed} devices, which does "
                                f"not divide the {num_devices} devices available")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh: {described} needs {math.prod(sizes.values())} devices, but {num_devices} are "
                        f"available (jax.device_count()); set the sizes to multiply to {num_devices}, or one "
                        "axis to -1")
    return tuple(sizes[axis] for axis in MESH_AXES)


def build_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over ``devices`` (all global devices by default)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise MeshError("devices: expected at least one device, got none")
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_axes_used(axis_sizes: Mapping[str, int], shardings) -> None:
    """MeshError unless every mesh axis of size > 1 shards something among ``shardings`` (NamedShardings or
    PartitionSpecs): with mesh.rules that map no parameter or batch dimension to an axis, each device along it
    would repeat the same work."""
    used = set()
    for sharding in shardings:
        for entry in getattr(sharding, "spec", sharding):
            used.update(entry_axes(entry))
    idle = [f"mesh.{axis}={size}" for axis, size in axis_sizes.items() if size > 1 and axis not in used]
    if idle:
        raise MeshError(f"mesh.rules: expected every mesh axis of size > 1 to shard a parameter or the batch, got "
                        f"{', '.join(idle)} that no rule maps a dimension to (each device along it would repeat "
                        f"the others' work); map a logical axis to it, or set its size to 1")


def _path_name(path) -> str:
    keys = [k.key if isinstance(k, jax.tree_util.DictKey) else k.idx for k in path
            if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey))]
    return ".".join(str(key) for key in keys)


def flatten_params(state: Any) -> tuple[dict[str, Any], Any]:
    """nnx.State (or an abstract one) -> ({"layers.0.mixer.D": array, ...}, structure for unflatten_params)."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [_path_name(path) for path, _ in leaves_with_paths]
    return dict(zip(names, (leaf for _, leaf in leaves_with_paths))), (tuple(names), treedef)


def unflatten_params(flat: Mapping[str, Any], structure) -> Any:
    """The inverse of flatten_params: an nnx.State that nnx.merge accepts."""
    names, treedef = structure
    return jax.tree_util.tree_unflatten(treedef, [flat[name] for name in names])


def param_shardings(abstract: Mapping[str, Any], table, mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]]) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for the flat (abstract) parameters."""
    return {path: NamedSharding(mesh, spec_for(f"parameter {path!r}", tuple(leaf.shape),
                                               logical_axes(table, path), mesh, rules))
            for path, leaf in abstract.items()}


def opt_state_shardings(abstract_opt_state: Any, shardings: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
    """Each optimizer-state leaf stored under a parameter's path (Adam's mu and nu) takes that parameter's
    sharding; everything else (step counts) is replicated."""
    def pick(path, leaf):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return shardings[keys[-1]] if keys and keys[-1] in shardings else NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of a (grad_accum, batch, seq) array: the batch dimension split per rules["batch"]."""
    spec = spec_for("data.batch_size / data.grad_accum (the per-step microbatch)", shape,
                    ("accum", "batch", "seq"), mesh, {**rules, "accum": (), "seq": ()})
    return NamedSharding(mesh, spec)


def put_global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (each keeps its own shards)."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
