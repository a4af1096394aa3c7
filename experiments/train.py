"""Sharded training for either model family.

    python -m experiments.train CONFIG [key=value ...]
    python -m experiments.train tiny_falcon_mamba steps=20 seed=0 output_dir=runs/a \\
        mesh.data=2 mesh.fsdp=2 mesh.tensor=2 checkpoint_every=10

CONFIG is a preset name in configs/ or a YAML path. The run writes to output_dir: config.yaml (the resolved
config), metrics.jsonl (one JSON object per logged step), tensorboard/ and checkpoints/. Running the same
command again resumes from the newest checkpoint and gives the losses of a run never interrupted.
See docs/TRAINING.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import dump_config, load_config, to_dict
from configs.hf import model_config_from_hf
from configs.schema import ConfigError, DistributedConfig, MeshConfig, RunConfig
from experiments import data as data_lib
from experiments.checkpointing import Checkpointer, abstract_with_shardings
from experiments.cli import run_config_command
from experiments.mesh import (batch_sharding, build_mesh, check_axes_used, flatten_params, opt_state_shardings,
                              param_shardings, put_global_batch, unflatten_params)
from experiments.metrics import MetricsWriter
from experiments.models import family_of
from experiments.optim import learning_rate_schedule, make_optimizer
from runtime.files import WriteError, write_failure, write_text_atomic
from runtime.partitioning import traced_under

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN or Inf loss or gradient; the run stopped without applying it."""


def initialize_distributed(config: DistributedConfig) -> None:
    """jax.distributed.initialize from the config; fields left null are detected from the environment."""
    if config.initialize:
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id)


def masked_loss(params, batch, total_weight, *, graphdef, structure, remat=None):
    """Sum over the batch of the masked next-token cross entropy, divided by ``total_weight``; ``remat``: a
    jax.checkpoint policy applied to each layer."""
    model = nnx.merge(graphdef, unflatten_params(params, structure))
    logits = model.forward(batch["inputs"], remat=remat)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["mask"]) / total_weight


def make_train_step(graphdef, structure, tx: optax.GradientTransformation, schedule: optax.Schedule, remat: str):
    """state {"params", "opt_state", "step"}, batch (grad_accum, micro, seq) -> (state, metrics). Gradients
    of the microbatches are summed by lax.scan; a step whose loss or gradient norm is not finite leaves the
    state unchanged and reports finite=False."""
    loss_fn = functools.partial(masked_loss, graphdef=graphdef, structure=structure,
                                remat=None if remat == "none" else REMAT_POLICIES[remat])
    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, batch):
        total_weight = jnp.maximum(jnp.sum(batch["mask"]), 1.0)

        def microbatch(grads, mb):
            loss, mb_grads = grad_fn(state["params"], mb, total_weight)
            return jax.tree.map(jnp.add, grads, mb_grads), loss

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, losses = jax.lax.scan(microbatch, zeros, batch)
        loss, grad_norm = jnp.sum(losses), optax.tree_utils.tree_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        # the new parameters too: a learning rate past float32's range (optim.learning_rate=1e39) turns finite
        # gradients into inf/NaN parameters (leafwise: a norm of huge but finite values would overflow)
        params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state["params"])]))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
                           "finite": finite}

    return train_step


class ProcessFailedError(RuntimeError):
    """Another process of a multi-process run failed; the message names it and its error (its log has the
    traceback)."""


_FAILURE_BYTES = 2048  # of a failed process's "ErrorType: message" that the others report (UTF-8, cut beyond)


