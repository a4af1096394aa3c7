"""The two model families, in one table: everything in experiments/ builds and loads models through here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
from flax import nnx

import ssm
import ssm.sharding
import transformer
import transformer.sharding
from configs.hf import model_config_from_hf
from configs.schema import FalconConfig, FalconMambaConfig
from experiments.mesh import build_mesh

class Family(NamedTuple):
    lm: type                      # the LM class: lm(config, seed=...)
    param_axes: Callable          # param_axes(config, mesh, rules): its parameter -> logical axes table
    from_pretrained: Callable     # its package's from_pretrained(path, mesh=, shardings=, **overrides)
    save_pretrained: Callable     # its package's save_pretrained(model, path)


# Model config type -> its family.
FAMILIES = {
    FalconMambaConfig: Family(ssm.FalconMambaLM, ssm.sharding.param_axes, ssm.from_pretrained, ssm.save_pretrained),
    FalconConfig: Family(transformer.FalconLM, transformer.sharding.param_axes, transformer.from_pretrained,
                         transformer.save_pretrained),
}


def family_of(config) -> Family:
    if type(config) not in FAMILIES:
        raise TypeError(f"config: expected one of {[c.__name__ for c in FAMILIES]}, got {type(config).__name__}")
    return FAMILIES[type(config)]


def build_model(config, seed: int = 0):
    """A randomly initialised model of the config's family."""
    return family_of(config).lm(config, seed=seed)


def n_params(model) -> int:
    """The number of parameters (nnx.Param elements) of a model."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def param_bytes(model) -> int:
    """The bytes its parameters occupy."""
    return int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def decode_read_bytes(model) -> int:
    """The parameter bytes batch-1 decode reads once per token: all of them but an untied input embedding, of which
    a step gathers one row (tied, the table is read whole as the output projection)."""
    untied = 0 if model.lm_head is None else model.input_embedding.embedding[...].nbytes
    return param_bytes(model) - int(untied)


def load_pretrained(path: str | os.PathLike, **overrides):
    """A local Hugging Face directory of either family (the family is read from its config.json)."""
    return family_of(model_config_from_hf(Path(path))).from_pretrained(path, **overrides)


def is_training_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run's output_dir (it has config.yaml) rather than a Hugging Face directory."""
    return (Path(path) / "config.yaml").is_file()


def check_model_path(path: str | os.PathLike) -> None:
    """FileNotFoundError naming ``path`` unless it is a training run's output_dir (config.yaml) or a local Hugging
    Face directory (config.json): a missing path was reported as a missing config.json inside it."""
    if not (is_training_run(path) or (Path(path) / "config.json").is_file()):
        problem = "does not exist" if not os.path.exists(path) else "has neither config.yaml nor config.json"
        raise FileNotFoundError(f"path: expected a training run's output_dir (config.yaml) or a local Hugging Face "
                                f"directory (config.json), got {str(path)!r}, which {problem}")


def check_step(path: str | os.PathLike, step: int | None) -> None:
    """ValueError unless ``step`` is None or ``path`` is a training run (a Hugging Face directory has one set of
    weights), checked before anything is loaded."""
    if step is not None and not is_training_run(path):
        raise ValueError(f"step: expected only with a training run's output_dir (config.yaml + checkpoints/), got "
                         f"{step} with {str(path)!r}, which has no config.yaml")


def model_config(path: str | os.PathLike):
    """The model config of a training run's output_dir (its config.yaml) or of a local Hugging Face directory (its
    config.json), read without loading any weights."""
    check_model_path(path)
    if is_training_run(path):
        from configs import load_config

        return load_config(Path(path) / "config.yaml", []).model
    return model_config_from_hf(Path(path))


def load_model(path: str | os.PathLike, step: int | None = None, compute_dtype: str | None = None, mesh=None):
    """(model, checkpoint step) of a training run's output_dir at ``step`` (default: the newest), or (model, None) of
    a local Hugging Face directory; ``compute_dtype`` None keeps the run's or the config's. ``mesh``: a MeshConfig
    whose axes the parameters are split over (by the run's mesh.rules, or the default rules for a Hugging Face
    directory); None: a run's on every local device (replicated), a Hugging Face directory's on the default
    device."""
    check_model_path(path)
    check_step(path, step)
    if is_training_run(path):
        from experiments.train import load_trained_model

        return load_trained_model(path, step, compute_dtype, mesh=mesh)
    placement = {} if mesh is None else {"mesh": build_mesh(mesh), "rules": mesh.rules}
    return load_pretrained(path, **placement, **({"compute_dtype": compute_dtype} if compute_dtype else {})), None
