"""Memory planner: how many bytes each device holds for a run, counted from what the code allocates.

    python -m experiments.plan CONFIG [key=value ...] [--json]
    python -m experiments.plan falcon_180b mode=inference dtype=bfloat16 devices=8 mesh.data=1 mesh.tensor=8
    python -m experiments.plan falcon_180b devices=64 mesh.data=1 mesh.fsdp=8 mesh.tensor=8 batch=64 seq_len=2048
    python -m experiments.plan falcon_mamba_7b mode=inference dtype=bfloat16 devices=1 batch=1 seq_len=1048576

Planner options (every other key=value is a config override, e.g. mesh.fsdp=8, remat=full):
    devices=N        number of devices (default: this host's); more than this host has -> an abstract mesh
    mode=M           training (params + optimizer + gradients + activations) or inference (params + cache +
                     activations of one prefill chunk)
    dtype=D          float32 | bfloat16: model.compute_dtype; in inference also model.param_dtype (training
                     keeps fp32 master weights, as experiments.train requires)
    batch=N          data.batch_size (global); seq_len=N (alias seq): data.seq_len, and the KV cache length
    optimizer=O      adamw (experiments.optim.make_optimizer, the trainer's) | sgd (no state)
    activations=A    auto | compiled | estimate; chunk=N: the inference prefill chunk (default 2048), at most
                     seq_len (prefill runs a longer chunk as one chunk of the whole sequence)
    target=T         a TPU slice, e.g. v5p:4x4x4 (64 chips), v6e:2x4: compile for its chips with libtpu (no TPU
                     needed, experiments/tpu_topology.py); the compiler's peak against a chip's HBM, or DoesNotFit
                     with its figures. devices= is the chip count. Falcon Mamba's scan_impl=auto becomes what it
                     resolves to on a TPU ("chunked")

How the numbers are counted (see docs/PLANNING.md):
  * params / optimizer: shapes from nnx.eval_shape / jax.eval_shape of the trainer's own init (experiments.train
    .prepare), each leaf's per-device shard shape from its real NamedSharding (sharding.shard_shape).
  * cache: jax.eval_shape of model.init_state(batch, seq_len), sharded over the batch (mesh.rules.batch) and
    the kv-head / d_inner dimension (tensor) where those divide, else replicated.
  * activations, "compiled": XLA's memory_analysis().temp_size_in_bytes of the jitted train step (or prefill
    chunk) lowered on the real mesh: everything the step allocates besides its arguments and outputs
    (activations, gradients, workspace). Used when the mesh's devices exist here and the model is small, and
    for any model with target= (XLA's TPU compiler, whose buffer assignment remat shrinks as on the TPU).
  * activations, "estimate": the residuals one decoder layer saves for its backward pass
    (jax.ad_checkpoint.saved_residuals of the layer's forward on the per-device batch) x layers, plus the
    residuals of the final norm + lm_head + cross entropy, plus fp32 gradients sharded like the parameters.
    Inference: the sum of every intermediate of one layer's forward on one prefill chunk (an upper bound on a
    layer's working set) plus the last-position logits.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from configs import load_config
from configs.loader import replace
from configs.schema import MESH_AXES, ConfigError, FalconMambaConfig, RunConfig
from experiments.cli import run_config_command
from experiments.mesh import (build_mesh, flatten_params, mesh_shape, opt_state_shardings, param_shardings,
                              unflatten_params)
from experiments.models import family_of
from experiments.tpu_topology import hbm_bytes, parse_topology, tpu_devices
from runtime.checks import is_integer
from runtime.partitioning import batch_axes, traced_under
from ssm.scan import resolve_impl

OPTIONS = ("devices", "mode", "dtype", "batch", "seq_len", "seq", "optimizer", "activations", "chunk", "target")
MODES = ("training", "inference")
OPTIMIZERS = ("adamw", "sgd")
COMPILE_MAX_PARAMS = 50_000_000   # above this, compiling the step on CPU is too slow: estimate instead


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def per_device_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of every leaf of ``abstract`` under the matching leaf of ``shardings`` (the
    largest shard: NamedSharding shards of evenly divisible arrays are all equal)."""
    leaves = jax.tree.leaves(abstract)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(shard_leaves)} shardings")
    return sum(_nbytes(sh.shard_shape(tuple(leaf.shape)), leaf.dtype) for leaf, sh in zip(leaves, shard_leaves))