def _gather(value: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def raise_process_failures(failed: np.ndarray, failure: Exception | None, when: str) -> None:
    """Where any process failed (``failed``: every process's flag, which all of them hold alike): ``failure``, this
    process's own error, or else ProcessFailedError naming the first process that failed, its error's type and
    message. Collective where any flag is set (the messages are gathered then)."""
    if not np.any(failed):
        return
    text = f"{type(failure).__name__}: {failure}".encode() if failure is not None else b""
    if len(text) > _FAILURE_BYTES:
        text = text[:_FAILURE_BYTES - 3] + b"..."
    messages = _gather(np.frombuffer(text.ljust(_FAILURE_BYTES, b"\0"), np.uint8))
    if failure is not None:
        raise failure
    first, *others = np.flatnonzero(failed).tolist()
    message = bytes(messages[first]).rstrip(b"\0").decode(errors="replace")
    also = f" (processes {others} failed too)" if others else ""
    raise ProcessFailedError(f"distributed: process {first} failed {when}, so every process stops: {message}{also}")


def agree_no_process_failed(failure: Exception | None, when: str) -> None:
    """A point where the processes of a run agree that none of them failed: ``failure`` (this process's own error,
    or None) is raised by the process that had it, and every other process raises ProcessFailedError naming it
    (raise_process_failures). Collective: every process calls it, after the steps that may fail on one process alone
    (its own files, a write only process 0 makes) and before the next collective, in which the others would wait
    for the failed one until JAX's coordination service ended them with no word of the cause. One process: raises
    ``failure``."""
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    raise_process_failures(_gather(np.int32(failure is not None)), failure, when)


class _StopFlag:
    """Set by SIGTERM or a first SIGINT (Ctrl-C); the loop checkpoints and stops at the next step boundary. A
    second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested, self.name = False, "SIGTERM"  # name: the signal this process got (another's: SIGTERM)
        self.failure = None  # this process's own error in the step (deferring), raised at the next boundary

    def __call__(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name

    @contextlib.contextmanager
    def deferring(self):
        """With several processes, an error of this process alone in the block (a metrics row process 0 cannot
        write) is kept for agreed() to raise on every process at the next step boundary: raised at once, it would
        leave the others waiting in the next step's collectives. One process: raised at once."""
        try:
            yield
        except Exception as err:
            if jax.process_count() == 1:
                raise
            self.failure = self.failure or err

    def agreed(self) -> bool:
        """Whether any process got the signal: every process asks at every step boundary, so all of them stop at the
        same step (one stopping alone would leave the others waiting in the next step's collectives, and its
        checkpoint save, itself collective, would never complete). A scalar all-gather: the loop already waits
        for each step's metrics. A process's error kept by deferring() is raised here: by that process, and as
        ProcessFailedError naming it by the others."""
        if jax.process_count() == 1:
            return self.requested
        gathered = _gather(np.array([self.requested, self.failure is not None], np.int32))
        raise_process_failures(gathered[:, 1], self.failure, "during the training loop")
        return bool(np.max(gathered[:, 0]))


# Model fields a resumed run may change: how the same parameters are computed with, not what they are.
RESUMABLE_MODEL_FIELDS = ("compute_dtype", "scan_impl", "scan_chunk_size", "attention_impl", "attention_block_size")
# Data fields a resumed run may change: how a step's batch is split into microbatches, not which rows it holds
# (batch_at draws batch_size rows, then reshapes them; the loss is divided by the whole batch's mask).
RESUMABLE_DATA_FIELDS = ("grad_accum",)


# Model fields a run started from pretrained weights (init_from) may set otherwise than the checkpoint's
# config.json: how the weights are computed with, how a model built from scratch would be initialised, and the
# position encoding that context-extension fine-tuning changes (RoPE interpolation, a larger rope_theta, a
# longer max_position_embeddings). Every other field must be the checkpoint's: it says what the weights mean.
INIT_FROM_FREE_FIELDS = RESUMABLE_MODEL_FIELDS + (
    "param_dtype", "initializer_range", "time_step_scale", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_init_scheme", "rescale_prenorm_residual")
CONTEXT_EXTENSION_FIELDS = ("rope_theta", "rope_scaling_type", "rope_scaling_factor", "max_position_embeddings")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_absolute_paths(run: RunConfig) -> RunConfig:
    """``run`` with its input paths (init_from, data.token_file, data.text_dir) made absolute against the working
    directory, as config.yaml records them: export, generate, evaluate and a resume read them from another
    directory (a notebook's) too."""
    def absolute(path: str) -> str:
        return os.path.abspath(path) if path else path  # "" keeps its meaning (no file; the default corpus)

    data = dataclasses.replace(run.data, token_file=absolute(run.data.token_file),
                               text_dir=absolute(run.data.text_dir))
    return dataclasses.replace(run, init_from=absolute(run.init_from), data=data)


def check_resume(previous: RunConfig, run: RunConfig, output_dir) -> None:
    """A resumed run continues its checkpoint's model on the same data stream: seed, data.* and the model's
    fields (but RESUMABLE_MODEL_FIELDS) must equal those in the run's config.yaml, and so must init_from (a resume
    never reads it: one added to a randomly initialised run would be ignored, yet recorded in config.yaml, which
    export and generate read its tokenizer from). steps, optim, mesh, logging, checkpointing and data.grad_accum
    may change (steps= raised resumes a run into its decay; any mesh restores; grad_accum splits the same batch)."""
    before, after = (_flat(to_dict(with_absolute_paths(config))) for config in (previous, run))
    # the seed, then the model family (another family's fields differ too: model.alibi is not the cause), in order
    for key in sorted(set(before) | set(after), key=lambda k: (k != "seed", k != "model.family", k)):
        section, _, name = key.partition(".")
        fixed = (key in ("seed", "init_from") or (section == "data" and name not in RESUMABLE_DATA_FIELDS)
                 or (section == "model" and name not in RESUMABLE_MODEL_FIELDS))
        if fixed and before.get(key) != after.get(key):
            raise ConfigError(f"config field '{key}': resuming {str(output_dir)!r} needs the value its checkpoints "
                              f"were trained with, {before.get(key)!r}; got {after.get(key)!r} (a new output_dir "
                              f"starts a new run)")


def data_position(step: int, run: RunConfig, corpus: dict) -> dict:
    """What a checkpoint records of the data stream: the step, task and seed, and the corpus size and SHA-256 of
    the bytes and tokens tasks (``corpus``: data.corpus_identity)."""
    return {"step": step, "task": run.data.task, "seed": run.seed, **corpus}


def check_position(position: dict, run: RunConfig, output_dir, corpus: dict) -> None:
    """A checkpoint's data position (``data_position``) fits the resumed run: the same seed and task (the
    stream; checked here too as config.yaml may be gone, and check_resume with it), the same corpus size and
    SHA-256 as the run's (``corpus``: data.corpus_identity; a token file or text directory rewritten under the same
    name is another stream; checkpoints written before the size or the SHA-256 was kept are not checked on it),
    steps not below its step."""
    step = int(position["step"])
    for field, key, value in (("seed", "seed", run.seed), ("data.task", "task", run.data.task)):
        if position.get(key, value) != value:
            raise ConfigError(f"config field '{field}': resuming {str(output_dir)!r} needs the value its "
                              f"checkpoint step {step} was trained with, {position[key]!r}; got {value!r}")
    if "corpus_size" in position:
        field, where, unit = (("data.token_file", repr(run.data.token_file), "tokens") if run.data.task == "tokens"
                              else ("data.text_dir", f"{run.data.text_dir!r} / {run.data.text_glob!r}", "bytes"))
        needs = (f"config field '{field}': resuming {str(output_dir)!r} needs the corpus its checkpoint step {step} "
                 f"was trained on, of {position['corpus_size']} {unit}")
        size = corpus.get("corpus_size")
        if size != position["corpus_size"]:
            raise ConfigError(f"{needs}; got {size} in {where} (rewritten since; a new output_dir starts a new run)")
        if "corpus_sha256" in position and corpus.get("corpus_sha256") != position["corpus_sha256"]:
            raise ConfigError(f"{needs} with SHA-256 {position['corpus_sha256'][:16]}...; got other {unit} of that "
                              f"size in {where} (rewritten since; a new output_dir starts a new run)")
    if step > run.steps:
        raise ConfigError(f"config field 'steps': expected at least {step} (the newest checkpoint in "
                          f"{str(output_dir)!r}; a resume continues it), got {run.steps}")


def check_processes_agree(run: RunConfig, corpus: dict, failure: Exception | None = None) -> None:
    """Every process runs the same config (but its ``distributed`` fields) on the same corpus (``corpus``:
    data.corpus_identity). Each process builds the whole global batch from its own copy of the corpus and keeps
    its devices' shards (experiments.mesh.put_global_batch): a host started with other overrides (another seed, a
    relative output_dir from another directory), or whose data.text_dir / data.token_file holds other bytes, would
    otherwise feed its shards from another stream than the one process 0 records, without an error. A ConfigError
    on every process, naming those that differ from process 0. ``failure``: this process's own error in the steps
    before (reading its corpus), raised by it, and named by the others in a ProcessFailedError
    (agree_no_process_failed); checked first. Collective: every process calls it."""
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return

    def digest(value) -> np.ndarray:
        return np.frombuffer(hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest(), np.uint8)

    config = to_dict(dataclasses.replace(run, distributed=DistributedConfig()))
    failed = np.zeros(32, np.uint8)
    failed[0] = failure is not None
    gathered = _gather(np.stack([digest(config), digest(corpus), failed]))
    raise_process_failures(gathered[:, 2, 0], failure, "at start-up")
    differ = [[i for i in range(len(gathered)) if not np.array_equal(gathered[i, row], gathered[0, row])]
              for row in (0, 1)]
    if differ[0]:
        raise ConfigError(f"distributed: expected every process to run process 0's config (the same CONFIG and "
                          f"key=value overrides but distributed.*; relative paths from the same directory), got "
                          f"another one on processes {differ[0]}")
    if differ[1]:
        field, unit = ("data.token_file", "tokens") if run.data.task == "tokens" else ("data.text_dir", "bytes")
        raise ConfigError(f"config field '{field}': expected every process to read process 0's corpus, got other "
                          f"{unit} on processes {differ[1]} (each process reads its own copy; process "
                          f"{jax.process_index()}'s: {corpus['corpus_size']} {unit}, SHA-256 "
                          f"{corpus['corpus_sha256'][:16]}...)")


class Setup(NamedTuple):
    """What the training loop needs, built from the config alone (nothing is computed on devices yet)."""

    mesh: Mesh
    graphdef: Any
    structure: Any
    tx: optax.GradientTransformation
    init_state: Callable[[], dict]          # builds {"params", "opt_state", "step"}; jit it with state_shardings
    state_shardings: dict
    batch_sharding: NamedSharding


def prepare(run: RunConfig, mesh: Mesh | None = None) -> Setup:
    """The mesh, the model's graph, the optimizer and the shardings of the train state and batches.
    ``mesh`` (default: build_mesh(run.mesh) over all devices) may be a jax.sharding.AbstractMesh, as the
    planner (experiments.plan) uses to size runs on more devices than this host has."""
    if run.model.param_dtype != "float32":
        raise ConfigError(f"config field 'model.param_dtype': expected 'float32' for training (fp32 master "
                          f"weights; compute_dtype sets the compute precision), got {run.model.param_dtype!r}")
    family = family_of(run.model)
    mesh = build_mesh(run.mesh) if mesh is None else mesh
    tx = make_optimizer(run.optim, run.steps)

    def init_state():
        params, _ = flatten_params(nnx.state(family.lm(run.model, seed=run.seed), nnx.Param))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    graphdef, abstract_params_state = nnx.split(nnx.eval_shape(lambda: family.lm(run.model, seed=run.seed)),
                                                nnx.Param)
    abstract_params, structure = flatten_params(abstract_params_state)
    p_shardings = param_shardings(abstract_params, family.param_axes(run.model, mesh, run.mesh.rules), mesh,
                                  run.mesh.rules)
    state_shardings = {"params": p_shardings,
                       "opt_state": opt_state_shardings(jax.eval_shape(tx.init, abstract_params), p_shardings, mesh),
                       "step": NamedSharding(mesh, PartitionSpec())}
    micro = run.data.batch_size // run.data.grad_accum
    b_sharding = batch_sharding(mesh, run.mesh.rules, (run.data.grad_accum, micro, run.data.seq_len))
    check_axes_used(dict(mesh.shape), [*p_shardings.values(), b_sharding])
    return Setup(mesh, graphdef, structure, tx, init_state, state_shardings, b_sharding)


def jit_train_step(setup: Setup, run: RunConfig, donate: bool = True):
    """The jitted train step of ``run`` on ``setup``'s mesh: state and batch in their shardings, metrics
    replicated; ``donate`` lets XLA reuse the input state's buffers for the output state."""
    train_step = make_train_step(setup.graphdef, setup.structure, setup.tx,
                                 learning_rate_schedule(run.optim, run.steps), run.remat)

    def step(state, batch):  # traced under the mesh and the run's rules (runtime.partitioning.traced_axes)
        with traced_under(setup.mesh, run.mesh.rules):
            return train_step(state, batch)

    return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, PartitionSpec())),
                   donate_argnums=0 if donate else ())


