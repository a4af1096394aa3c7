"""End-to-end training through the CLI: 1 device vs an 8-device data x fsdp x tensor mesh, restoring onto
another device count, kill -9 and resume, the NaN guard, metrics.jsonl."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from experiments.metrics import read_metrics
from tests.train_helpers import ROOT, cli_env, run_train, train_argv, train_command

# fp32 losses of the same model under different partitionings differ only by reduction order: measured
# max |diff| ~5e-7 on losses ~5.5 over 8 steps.
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def losses(output_dir):
    return np.array([row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")])


@pytest.mark.parametrize("preset", ["tiny_falcon_mamba", "tiny_falcon"])
def test_one_device_equals_8_device_mesh_and_restores_onto_another_device_count(preset, tmp_path, cache_dir):
    common = ["steps=8", "seed=3", "checkpoint_every=4", "optim.learning_rate=0.01", "optim.warmup_steps=2",
              "data.task=bytes"]  # a loss on every token: 8 steps must lower it
    run_train(preset, tmp_path / "one", *common, devices=1, cache_dir=cache_dir)
    run_train(preset, tmp_path / "mesh", *common, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8,
              cache_dir=cache_dir)
    one, mesh = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert len(one) == len(mesh) == 8
    print(f"{preset}: max |loss(1 device) - loss(2x2x2 mesh)| = {np.abs(one - mesh).max():.3g}")
    np.testing.assert_allclose(mesh, one, rtol=0, atol=LOSS_ATOL)
    assert one[-1] < one[0]
    if preset != "tiny_falcon_mamba":
        return

    # The 8-device run's step-4 checkpoint, resumed on 1 device, continues the same curve.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "mesh", moved)
    shutil.rmtree(moved / "checkpoints" / "8")
    run_train(preset, moved, *common, devices=1, cache_dir=cache_dir)
    resumed = losses(moved)
    np.testing.assert_array_equal(resumed[:4], mesh[:4])  # rows before the checkpoint are kept as written
    np.testing.assert_allclose(resumed[4:], mesh[4:], rtol=0, atol=LOSS_ATOL)
    assert yaml.safe_load((moved / "config.yaml").read_text())["mesh"]["data"] == -1


def test_pallas_scan_on_a_mesh_equals_chunked_on_one_device(tmp_path, cache_dir):
    """model.scan_impl=pallas trained on a 2x2x2 mesh (the step traced under the mesh, so the kernels run in
    shard_map: ssm.scan) gives the losses of the chunked scan on one device."""
    common = ["steps=4", "seed=3", "optim.learning_rate=0.01", "optim.warmup_steps=2", "data.task=bytes"]
    run_train("tiny_falcon_mamba", tmp_path / "chunked", *common, "model.scan_impl=chunked", devices=1,
              cache_dir=cache_dir)
    run_train("tiny_falcon_mamba", tmp_path / "pallas", *common, "model.scan_impl=pallas", "mesh.data=2",
              "mesh.fsdp=2", "mesh.tensor=2", devices=8, cache_dir=cache_dir)
    chunked, pallas = losses(tmp_path / "chunked"), losses(tmp_path / "pallas")
    assert len(chunked) == len(pallas) == 4
    np.testing.assert_allclose(pallas, chunked, rtol=0, atol=LOSS_ATOL)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, cache_dir):
    preset, common = "tiny_falcon_mamba", ["steps=60", "checkpoint_every=10", "keep_checkpoints=2"]
    run_train(preset, tmp_path / "straight", *common, cache_dir=cache_dir)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(preset, killed, *common), env=cli_env(1, cache_dir), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(killed / "metrics.jsonl") if (killed / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 12 and (killed / "checkpoints" / "10").is_dir():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 0 < saved[-1] < 60, saved

    run_train(preset, killed, *common, cache_dir=cache_dir)
    straight, resumed = losses(tmp_path / "straight"), losses(killed)
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == list(range(1, 61))
    np.testing.assert_array_equal(resumed, straight)


def test_metrics_config_and_tensorboard_files(tmp_path):
    from experiments.train import main  # the command line in this process: one device, as run_train gives it

    assert main(train_argv("tiny_falcon_mamba", tmp_path, "steps=4", "log_every=2", "data.task=bytes",
                           "data.grad_accum=2", "remat=dots")) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "grad_norm"} <= set(row)
        assert np.isfinite(row["loss"]) and row["tokens_per_s"] > 0 and row["learning_rate"] > 0
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["data"]["task"] == "bytes" and config["model"]["family"] == "falcon_mamba"
    assert config["mesh"]["rules"]["d_inner"] == ["tensor"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 2


def test_text_files_are_replaced_whole(tmp_path, monkeypatch):
    """write_text_atomic (what config.yaml, metrics.jsonl, config.json and the shard index are written with): a
    crash before the rename keeps the previous file whole (config.yaml was written in place: a crash mid-write
    truncated it, and an empty one loaded as every default) and leaves no temporary file."""
    import os

    from runtime.files import write_text_atomic

    path = tmp_path / "config.yaml"
    write_text_atomic(path, "seed: 1\n")
    assert path.read_text() == "seed: 1\n"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "seed: 2\n")
    assert path.read_text() == "seed: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_metrics_rows_survive_a_cut_last_line_and_a_bad_line_is_named(tmp_path):
    """A crash mid-write leaves a last line without its newline: skipped (the resume rewrites from its checkpoint
    step); the writer keeps the rows up to the resumed step; any other bad line names the file and line."""
    from experiments.metrics import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    MetricsWriter(tmp_path, start_step=1, total_steps=4).close()
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n' and not list(tmp_path.glob("*.tmp*"))
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: expected a JSON metrics row"):
        read_metrics(path)


@pytest.mark.parametrize("overrides, kept, saved", [
    # checkpoint_every=0: the good state before the bad step is saved as the error is raised
    (["checkpoint_every=0", "optim.learning_rate=1e30"], "the last good checkpoint is step 1 in", ["1"]),
    # a learning rate past float32's range: finite loss and gradients, inf parameters (not applied either)
    (["checkpoint_every=1", "optim.learning_rate=1e39"], "no checkpoint was saved yet", []),
])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 as a float32 constant
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(overrides, kept, saved, tmp_path, capsys):
    from experiments.train import main  # the command line in this process: one device, as run_train gives it

    status = main(train_argv("tiny_falcon_mamba", tmp_path, "steps=6", *overrides, "optim.clip_norm=0"))
    stderr = capsys.readouterr().err
    assert status == 1
    assert "is not finite; stopped without applying the step" in stderr, stderr[-2000:]
    assert kept in stderr, stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    assert (sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []) == saved


def test_clipping_on_or_off_keeps_the_optimizer_state_shape():
    """optim.* may change on resume: the optimizer state of clip_norm 0 has the structure of a clipped one (it was
    AdamW's alone, and Orbax refused to restore a checkpoint across the change)."""
    import jax
    import jax.numpy as jnp

    from configs.schema import OptimConfig
    from experiments.optim import make_optimizer

    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    states = [make_optimizer(OptimConfig(clip_norm=clip), 10).init(params) for clip in (0.0, 1.0)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    grads = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([3.0, -1.0, 0.5])}
    off, never = (make_optimizer(OptimConfig(clip_norm=clip, warmup_steps=0), 10) for clip in (0.0, 1e9))
    for name, update in off.update(grads, off.init(params), params)[0].items():  # 0: no clipping at all
        np.testing.assert_array_equal(update, never.update(grads, never.init(params), params)[0][name])


def test_weight_decay_spares_a_log_d_biases_and_norms():
    """With zero gradients, an AdamW step changes only the decayed parameters (weight matrices), by exactly
    lr * weight_decay * value; A_log, D, the dt bias, conv bias and norm scales stay as they were."""
    import jax
    import jax.numpy as jnp

    from configs import load_config
    from experiments.train import prepare

    # model.use_bias: in_proj's bias is (2, d_inner), 2-D like a weight matrix, and was decayed
    run = load_config("tiny_falcon_mamba", ["optim.warmup_steps=0", "optim.learning_rate=0.1",
                                            "optim.weight_decay=0.5", "steps=10", "model.use_bias=true"])
    setup = prepare(run)
    params = jax.jit(setup.init_state)()["params"]
    params = {name: value + 0.5 if name.endswith(".bias") else value for name, value in params.items()}  # not 0
    updates, _ = setup.tx.update(jax.tree.map(jnp.zeros_like, params), setup.tx.init(params), params)
    spared = {name for name in params if name.endswith((".A_log", ".D", ".bias", "norm.weight", "norm_f.weight"))}
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer.dt_proj.bias",
            "layers.0.norm.weight", "layers.0.mixer.in_proj.bias"} <= spared
    for name, update in updates.items():
        want = np.zeros_like(params[name]) if name in spared else -0.1 * 0.5 * np.asarray(params[name])
        np.testing.assert_allclose(np.asarray(update), want, rtol=1e-6, atol=1e-9, err_msg=name)