def make_mesh(run: RunConfig, devices: int, target_devices: list | None = None):
    """The mesh of ``target_devices`` (a TPU slice's, tpu_topology.tpu_devices) if given; else the real mesh when
    ``devices`` is this host's device count, else an AbstractMesh of that size."""
    if target_devices is not None:
        return build_mesh(run.mesh, target_devices), True
    if devices == jax.device_count():
        return build_mesh(run.mesh), True
    return AbstractMesh(mesh_shape(run.mesh, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)), False


def cache_shardings(graphdef, abstract_params, p_shardings, structure, abstract_state, mesh, rules):
    """Shardings of a DecodeState, the runtime's own (CausalLM.state_shardings on the abstract model with its
    parameters placed by ``p_shardings``): kv heads or d_inner (and d_state) split like the parameters that
    compute them, the rows over rules['batch'] where they divide."""
    placed = {path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=p_shardings[path])
              for path, leaf in abstract_params.items()}
    model = nnx.merge(graphdef, unflatten_params(placed, structure))
    model.set_sharding_rules(rules)
    return jax.tree.unflatten(jax.tree.structure(abstract_state),
                              model.state_shardings(mesh, abstract_state.lengths.shape[0]))


def tensor_split_sizes(config, mesh, rules) -> dict[int, int]:
    """Feature sizes that the parameter sharding splits over the mesh (the activations along them are split
    the same way by GSPMD): the vocabulary (rule 'vocab': the logits); Falcon's head count, qkv rows and ffn
    width (rules 'heads', 'mlp'); Falcon Mamba's d_inner and 2 * d_inner (rule 'd_inner'). Size -> number of
    parts. The hidden size (the residual stream) is never counted as split."""
    def parts(logical):
        return math.prod(mesh.shape[a] for a in rules.get(logical, ()) if mesh.shape[a] > 1)
    sizes = {config.vocab_size: parts("vocab")}
    if isinstance(config, FalconMambaConfig):
        sizes |= {config.intermediate_size: parts("d_inner"), 2 * config.intermediate_size: parts("d_inner")}
    else:
        rows = (config.num_attention_heads + 2 * config.kv_heads) * config.head_dim
        sizes |= {config.num_attention_heads: parts("heads"), rows: parts("heads"),
                  config.ffn_hidden_size: parts("mlp")}
        if config.qkv_layout == "grouped":  # attention runs per kv group: (batch, kv_heads, heads / kv_heads, ..)
            sizes[config.kv_heads] = parts("heads")
    return {size: n for size, n in sizes.items() if n > 1 and size % n == 0 and size != config.hidden_size}


def _split_bytes(shape, dtype, split: dict[int, int], batch: int) -> int:
    """Per-device bytes of an activation (batch already per device) whose other dimensions are global: the
    first dimension after the batch (dimension 0, or 1 under a scan's block axis) whose size the parameter
    sharding splits is divided."""
    start = 1 if shape[0] == batch else 2
    for dim in shape[start:]:
        if dim in split:
            return _nbytes(shape, dtype) // split[dim]
    return _nbytes(shape, dtype)


def _param_shapes(params) -> set:
    shapes = set()
    for leaf in jax.tree.leaves(params):
        shapes |= {tuple(leaf.shape), tuple(reversed(leaf.shape))}
    return shapes


def _residual_bytes(fn, args, batch: int, split: dict[int, int]) -> int:
    """Bytes of the residuals ``fn`` saves for its backward pass (activations; the parameters themselves and
    arrays of a parameter's shape, i.e. its compute-dtype casts, are left out: they are weights)."""
    from jax._src.ad_checkpoint import saved_residuals
    weights = _param_shapes(args[0])
    total = 0
    for aval, where in saved_residuals(fn, *args):
        if aval.shape and "from the argument params" not in where and tuple(aval.shape) not in weights:
            total += _split_bytes(aval.shape, aval.dtype, split, batch)
    return total


def _intermediate_bytes(fn, args, split: dict[int, int], batch: int) -> int:
    """Sum of every intermediate of ``fn``'s jaxpr (an upper bound on its working set); weights and their
    casts left out."""
    weights = _param_shapes(args[0])
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(_split_bytes(v.aval.shape, v.aval.dtype, split, batch) for eqn in jaxpr.jaxpr.eqns
               for v in eqn.outvars if getattr(v.aval, "shape", ()) and tuple(v.aval.shape) not in weights)