def check_init_from(run: RunConfig) -> dict[str, Any]:
    """run.init_from's config.json checked against run.model before anything is read or built: the same family and
    the same value of every field but INIT_FROM_FREE_FIELDS and CONTEXT_EXTENSION_FIELDS (all differences named in
    one ConfigError). Returns the model fields the run sets otherwise than config.json (from_pretrained's
    overrides)."""
    try:
        pretrained = model_config_from_hf(Path(run.init_from))
    except ConfigError as err:
        raise ConfigError(f"config field 'init_from': {err}") from None
    if type(pretrained) is not type(run.model):
        raise ConfigError(f"config field 'init_from': {run.init_from!r} holds a {pretrained.family!r} model, the "
                          f"run's model.family is {run.model.family!r}")
    changed = {f.name: getattr(run.model, f.name) for f in dataclasses.fields(run.model)
               if f.compare and getattr(run.model, f.name) != getattr(pretrained, f.name)}
    fixed = [name for name in changed if name not in INIT_FROM_FREE_FIELDS + CONTEXT_EXTENSION_FIELDS]
    if fixed:
        shown = "; ".join(f"model.{name}={changed[name]!r}, config.json has {getattr(pretrained, name)!r}"
                          for name in fixed)
        raise ConfigError(f"config field 'init_from': {run.init_from!r} is another model than the run's: {shown} "
                          f"(set these to config.json's values)")
    return changed