SIGNAL_RUN = "tiny_falcon_mamba", ["steps=400", "checkpoint_every=0", "log_every=1"]


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory, cache_dir):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(SIGNAL_RUN[0], output_dir, *SIGNAL_RUN[1], cache_dir=cache_dir)
    return losses(output_dir)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_resume_equals_uninterrupted(signal_name, tmp_path, cache_dir,
                                                                    uninterrupted_losses, capsys):
    """checkpoint_every=0: the only mid-run checkpoint is the one SIGTERM (or Ctrl-C) writes at the next step
    boundary; the process exits cleanly, and the same command resumes to the losses of a run never interrupted.
    The resumes the command refuses before training run its main() in this process (a process of its own spent
    its time importing)."""
    from experiments.train import main
    # 400 steps of a few ms each: the signal at step 5 leaves a wide margin before the run would end by itself
    preset, common = SIGNAL_RUN
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(train_command(preset, stopped, *common), env=cli_env(1, cache_dir), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(stopped / "metrics.jsonl") if (stopped / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 5:
            proc.send_signal(getattr(signal, signal_name))
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 5 <= saved[0] < 400, saved
    assert f"{signal_name}: saved checkpoint step {saved[0]}" in out

    if signal_name == "SIGINT":  # without config.yaml, the checkpoint's data position still names seed and task
        alone = tmp_path / "alone"
        shutil.copytree(stopped, alone)
        (alone / "config.yaml").unlink()
        status = main(train_argv(preset, alone, *common, "seed=9"))
        assert status == 1 and (f"error: config field 'seed': resuming '{alone}' needs the value its "
                                f"checkpoint step {saved[0]} was trained with, 0; got 9") in capsys.readouterr().err

    status = main(train_argv(preset, stopped, *common, "steps=3"))
    assert status == 1 and (f"error: config field 'steps': expected at least {saved[0]} (the newest "
                            f"checkpoint in '{stopped}'; a resume continues it), got 3") in capsys.readouterr().err
    run_train(preset, stopped, *common, cache_dir=cache_dir)
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == list(range(1, 401))
    np.testing.assert_array_equal(losses(stopped), uninterrupted_losses)


@pytest.mark.parametrize("decay_steps", [0, 600])
def test_learning_rate_schedule_warmup_stable_cosine(decay_steps):
    """Linear warmup from 0, then (decay_steps > 0) constant, then cosine to lr * end_lr_ratio at the last step,
    written out here from the formula."""
    from configs.schema import OptimConfig
    from experiments.optim import learning_rate_schedule

    lr, end_ratio, warmup, steps = 3e-3, 0.02, 100, 1000
    config = OptimConfig(learning_rate=lr, warmup_steps=warmup, end_lr_ratio=end_ratio, decay_steps=decay_steps)
    schedule = learning_rate_schedule(config, steps)
    start = warmup if decay_steps == 0 else steps - decay_steps
    for step in [0, 1, 50, 99, 100, 101, 250, 399, 400, 401, 700, 999, 1000]:
        if step < warmup:
            want = lr * step / warmup
        elif step < start:
            want = lr
        else:
            progress = (step - start) / (steps - start)
            want = lr * (end_ratio + (1 - end_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, err_msg=f"step {step}")


def test_resume_keeps_the_model_and_the_data_stream():
    """check_resume: the seed, data.* and the model's parameters-defining fields must match the run's
    config.yaml; how the model computes (compute_dtype, scan_impl, ...), steps, optim and the mesh may change."""
    from configs import load_config
    from configs.schema import ConfigError
    from experiments.train import check_resume

    run = load_config("tiny_falcon_mamba", ["steps=10"])
    for allowed in (["steps=20"], ["model.compute_dtype=bfloat16", "model.scan_impl=sequential"],
                    ["optim.learning_rate=0.1", "mesh.data=2", "log_every=5", "remat=full"], ["data.grad_accum=2"]):
        check_resume(run, load_config("tiny_falcon_mamba", ["steps=10", *allowed]), "runs/x")
    for key, value in (("seed", 3), ("data.task", "copy"), ("data.seq_len", 128), ("model.hidden_size", 32),
                       ("model.num_hidden_layers", 1)):
        with pytest.raises(ConfigError, match=rf"^config field '{key}': resuming 'runs/x' needs the value its "
                                              rf"checkpoints were trained with"):
            check_resume(run, load_config("tiny_falcon_mamba", ["steps=10", f"{key}={value}"]), "runs/x")
    # another family's run: the family is the field named (model.alibi, first in order, was)
    for previous, resumed in ((run, load_config("tiny_falcon", ["steps=10"])), (load_config("tiny_falcon"), run)):
        with pytest.raises(ConfigError, match=r"^config field 'model.family': resuming 'runs/x' needs"):
            check_resume(previous, resumed, "runs/x")


def test_cli_usage_and_bad_arguments_are_one_error_line(capsys):
    """train, plan and collectives share experiments.cli: usage for --help (0) or no argument (2); a bad preset,
    key or mesh is one 'error:' line with status 1, before anything is trained or written."""
    from experiments.train import main

    assert main(["--help"]) == 0 and "python -m experiments.train CONFIG" in capsys.readouterr().out
    assert main([]) == 2 and "python -m experiments.train CONFIG" in capsys.readouterr().out
    for argv, named in ((["tiny_falcn"], "'tiny_falcn'"), (["tiny_falcon", "bogus=1"], "'bogus'"),
                        (["tiny_falcon", "mesh.data=3"], "data=3"),
                        (["tiny_falcon", "output_dir=/proc/no_such_run"], "'output_dir': expected a directory")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def _step_setup(*overrides):
    import jax

    from configs import load_config
    from experiments.optim import learning_rate_schedule
    from experiments.train import make_train_step, prepare

    run = load_config("tiny_falcon_mamba", ["model.num_hidden_layers=1", "steps=10", *overrides])
    setup = prepare(run)
    step = lambda remat="none": jax.jit(make_train_step(setup.graphdef, setup.structure, setup.tx,  # noqa: E731
                                                        learning_rate_schedule(run.optim, run.steps), remat))
    return run, setup, jax.jit(setup.init_state)(), step


def test_train_step_loss_is_the_masked_mean_over_all_microbatches():
    """The step's loss is sum(ce * mask) / sum(mask) over the whole batch (a hand-written reference on the model's
    logits); split into 2 microbatches, the step gives the same loss, gradient norm and new parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.mesh import unflatten_params

    run, setup, state, make = _step_setup("optim.warmup_steps=0")
    rng = np.random.default_rng(0)
    shape = (1, 4, 8)
    batch = {"inputs": rng.integers(0, 256, shape).astype(np.int32),
             "targets": rng.integers(0, 256, shape).astype(np.int32),
             "mask": (rng.random(shape) < 0.4).astype(np.float32)}
    batch["mask"][0, 0] = 0.0  # a row without loss, another with some: the mean is over masked tokens only
    batch["mask"][0, 1, :6] = 1.0

    def reference(params):
        model = nnx.merge(setup.graphdef, unflatten_params(params, setup.structure))
        logp = jax.nn.log_softmax(model.forward(jnp.asarray(batch["inputs"][0])), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"][0])[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["mask"][0]) / jnp.sum(batch["mask"][0])

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(state["params"])  # one program, not op by op
    want_norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in want_grads.values())))
    step = make()
    one_state, one = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(one["loss"]), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(one["grad_norm"]), want_norm, rtol=1e-4)
    split = {k: jnp.asarray(v.reshape(2, 2, 8)) for k, v in batch.items()}  # grad_accum 2
    two_state, two = step(state, split)
    np.testing.assert_allclose(float(two["loss"]), float(one["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(two["grad_norm"]), float(one["grad_norm"]), rtol=1e-5)
    for name, value in one_state["params"].items():
        np.testing.assert_allclose(np.asarray(two_state["params"][name]), np.asarray(value), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_train_step_clips_the_gradient_by_its_global_norm_and_reports_the_applied_learning_rate():
    """optim.clip_norm scales the whole gradient to that global norm before AdamW (Adam's first moment after one
    step is (1 - b1) x the clipped gradient); the metrics' learning_rate is the one the step applied (0 at the first
    warmup step); remat="full" reaches the step's loss (its layers under jax.checkpoint)."""
    import functools

    import jax
    import jax.numpy as jnp

    from experiments import data as data_lib
    from experiments.train import masked_loss

    run, setup, state, make = _step_setup("optim.clip_norm=0.01", "optim.warmup_steps=4", "data.seq_len=8",
                                          "data.batch_size=2")
    batch = {k: jnp.asarray(v) for k, v in data_lib.batch_at(run.data, run.model.vocab_size, 0, 0).items()}
    grad = jax.jit(jax.grad(functools.partial(masked_loss, graphdef=setup.graphdef, structure=setup.structure)))
    grads = grad(state["params"], {k: v[0] for k, v in batch.items()}, jnp.sum(batch["mask"]))  # one program
    step = make()
    new_state, metrics = step(state, batch)
    norm = float(metrics["grad_norm"])
    assert norm > 0.1  # ten times the clip norm: clipping is active
    mu = new_state["opt_state"][1][0].mu
    for name, g in grads.items():
        np.testing.assert_allclose(np.asarray(mu[name]), (1 - run.optim.b1) * np.asarray(g) * 0.01 / norm,
                                   rtol=1e-4, atol=1e-10, err_msg=name)
    assert float(metrics["learning_rate"]) == 0.0
    _, metrics = step(new_state, batch)
    np.testing.assert_allclose(float(metrics["learning_rate"]), run.optim.learning_rate / 4, rtol=1e-6)
    assert "remat" in str(jax.make_jaxpr(make("full"))(state, batch))  # jax.checkpoint: the remat2 primitive
    assert "remat" not in str(jax.make_jaxpr(step)(state, batch))


def test_a_resume_needs_the_corpus_its_checkpoint_read(tmp_path):
    """A token file rewritten under the same name (tokenize_corpus run again on more text) is another stream: a
    resume continued it at the old position, silently. The checkpoint's data position keeps the corpus size and
    SHA-256; a resume on a corpus of another size is refused naming the file and both sizes, one of the same size
    with other ids (missed when only the size was kept) naming the SHA-256 it needs; the same ids written again
    resume, as does a checkpoint written before the SHA-256 was kept. Run on the real trainer."""
    import hashlib

    from configs import load_config
    from configs.schema import ConfigError
    from experiments.data import corpus_identity
    from experiments.train import check_position, train

    token_file = tmp_path / "tokens.npy"
    ids = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16)
    np.save(token_file, ids)
    common = [f"output_dir={tmp_path / 'run'}", "data.task=tokens", f"data.token_file={token_file}",
              "data.seq_len=16", "data.batch_size=2", "model.num_hidden_layers=1", "checkpoint_every=2"]
    train(load_config("tiny_falcon_mamba", [*common, "steps=2"]))
    position = json.loads(next((tmp_path / "run" / "checkpoints" / "2").glob("data*/*")).read_text())
    sha = hashlib.sha256(ids.tobytes()).hexdigest()
    assert position == {"step": 2, "task": "tokens", "seed": 0, "corpus_size": 4000, "corpus_sha256": sha}
    needs = (f"config field 'data.token_file': resuming '{tmp_path / 'run'}' needs the corpus its checkpoint step 2 "
             f"was trained on, of 4000 tokens")
    for rewrite, got in ((np.random.default_rng(1).integers(0, 256, 5000), f"; got 5000 in '{token_file}'"),
                         (np.random.default_rng(2).integers(0, 256, 4000),
                          f" with SHA-256 {sha[:16]}...; got other tokens of that size in '{token_file}'")):
        np.save(token_file, rewrite.astype(np.uint16))
        with pytest.raises(ConfigError, match=re.escape(
                f"{needs}{got} (rewritten since; a new output_dir starts a new run)")):
            train(load_config("tiny_falcon_mamba", [*common, "steps=4"]))
    np.save(token_file, ids)
    assert [row["step"] for row in train(load_config("tiny_falcon_mamba", [*common, "steps=4"]))][-1] == 4
    np.save(token_file, np.random.default_rng(2).integers(0, 256, 4000).astype(np.uint16))
    old = {key: value for key, value in position.items() if key != "corpus_sha256"}  # before the SHA-256 was kept
    run = load_config("tiny_falcon_mamba", [*common, "steps=6"])
    check_position(old, run, tmp_path / "run", corpus_identity(run.data))


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_its_step_and_directory(tmp_path):
    """A full disk (here: a file-size limit, what a non-root test can set) fails the asynchronous save: the run
    stops with one error line naming the checkpoint step and directory (it was Orbax's own ValueError, naming a
    file inside the temporary directory, where a later cleanup's failure did not replace it by a traceback)."""
    import sys

    # the limit is set by the child itself before it runs the trainer (a preexec_fn would run Python between fork
    # and exec in this multithreaded JAX process, which can deadlock)
    launcher = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "  # EFBIG, no core
                "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "  # a checkpoint's data file is larger
                "sys.argv[0] = 'experiments.train'; runpy.run_module('experiments.train', run_name='__main__')")
    env = {key: value for key, value in cli_env(1, tmp_path / "cache").items()
           if not key.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}  # cache entries are large too
    command = [sys.executable, "-c", launcher, "tiny_falcon_mamba", f"output_dir={tmp_path / 'run'}",
               "model.num_hidden_layers=1", "data.seq_len=16", "data.batch_size=2", "steps=4", "checkpoint_every=2"]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: output_dir: could not write checkpoint step 2 in '{tmp_path / 'run' / 'checkpoints'}' ("), errors
    # (Orbax's writer threads may still log their own failures as the interpreter shuts down)


def test_importing_the_trainer_does_not_import_torch():
    """tensorboardX imports torch where it is installed (2-3 s): the trainer imports it when process 0 opens its
    metrics, so `--help`, a config error or a notebook importing experiments.train do not pay for it."""
    import sys

    probe = "import sys, experiments.train; print(sorted({'torch', 'tensorboardX'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_a_full_disk_names_the_metrics_file_and_is_not_hidden_by_the_cleanup(tmp_path, monkeypatch):
    """metrics.jsonl and the TensorBoard files on a full disk: the row's write fails naming the file (an OSError's
    "[Errno 28] No space left on device" names none), and that error stops the run: closing the same files on the
    way out fails too, and that failure (raised from train's cleanup) used to replace it."""
    import errno

    from configs import load_config
    from experiments import metrics
    from experiments.train import train
    from runtime.files import WriteError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    class FullFile:  # what a file on a full disk does: every write, flush and close fails
        def __init__(self, file):
            self.file = file

        write = flush = staticmethod(full)

        def close(self):
            self.file.close()
            full()

    opened = metrics.MetricsWriter.__init__

    def on_a_full_disk(self, *args):
        opened(self, *args)
        self.file = FullFile(self.file)
        monkeypatch.setattr(self.tensorboard, "close", full)

    monkeypatch.setattr(metrics.MetricsWriter, "__init__", on_a_full_disk)
    run = load_config("tiny_falcon_mamba", [f"output_dir={tmp_path}", "model.num_hidden_layers=1", "data.seq_len=16",
                                            "data.batch_size=2", "steps=2"])
    with pytest.raises(WriteError, match=re.escape(
            f"output_dir: could not write step 1's row to '{tmp_path / 'metrics.jsonl'}' (No space left on device)")):
        train(run)

    writer = metrics.MetricsWriter(tmp_path, 0, 2)  # closing: both files closed, the first failure named
    with pytest.raises(WriteError, match=re.escape(f"could not write '{tmp_path / 'metrics.jsonl'}' (No space")):
        writer.close()
    assert writer.file.file.closed