def _layer_fn(abstract_model, config):
    """(graphdef, abstract params, fn(params, x) -> y) for the first decoder layer of either family."""
    if isinstance(config, FalconMambaConfig):
        layer = abstract_model.layers[0]
        graphdef, params = nnx.split(layer, nnx.Param)

        def fn(params, x):
            return nnx.merge(graphdef, params)(x)[0]
    else:
        layer = abstract_model.h[0]
        graphdef, params = nnx.split(layer, nnx.Param)

        def fn(params, x):
            seq = x.shape[1]
            rope, key_bias = abstract_model.position_terms(jnp.arange(seq), seq)
            return nnx.merge(graphdef, params)(x, rope, key_bias)[0]
    return params, fn


def estimate_activations(run: RunConfig, abstract_model, mode: str, local_batch: int, seq: int, mesh) -> dict:
    """Per-device activation bytes from one layer's shapes (see the module docstring)."""
    cfg = run.model
    split = tensor_split_sizes(cfg, mesh, run.mesh.rules)
    compute = jnp.dtype(cfg.compute_dtype)
    params, fn = _layer_fn(abstract_model, cfg)
    x = jax.ShapeDtypeStruct((local_batch, seq, cfg.hidden_size), jnp.float32 if getattr(
        cfg, "residual_in_fp32", False) else compute)
    if mode == "inference":
        layer = _intermediate_bytes(fn, (params, x), split, local_batch)
        logits = _nbytes((local_batch, cfg.vocab_size), jnp.float32)
        return {"bytes": layer + logits, "per_layer": layer,
                "method": f"estimate: intermediates of one layer's forward on a ({local_batch}, {seq}) chunk "
                          "+ last-position logits"}
    per_layer = _residual_bytes(fn, (params, x), local_batch, split)
    input_only = _nbytes(x.shape, x.dtype)
    head_params = nnx.split(abstract_model, nnx.Param)[1]
    graphdef = nnx.graphdef(abstract_model)
    targets = jax.ShapeDtypeStruct((local_batch, seq), jnp.int32)

    def head(params, h, targets):
        model = nnx.merge(graphdef, params)
        norm = model.norm_f if isinstance(cfg, FalconMambaConfig) else model.ln_f
        logits = model.logits(norm(h))
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    head_bytes = _residual_bytes(head, (head_params, x, targets), local_batch, split)
    layers = cfg.num_hidden_layers
    if run.remat == "none":
        total = layers * per_layer + head_bytes
        method = (f"estimate: {layers} layers x {per_layer} B saved residuals per layer (saved_residuals of one "
                  f"layer's forward on the per-device batch {local_batch} x {seq}) + {head_bytes} B "
                  f"lm_head/cross-entropy residuals")
    else:
        from experiments.train import REMAT_POLICIES
        kept = _residual_bytes(jax.checkpoint(fn, policy=REMAT_POLICIES[run.remat]), (params, x), local_batch,
                               split)
        kept = max(kept, input_only)  # the layer's input is kept whatever the policy (it is the remat boundary)
        total = layers * kept + per_layer + head_bytes
        method = (f"estimate, remat={run.remat} (per layer): {layers} layers x {kept} B kept per layer (its "
                  f"input{'' if run.remat == 'full' else ' and matmul outputs'}) + {per_layer} B residuals of the "
                  f"one layer being recomputed + {head_bytes} B lm_head/cross-entropy residuals, on the per-device "
                  f"batch {local_batch} x {seq}")
    return {"bytes": total, "per_layer": per_layer, "method": method}


class DoesNotFit(ValueError):
    """XLA's TPU compiler refused the step for target=: it needs more HBM than a chip has (the message gives the
    compiler's figures)."""


