"""Logical axes -> mesh axes: the PartitionSpec of an array from the logical names of its dimensions (a
family's PARAM_AXES table) and the logical -> mesh axis rules (configs.schema.DEFAULT_SHARDING_RULES merged
with mesh.rules). The one mapping the trainer (experiments.mesh) and the checkpoint loader
(runtime.hf_weights) share; every error names the array, the mesh axis and the dimension that does not fit."""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from typing import Mapping

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

from configs.schema import DEFAULT_SHARDING_RULES, MESH_AXES


class MeshError(ValueError):
    """The mesh does not fit the devices, or a dimension does not divide over its mesh axes."""


def logical_axes(table, path: str) -> tuple[str, ...]:
    """The logical axis names a family's PARAM_AXES table gives the parameter at ``path``."""
    for pattern, axes in table:
        if re.fullmatch(pattern, path):
            return axes
    raise MeshError(f"parameter {path!r}: no entry in the family's PARAM_AXES table")


def check_mesh_axes(mesh: Mesh) -> None:
    """A mesh given by a caller (not built by experiments.mesh) splits only over the mesh axes the sharding rules
    name (configs.schema.MESH_AXES); an axis of size > 1 under another name would silently split nothing."""
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise MeshError(f"mesh: expected a jax.sharding.Mesh, got {mesh!r}")
    unknown = {a: n for a, n in mesh.shape.items() if a not in MESH_AXES and n > 1}
    if unknown:
        raise MeshError(f"mesh: axes {unknown} are not mesh axes the sharding rules use; expected names among "
                        f"{list(MESH_AXES)} (axes the mesh lacks count as size 1), got mesh axes {dict(mesh.shape)}")


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of them)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis Auto (what experiments.mesh builds): the models are written for XLA's sharding
    propagation. Arrays placed on Explicit axes (jax.make_mesh's default) carry their shardings in their types, and
    the models' first gather from a split embedding then fails with a ShardingTypeError."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def split_over(mesh: Mesh, mesh_axes) -> tuple[tuple[str, ...], int, str]:
    """The axes of ``mesh_axes`` that split anything (size > 1; an axis the mesh lacks splits nothing), how many
    parts they make, and how an error message names them ("fsdp=2 x tensor=4")."""
    axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
    return axes, math.prod(mesh.shape[a] for a in axes), " x ".join(f"{a}={mesh.shape[a]}" for a in axes)


def spec_for(name: str, shape: tuple[int, ...], logical: tuple[str, ...], mesh: Mesh,
             rules: Mapping[str, tuple[str, ...]]) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have the given logical names; checks divisibility."""
    if len(logical) != len(shape):
        raise MeshError(f"{name}: {len(logical)} logical axes {logical} for an array of shape {shape}")
    used: set[str] = set()
    spec = []
    for dim, (size, axis_name) in enumerate(zip(shape, logical)):
        if axis_name not in rules:
            raise MeshError(f"{name}: logical axis {axis_name!r} has no entry in mesh.rules "
                            f"(known: {sorted(rules)})")
        axes, parts, across = split_over(mesh, rules[axis_name])
        if used & set(axes):
            raise MeshError(f"{name}: mesh axes {sorted(used & set(axes))} would split two dimensions "
                            f"(logical axes {logical}, mesh.rules)")
        used |= set(axes)
        if size % parts:
            raise MeshError(f"{name}: dimension {dim} ({axis_name!r}) has size {size}, which is not divisible "
                            f"by mesh axes {across} (mesh.rules.{axis_name} = {list(rules[axis_name])})")
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def batch_axes(mesh: Mesh | AbstractMesh, rows: int, rule=DEFAULT_SHARDING_RULES["batch"]) -> tuple[str, ...]:
    """The mesh axes of ``rule`` (the rules' 'batch' entry; by default data, fsdp) that split anything on ``mesh``
    and whose sizes multiply to a divisor of ``rows``: all of them, else the longest leading run of them that does
    (data=2 x fsdp=2 and 2 rows: data), else () (the rows whole on every device)."""
    axes, _, _ = split_over(mesh, rule)
    while axes and rows % math.prod(mesh.shape[axis] for axis in axes):
        axes = axes[:-1]
    return axes


# ----------------------------------------------------------------------------------------------------------
# what a model's trace reads of the mesh it is traced under

_RULES: contextvars.ContextVar = contextvars.ContextVar("sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Mapping[str, tuple[str, ...]]):
    """Within: the logical -> mesh axis rules (the run's, mesh.rules applied) that ``traced_axes`` reads while
    a model is traced; outside, configs.schema.DEFAULT_SHARDING_RULES. traced_under sets them together with the
    mesh a trace runs under."""
    token = _RULES.set(dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


@contextlib.contextmanager
def traced_under(mesh: Mesh | AbstractMesh, rules: Mapping[str, tuple[str, ...]]):
    """Within: a trace runs under ``mesh`` (its abstract mesh: jax.sharding.use_abstract_mesh) and ``rules``
    (use_rules), so that what the models read of them (traced_axes, constrain, the Pallas scan's shard_map) applies:
    the trainer's step, the runtime's calls on a mesh and the planner's compiled chunk are traced so. Nothing changes
    for a mesh of one device or one with axes that are not Auto (Explicit axes carry their shardings in the arrays'
    types)."""
    if mesh.size == 1 or any(kind != AxisType.Auto for kind in mesh.axis_types):
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), use_rules(rules):
        yield


def _traced_auto_mesh():
    """The mesh the current trace runs under (jax.sharding.use_abstract_mesh), or None without one or where it has
    axes that are not Auto (Explicit axes carry their shardings in the arrays' types: nothing to add)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types) else mesh


def traced_axes(logical: str) -> tuple[tuple[str, ...], int]:
    """The mesh axes that split logical axis ``logical`` in the mesh the current trace runs under, and how many
    parts they make; ((), 1) without such a mesh (_traced_auto_mesh)."""
    mesh = _traced_auto_mesh()
    if mesh is None:
        return (), 1
    rules = _RULES.get() or DEFAULT_SHARDING_RULES
    axes, parts, _ = split_over(mesh, rules[logical])
    return axes, parts


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained, under the traced mesh, to the sharding its dimensions' logical axes give (None: whole on
    every device); a dimension its axes do not divide is left to XLA. The identity without a mesh."""
    if _traced_auto_mesh() is None:
        return x
    spec = []
    for size, name in zip(x.shape, logical):
        axes, parts = traced_axes(name) if name else ((), 1)
        spec.append(PartitionSpec.UNCONSTRAINED if size % parts else None if not axes
                    else axes[0] if len(axes) == 1 else axes)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
