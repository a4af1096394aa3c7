"""Two processes on localhost (one CPU device each, gloo collectives) train the same model as one process
with two devices."""

from __future__ import annotations

import socket
import subprocess

import numpy as np

from experiments.metrics import read_metrics
from tests.train_helpers import ROOT, cli_env, run_train, train_command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    common = ["steps=4", "mesh.data=2", "checkpoint_every=2"]
    run_train("tiny_falcon_mamba", tmp_path / "single", *common, devices=2, cache_dir=tmp_path / "cache")
    port = _free_port()
    procs = [subprocess.Popen(
        train_command("tiny_falcon_mamba", tmp_path / "multi", *common, "distributed.initialize=true",
                      f"distributed.coordinator_address=localhost:{port}", "distributed.num_processes=2",
                      f"distributed.process_id={i}"),
        env=cli_env(1, tmp_path / f"cache{i}"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-2000:] for out in outputs)
    single = [row["loss"] for row in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    multi = [row["loss"] for row in read_metrics(tmp_path / "multi" / "metrics.jsonl")]
    assert len(multi) == 4
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


STOP_SCRIPT = """
import sys
from pathlib import Path
import jax
from configs import load_config
from configs.schema import ConfigError
from experiments.checkpointing import Checkpointer
from experiments.train import _StopFlag, check_processes_agree
from jax.experimental import multihost_utils
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
me = jax.process_index()
flags = []
for signalled in ([], [1], [0, 1], []):  # which processes got SIGTERM before each step boundary
    stop = _StopFlag()
    stop.requested = me in signalled
    flags.append(stop.agreed())
print("agreed", flags)
corpus = {"corpus_size": 100, "corpus_sha256": "ab" * 32}
check_processes_agree(load_config("tiny_falcon_mamba", [f"distributed.process_id={me}"]), corpus)
for overrides, other in (([f"seed={me}"], corpus), ([], {"corpus_size": 100 + me, "corpus_sha256": "cd" * 32})):
    try:
        check_processes_agree(load_config("tiny_falcon_mamba", overrides), other)
    except ConfigError as err:
        print("refused:", err)
# a host whose shared file system lists it no checkpoint yet (a stale listing) resumes process 0's newest
directory = Path(sys.argv[3]) / "checkpoints"
if me == 0:
    (directory / "7").mkdir(parents=True)
else:
    from orbax.checkpoint._src.path import step
    step._StandardNameFormat._glob_step_paths = lambda self, base_path: []
multihost_utils.sync_global_devices("directories made")
checkpointer = Checkpointer(directory, 2)
print("latest step", checkpointer.latest_step())
checkpointer.close()
# a process that fails alone (its corpus unreadable; process 0's config.yaml write) stops every process at the next
# agreement point, the others naming it and its error (they waited in the next collective until JAX ended them)
from experiments import data, train
from runtime.files import WriteError
def fail(error):
    def raising(*args):
        raise error
    return raising
run = load_config("tiny_falcon_mamba", [f"output_dir={sys.argv[3]}/run", "model.num_hidden_layers=1"])
prepare = train.prepare
train.prepare = lambda run: prepare(run)._replace(init_state=lambda: {}, state_shardings={})  # nothing to compile
for module, name, process, error in ((data, "corpus_identity", 1, PermissionError(13, "Permission denied")),
                                     (train, "write_text_atomic", 0, OSError(28, "No space left on device"))):
    real = getattr(module, name)
    if me == process:
        setattr(module, name, fail(error))
    try:
        train.train(run)
    except Exception as err:
        print(f"{name} failed:", type(err).__name__, err, "; run/ left:", Path(run.output_dir).exists())
    setattr(module, name, real)
stop = _StopFlag()
with stop.deferring():  # in the training loop: process 0 could not write a metrics row
    if me == 0:
        raise WriteError("output_dir: could not write step 2's row to 'metrics.jsonl' (No space left on device)")
try:
    stop.agreed()
except Exception as err:
    print("loop failed:", type(err).__name__, err)
"""


def test_processes_agree_on_a_stop_their_config_their_corpus_and_the_step_to_resume(tmp_path):
    """The training loop's stop decision is taken together: SIGTERM on any one process stops all of them at the
    same step boundary (one stopping alone would leave the others blocked in the next step's collectives). Every
    process must run the same config on the same corpus (each builds the global batch from its own copy), and all
    resume process 0's newest checkpoint. An error of one process alone, at start-up (its corpus, process 0's
    config.yaml) or in the loop (process 0's metrics row), stops every process at the next agreement point, the
    others naming it and its error (they waited in the next collective until JAX ended them, the cause unsaid)."""
    import sys

    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", STOP_SCRIPT, address, str(i), str(tmp_path)],
                              env=cli_env(1, tmp_path / "cache"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:  # one waiting for a failed one in a collective is not left behind
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-2000:] for out in outputs)
    for i, out in enumerate(outputs):
        assert "agreed [False, True, True, False]" in out, out[-2000:]
        assert "refused: distributed: expected every process to run process 0's config" in out and \
            "got another one on processes [1]" in out, out[-2000:]
        assert (f"refused: config field 'data.text_dir': expected every process to read process 0's corpus, got "
                f"other bytes on processes [1] (each process reads its own copy; process {i}'s: {100 + i} bytes, "
                f"SHA-256 cdcdcdcdcdcdcdcd...)") in out, out[-2000:]
        assert "latest step 7" in out, out[-2000:]
    assert "corpus_identity failed: ProcessFailedError distributed: process 1 failed at start-up, so every process " \
        "stops: PermissionError: [Errno 13] Permission denied ; run/ left: False" in outputs[0], outputs[0][-2000:]
    assert "corpus_identity failed: PermissionError [Errno 13] Permission denied" in outputs[1], outputs[1][-2000:]
    assert "write_text_atomic failed: WriteError output_dir: could not write " in outputs[0], outputs[0][-2000:]
    assert "write_text_atomic failed: ProcessFailedError distributed: process 0 failed writing config.yaml or " \
        "metrics.jsonl, so every process stops: WriteError: output_dir: could not write " in outputs[1], \
        outputs[1][-2000:]
    assert "loop failed: WriteError output_dir: could not write step 2's row" in outputs[0], outputs[0][-2000:]
    assert "loop failed: ProcessFailedError distributed: process 0 failed during the training loop, so every " \
        "process stops: WriteError: output_dir: could not write step 2's row" in outputs[1], outputs[1][-2000:]