def _compile(lower, target: str | None):
    """lower().compile(). For a TPU target: a program the compiler finds over a chip's HBM is DoesNotFit; a Pallas
    scan whose channels the TPU kernel cannot lay out (its lowering has no TPU branch) a ConfigError."""
    try:
        return lower().compile()
    except NotImplementedError as err:
        if target is None or "platform_index" not in str(err):
            raise
        raise ConfigError(f"target {target}: model.scan_impl 'pallas' has no TPU kernel for these channels (it needs "
                          f"d_inner per chip a multiple of 128, or at most 128); use 'chunked'") from None
    except jax.errors.JaxRuntimeError as err:
        if target is None or "RESOURCE_EXHAUSTED" not in str(err) or "HBM" not in str(err):
            raise
        raise DoesNotFit(f"target {target}: does not fit one chip: XLA's TPU compiler: "
                         f"{str(err).splitlines()[0]}") from None


def _compiled_bytes(analysis) -> dict[str, int]:
    """XLA's own counts for the compiled step: its arguments and its peak (arguments, outputs and temporaries by
    their live ranges: below the planner's total, which adds the temporaries to everything)."""
    return {"compiled_argument_bytes": int(analysis.argument_size_in_bytes),
            "compiled_peak_bytes": int(analysis.peak_memory_in_bytes)}


def _for_tpu(run: RunConfig, target: str) -> tuple[RunConfig, list]:
    """(run with what "auto" picks on a TPU, the devices of the TPU slice ``target``)."""
    if isinstance(run.model, FalconMambaConfig):
        run = replace(run, model=replace(run.model, scan_impl=resolve_impl(run.model.scan_impl, "tpu")))
    try:
        return run, tpu_devices(target)
    except RuntimeError as err:  # no libtpu
        raise ConfigError(f"plan option 'target': {err}") from None