def init_from_pretrained(run: RunConfig, setup: Setup, overrides: dict | None = None) -> dict:
    """The train state at step 0 with run.init_from's weights: each tensor read from its memory map straight into
    the parameter's sharding (every process reads only its devices' slices), then Adam's moments set up beside
    them. ``overrides``: check_init_from(run)'s, where the caller has it."""
    overrides = check_init_from(run) if overrides is None else overrides
    for name in CONTEXT_EXTENSION_FIELDS:
        if name in overrides and jax.process_index() == 0:
            print(f"init_from: model.{name}={overrides[name]!r} (config.json has another value)", flush=True)
    model = family_of(run.model).from_pretrained(run.init_from, shardings=setup.state_shardings["params"], **overrides)
    params, _ = flatten_params(nnx.state(model, nnx.Param))
    start = jax.jit(lambda params: {"params": params, "opt_state": setup.tx.init(params),
                                    "step": jnp.zeros((), jnp.int32)},
                    out_shardings=setup.state_shardings, donate_argnums=0)
    return start(params)


def train(run: RunConfig) -> list[dict]:
    """Trains (or resumes) the run; returns the metrics rows this call logged."""
    run = with_absolute_paths(run)
    output_dir = Path(run.output_dir)
    created = [path for path in (output_dir, output_dir / "checkpoints") if not path.exists()]

    def remove_created():  # a new run refused (a bad init_from) leaves no empty output_dir behind
        for path in reversed(created):
            with contextlib.suppress(OSError):  # rmdir: only while empty
                path.rmdir()

    # the steps that may fail on one process alone (its copy of the corpus; process 0's directory, which Orbax's
    # CheckpointManager, collective, would create) run before the processes agree (check_processes_agree)
    failure, corpus = None, {}
    try:
        data_lib.check_data(run.data, run.model.vocab_size)  # before anything is built or written
        corpus = data_lib.corpus_identity(run.data)
        setup = prepare(run)
        if jax.process_index() == 0:
            try:
                (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"config field 'output_dir': expected a directory this process can create and "
                                  f"write, got {str(output_dir)!r} ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 (raised by check_processes_agree, the others told of it)
        failure = err
    try:
        check_processes_agree(run, corpus, failure)
    except Exception:
        remove_created()
        raise
    state_shardings, b_sharding = setup.state_shardings, setup.batch_sharding
    try:
        checkpointer = Checkpointer(output_dir / "checkpoints", run.keep_checkpoints)
    except OSError as err:
        raise ConfigError(f"config field 'output_dir': expected a directory this process can create and write, "
                          f"got {str(output_dir)!r} ({err.strerror or err})") from None
    start = checkpointer.latest_step()
    try:  # a run that cannot resume is refused here, before its config.yaml is rewritten
        failure, overrides = None, {}
        try:  # each process reads config.yaml and init_from's config.json itself: agreed before the collectives
            if start is not None and (output_dir / "config.yaml").is_file():
                check_resume(load_config(output_dir / "config.yaml", []), run, output_dir)
            if start is None and run.init_from:
                overrides = check_init_from(run)
        except Exception as err:  # noqa: BLE001 (raised below)
            failure = err
        agree_no_process_failed(failure, "checking the run against output_dir and init_from")
        if start is None:
            start = 0
            state = (init_from_pretrained(run, setup, overrides) if run.init_from else
                     jax.jit(setup.init_state, out_shardings=state_shardings)())
        else:
            target = abstract_with_shardings(jax.eval_shape(setup.init_state), state_shardings)
            state, position = checkpointer.restore(start, target)
            check_position(position, run, output_dir, corpus)
            start = int(position["step"])
    except (ValueError, ProcessFailedError):  # a ConfigError, or init_from's CheckpointError
        checkpointer.close()
        remove_created()
        raise
    failure, writer = None, None
    try:  # only process 0 writes: the others learn of its failure below, not by waiting in the first step
        if jax.process_index() == 0:  # after a restore: a run that cannot resume leaves its config.yaml as it was
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(output_dir / "config.yaml", dump_config(run))
            except OSError as err:  # a read-only file system (the checkpoints directory already there) or a full disk
                raise write_failure("", output_dir / "config.yaml", err) from err
        writer = MetricsWriter(output_dir, start, run.steps)
    except Exception as err:  # noqa: BLE001 (raised below)
        failure = err
    try:
        agree_no_process_failed(failure, "writing config.yaml or metrics.jsonl")
    except BaseException:
        _close_all(checkpointer.close, *([writer.close] if writer else []), raising=False)
        raise
    step_fn = jit_train_step(setup, run)
    stop = _StopFlag()
    previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore_handlers():
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    logged, last_saved, tokens = [], start, 0

    def save(step, state):  # checkpoint ``step`` (the state after that many updates) unless it is saved already
        nonlocal last_saved
        if step != last_saved:
            checkpointer.save(step, state, data_position(step, run, corpus))
            last_saved = step

    def load_batch(step):  # (host arrays, global arrays in the batch sharding) of ``step``
        host_batch = data_lib.batch_at(run.data, run.model.vocab_size, run.seed, step)
        return host_batch, {name: put_global_batch(array, b_sharding) for name, array in host_batch.items()}

    try:
        last_time = time.perf_counter()
        stopping = False
        with stop.deferring():  # this process's own data: with several, an error is raised at the boundary
            next_batch = load_batch(start) if start < run.steps else None
        for step in range(start, run.steps):
            if stop.agreed():
                stopping = True
                break
            host_batch, batch = next_batch
            state, metrics = step_fn(state, batch)
            tokens += host_batch["inputs"].size
            # the next batch is made and sent while the devices run this step (the step is dispatched
            # asynchronously; reading its metrics below is what waits for it)
            with stop.deferring():
                next_batch = load_batch(step + 1) if step + 1 < run.steps else None
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                save(step, state)  # the state the bad step left unchanged: the last good one
                checkpointer.wait()
                latest = checkpointer.latest_step()
                kept = ("no checkpoint was saved yet" if latest is None else
                        f"the last good checkpoint is step {latest} in {output_dir / 'checkpoints'}")
                raise NonFiniteLossError(
                    f"step {step + 1}: loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} "
                    f"(or the parameters it would give) is not finite; stopped without applying the step; {kept}")
            done = step + 1
            if done % run.log_every == 0 or done == run.steps:
                now = time.perf_counter()
                row = {"step": done, "loss": float(metrics["loss"]), "learning_rate": float(metrics["learning_rate"]),
                       "seq_len": int(host_batch["inputs"].shape[-1]),
                       "grad_norm": float(metrics["grad_norm"]),
                       "tokens_per_s": tokens / (now - last_time)}
                last_time, tokens = now, 0
                with stop.deferring():  # process 0's alone: the others stop with it at the next boundary
                    writer.write(row)
                logged.append(row)
            if run.checkpoint_every and done % run.checkpoint_every == 0:
                save(done, state)
        if not stopping:
            stop.agreed()  # raises an error deferred in the last step (a stop asked for now changes nothing)
        done = int(jax.device_get(state["step"]))
        save(done, state)
        if stopping:
            checkpointer.wait()  # saved, before it is said to be
            saved = (f"saved checkpoint step {done} in {output_dir / 'checkpoints'}" if done else
                     "stopped before the first step, nothing to checkpoint")
            print(f"{stop.name}: {saved}; stopping", flush=True)
    except BaseException:  # the error that stopped the run is reported, not a cleanup's failure on the same disk
        _close_all(checkpointer.wait, checkpointer.close, writer.close, restore_handlers, raising=False)
        raise
    _close_all(checkpointer.wait, checkpointer.close, writer.close, restore_handlers)  # the last save's error too
    return logged


def _close_all(*closes: Callable[[], None], raising: bool = True) -> None:
    """Calls every one of ``closes`` (one failing, a full disk's flush, skips none of the others), then raises the
    first error if ``raising``; not while another error stops the run: a second failure of the same full disk would
    hide the first, which names what was lost."""
    first = None
    for close in closes:
        try:
            close()
        except Exception as err:  # noqa: BLE001 (re-raised below)
            first = first or err
    if first is not None and raising:
        raise first


def run_config_path(output_dir: str | Path) -> Path:
    """The config.yaml of a training run's output_dir; FileNotFoundError naming output_dir where it has none."""
    config_path = Path(output_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"output_dir: {str(output_dir)!r} has no config.yaml (not a training run)")
    return config_path


def load_trained_model(output_dir: str | Path, step: int | None = None, compute_dtype: str | None = None,
                       mesh: MeshConfig | None = None):
    """The model of a training run's output_dir at checkpoint ``step`` (default: the newest), on the local
    devices whatever mesh it was trained on, computing in ``compute_dtype`` (default: the run's). ``mesh``: the
    axis sizes (a MeshConfig's data, fsdp, tensor) to split the parameters over by the run's mesh.rules; None:
    replicated on every device. Returns (model, step)."""
    output_dir = Path(output_dir)
    config_path = run_config_path(output_dir)
    axes = [f"mesh.{axis}={getattr(mesh, axis) if mesh else default}"
            for axis, default in (("data", -1), ("fsdp", 1), ("tensor", 1))]
    # the training batch plays no part in loading, but prepare() shards one over the data axis: a microbatch
    # smaller than the device count (batch_size 8, grad_accum 4 on 4 devices) failed with a MeshError
    run = load_config(config_path, [*axes, "distributed.initialize=false",
                                    f"data.batch_size={jax.device_count()}", "data.grad_accum=1"]
                      + ([f"model.compute_dtype={compute_dtype}"] if compute_dtype else []))
    checkpointer = Checkpointer(output_dir / "checkpoints", run.keep_checkpoints, create=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"output_dir: {str(output_dir)!r} has no checkpoint yet")
        checkpointer.check_step(step)  # before the model is built
        setup = prepare(run)
        abstract = jax.eval_shape(setup.init_state)["params"]
        params = checkpointer.restore_params(step, abstract_with_shardings(abstract, setup.state_shardings["params"]))
    finally:
        checkpointer.close()
    model = nnx.merge(setup.graphdef, unflatten_params(params, setup.structure))
    model.set_sharding_rules(run.mesh.rules)  # its calls split rows and are traced like the run's (CausalLM)
    return model, step


def main(argv: list[str] | None = None) -> int:
    def command(argv):
        run = load_config(argv[0], argv[1:])
        initialize_distributed(run.distributed)
        train(run)
        return 0

    return run_config_command(__doc__, argv, command, errors=(NonFiniteLossError, WriteError, ProcessFailedError))


if __name__ == "__main__":
    sys.exit(main())