def plan(config: str, overrides: list[str] | tuple[str, ...] = (), *, devices: int | None = None,
         mode: str = "training", dtype: str | None = None, batch: int | None = None, seq_len: int | None = None,
         optimizer: str = "adamw", activations: str = "auto", chunk: int | None = None,
         target: str | None = None) -> dict:
    """The plan as a dict: {"params": N, "devices": N, "per_device_bytes": {...}, ...}. ``chunk`` (inference): the
    prefill chunk, a positive integer, counted as min(chunk, seq_len) as prefill runs it (default 2048).
    ``target``: a TPU slice (e.g. "v5p:4x4x4") to compile for instead of this host's devices."""
    from experiments.train import jit_train_step, prepare

    if mode not in MODES:
        raise ConfigError(f"plan option 'mode': expected one of {list(MODES)}, got {mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"plan option 'optimizer': expected one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if activations not in ("auto", "compiled", "estimate"):
        raise ConfigError(f"plan option 'activations': expected auto, compiled or estimate, got {activations!r}")
    if chunk is not None and not (is_integer(chunk) and chunk > 0):  # a NumPy integer too, as prefill takes
        raise ConfigError(f"plan option 'chunk': expected a positive integer, got {chunk!r}")
    overrides = list(overrides)
    if dtype is not None:
        overrides.append(f"model.compute_dtype={dtype}")
        if mode == "inference":
            overrides.append(f"model.param_dtype={dtype}")
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
        overrides.append("data.grad_accum=1")
    if seq_len is not None:
        overrides.append(f"data.seq_len={seq_len}")
    run = load_config(config, overrides)
    target_devices = None
    if target is not None:
        try:
            chips = math.prod(parse_topology(target)[1])
        except ValueError as err:
            raise ConfigError(f"plan option 'target': {err}") from None
        if devices is not None and devices != chips:
            raise ConfigError(f"plan option 'devices': expected the {chips} chips of target {target} (or no "
                              f"devices=), got {devices!r}")
        run, target_devices = _for_tpu(run, target)
        devices = chips
    devices = jax.device_count() if devices is None else devices
    if not isinstance(devices, int) or devices <= 0:
        raise ConfigError(f"plan option 'devices': expected a positive integer, got {devices!r}")
    mesh, concrete = make_mesh(run, devices, target_devices)
    rules = run.mesh.rules
    family = family_of(run.model)
    table = family.param_axes(run.model, mesh, rules)
    abstract_model = nnx.eval_shape(lambda: family.lm(run.model, seed=run.seed))
    graphdef, abstract_params_state = nnx.split(abstract_model, nnx.Param)
    abstract_params, structure = flatten_params(abstract_params_state)
    n_params = sum(math.prod(leaf.shape) for leaf in abstract_params.values())
    seq = run.data.seq_len
    result: dict[str, Any] = {
        "config": config, "family": run.model.family, "mode": mode, "devices": devices,
        "mesh": dict(zip(MESH_AXES, mesh_shape(run.mesh, devices))), "params": n_params,
        "param_dtype": run.model.param_dtype if mode == "inference" else "float32",
        "compute_dtype": run.model.compute_dtype, "batch_size": run.data.batch_size, "seq_len": seq,
    }
    bytes_: dict[str, int] = {"params": 0, "optimizer": 0, "gradients": 0, "activations": 0, "cache": 0}
    want_compiled = activations == "compiled" or (activations == "auto" and (
        n_params <= COMPILE_MAX_PARAMS or target is not None))
    if want_compiled and not concrete:
        if activations == "compiled":
            raise ConfigError(f"plan option 'activations=compiled' needs the mesh's {devices} devices on this host "
                              f"(it has {jax.device_count()}); use activations=estimate")
        want_compiled = False

    if mode == "training":
        setup = prepare(run, mesh)
        tx = setup.tx if optimizer == "adamw" else optax.sgd(run.optim.learning_rate)
        p_shardings = setup.state_shardings["params"]
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        o_shardings = opt_state_shardings(abstract_opt, p_shardings, mesh)
        bytes_["params"] = per_device_bytes(abstract_params, p_shardings)
        bytes_["optimizer"] = per_device_bytes(abstract_opt, o_shardings)
        micro = run.data.batch_size // run.data.grad_accum
        b_shape = (run.data.grad_accum, micro, seq)
        local_batch = setup.batch_sharding.shard_shape(b_shape)[1]
        if want_compiled:
            state_shardings = {"params": p_shardings, "opt_state": o_shardings, "step": setup.state_shardings["step"]}
            abstract_state = {"params": abstract_params, "opt_state": abstract_opt,
                              "step": jax.ShapeDtypeStruct((), jnp.int32)}
            abstract_batch = {"inputs": jax.ShapeDtypeStruct(b_shape, jnp.int32),
                              "targets": jax.ShapeDtypeStruct(b_shape, jnp.int32),
                              "mask": jax.ShapeDtypeStruct(b_shape, jnp.float32)}
            step = jit_train_step(setup._replace(tx=tx, state_shardings=state_shardings), run)
            analysis = _compile(lambda: step.lower(abstract_state, abstract_batch), target).memory_analysis()
            bytes_["activations"] = int(analysis.temp_size_in_bytes)
            result["activations_method"] = ("compiled: memory_analysis().temp_size_in_bytes of the jitted train "
                                            "step on this mesh (activations + gradients + workspace)")
            result |= _compiled_bytes(analysis)
        else:
            est = estimate_activations(run, abstract_model, mode, local_batch, seq, mesh)
            bytes_["activations"] = est["bytes"]
            bytes_["gradients"] = per_device_bytes(abstract_params, p_shardings)  # fp32, sharded like params
            result["activations_method"] = est["method"] + "; gradients: fp32, sharded like the parameters"
    else:
        p_shardings = param_shardings(abstract_params, table, mesh, rules)
        bytes_["params"] = per_device_bytes(abstract_params, p_shardings)
        abstract_cache = jax.eval_shape(lambda: abstract_model.init_state(run.data.batch_size, seq))
        c_shardings = cache_shardings(graphdef, abstract_params, p_shardings, structure, abstract_cache, mesh,
                                      rules)
        bytes_["cache"] = per_device_bytes(abstract_cache, c_shardings)
        chunk = min(seq, 2048 if chunk is None else chunk)  # prefill's chunks never exceed the sequence
        ids_shape = (run.data.batch_size, chunk)
        rows = batch_axes(mesh, run.data.batch_size, rules["batch"])  # the runtime's split (CausalLM._rows_split)
        local_batch = run.data.batch_size // math.prod(mesh.shape[axis] for axis in rows)
        ids_sharding = NamedSharding(mesh, PartitionSpec(rows or None))
        if want_compiled:
            def prefill_chunk(params, state, ids):
                model = nnx.merge(graphdef, unflatten_params(params, structure))
                # traced under the mesh and the rules as the runtime traces its calls on a mesh of several devices
                # (runtime.interface.traced_on_parameter_mesh): the layers' constraints, the Pallas scan's shard_map
                with traced_under(mesh, rules):
                    hidden, state = model.run(ids, state)
                    return model.logits(hidden[:, -1]), state

            jitted = jax.jit(prefill_chunk, in_shardings=(p_shardings, c_shardings, ids_sharding),
                             out_shardings=(NamedSharding(mesh, PartitionSpec()), c_shardings), donate_argnums=1)
            ids = jax.ShapeDtypeStruct(ids_shape, jnp.int32)
            analysis = _compile(lambda: jitted.lower(abstract_params, abstract_cache, ids), target).memory_analysis()
            bytes_["activations"] = int(analysis.temp_size_in_bytes)
            result["activations_method"] = (f"compiled: memory_analysis().temp_size_in_bytes of one jitted prefill "
                                            f"chunk of {chunk} tokens into the cache")
            result |= _compiled_bytes(analysis)
        else:
            est = estimate_activations(run, abstract_model, mode, local_batch, chunk, mesh)
            bytes_["activations"] = est["bytes"]
            result["activations_method"] = est["method"]
        result["cache_shape_per_layer"] = [list(leaf.shape) for leaf in abstract_cache.layers[0]]
    bytes_["total"] = sum(bytes_.values())
    result["per_device_bytes"] = bytes_
    result["total_bytes_all_devices"] = bytes_["total"] * devices
    if target is not None:
        result |= {"target": target, "device_kind": target_devices[0].device_kind, "hbm_bytes": hbm_bytes(target)}
    return result


def format_table(result: dict) -> str:
    gib = lambda n: f"{n / 2**30:10.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"{result['config']} ({result['family']}), {result['mode']}: {result['params']:,} parameters "
             f"({result['params'] / 1e9:.3f}B), params {result['param_dtype']}, compute {result['compute_dtype']}",
             f"devices {result['devices']} (mesh {mesh}), batch {result['batch_size']}, seq_len {result['seq_len']}",
             "", f"{'per device':<14}{'bytes':>18}{'':>4}"]
    for key, value in result["per_device_bytes"].items():
        if key == "total":
            lines.append("-" * 40)
        lines.append(f"{key:<14}{value:>18,}{gib(value)}")
    lines += [f"{'all devices':<14}{result['total_bytes_all_devices']:>18,}{gib(result['total_bytes_all_devices'])}",
              "", "activations: " + result["activations_method"]]
    if "cache_shape_per_layer" in result:
        lines.append(f"cache per layer (global shapes): {result['cache_shape_per_layer']}")
    if "target" in result:
        hbm, where = result["hbm_bytes"] / 2**30, f"target {result['target']} ({result['device_kind']})"
        if "compiled_peak_bytes" in result:  # the compiler refuses (DoesNotFit) a step over a chip's HBM
            lines.append(f"{where}: fits, XLA's TPU compiler's peak {result['compiled_peak_bytes'] / 2**30:.2f} GiB "
                         f"of the {hbm:.2f} GiB a chip allows")
        else:
            total = result["per_device_bytes"]["total"] / 2**30
            lines.append(f"{where}: the estimated total {total:.2f} GiB of the {hbm:.2f} GiB a chip allows: "
                         f"{'fits' if total <= hbm else 'does NOT fit'}")
    return "\n".join(lines)


def parse_argv(argv: list[str]) -> tuple[str, list[str], dict, bool]:
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if not argv:
        raise ConfigError("expected CONFIG (a preset name or YAML path)")
    options, overrides = {}, []
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"argument {item!r}: expected key=value")
        if key in OPTIONS:
            key = "seq_len" if key == "seq" else key
            if key in ("devices", "batch", "seq_len", "chunk"):
                try:
                    options[key] = int(value)
                except ValueError:
                    raise ConfigError(f"option {key!r}: expected an integer, got {value!r}") from None
            else:
                options[key] = value
        else:
            overrides.append(item)
    return argv[0], overrides, options, as_json


def main(argv: list[str] | None = None) -> int:
    def command(argv):
        config, overrides, options, as_json = parse_argv(argv)
        result = plan(config, overrides, **options)
        print(json.dumps(result, indent=2) if as_json else format_table(result))
        return 0

    return run_config_command(__doc__, argv, command)


if __name__ == "__main__":
    sys.exit(main())
