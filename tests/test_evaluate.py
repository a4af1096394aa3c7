"""experiments.evaluate: masked accuracy against oracles that solve (or miss) the task by reading the inputs,
and the command line on a real (tiny) training run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from configs.schema import ConfigError, DataConfig
from experiments.data import NOISE_TOKEN, SEPARATOR_TOKEN
from experiments.evaluate import check_held_out, masked_accuracy

VOCAB = 16
ROOT = Path(__file__).resolve().parent.parent


class SelectiveCopyingOracle:
    """Predicts, after the separator, the non-noise tokens of the inputs in order; ``wrong_from`` makes every
    copied token from that index on wrong (the model sees only the inputs, as a model does)."""

    config = SimpleNamespace(vocab_size=VOCAB)

    def __init__(self, wrong_from: int | None = None):
        self.wrong_from = wrong_from

    def __call__(self, inputs):
        inputs = np.asarray(inputs)
        logits = np.zeros(inputs.shape + (VOCAB,), np.float32)
        for row, ids in enumerate(inputs):
            start = int(np.argmax(ids == SEPARATOR_TOKEN))
            content = ids[:start][ids[:start] != NOISE_TOKEN]
            for i, token in enumerate(content):
                if self.wrong_from is not None and i >= self.wrong_from:
                    token = 3 + (token - 2) % (VOCAB - 3)  # another content token
                logits[row, start + i, token] = 1.0
        return logits


DATA = DataConfig(task="selective_copying", seq_len=48, num_items=4, batch_size=8)
RIGHT_NLL = float(np.log(np.e + VOCAB - 1) - 1)  # the oracle's loss on a token it gets right


def test_oracle_is_exact_and_counts_every_masked_token():
    result = masked_accuracy(SelectiveCopyingOracle(), DATA, sequences=10, batch_size=4, seed=3)
    # the loss: -log softmax of a one-hot logit 1 among VOCAB - 1 zeros, at every masked token
    assert result.pop("loss") == pytest.approx(RIGHT_NLL, rel=1e-6)
    assert result == {"token_accuracy": 1.0, "sequence_accuracy": 1.0, "sequences": 10, "tokens": 40}


def test_partial_errors_count_per_token_and_per_sequence():
    result = masked_accuracy(SelectiveCopyingOracle(wrong_from=3), DATA, sequences=6, batch_size=4, seed=3)
    assert result["token_accuracy"] == pytest.approx(3 / 4) and result["sequence_accuracy"] == 0.0
    assert result["loss"] == pytest.approx((3 * RIGHT_NLL + (RIGHT_NLL + 1)) / 4, rel=1e-6)  # a wrong one: +1
    with pytest.raises(ValueError, match="sequences, batch_size"):
        masked_accuracy(SelectiveCopyingOracle(), DATA, sequences=0, batch_size=4, seed=3)


def test_command_line_on_a_trained_run(tmp_path):
    """Trained on one device with microbatches of one sequence, evaluated on four devices (the training batch
    plays no part in loading the model: it was sharded over the four, a MeshError)."""
    from experiments.train import main as train_main

    out = tmp_path / "run"  # trained in this process (its command line runs in a process of its own in test_train)
    assert train_main(["tiny_falcon_mamba", "steps=2", f"output_dir={out}", "data.task=selective_copying",
                       "data.seq_len=24", "data.num_items=4", "data.batch_size=2", "data.grad_accum=2",
                       "model.vocab_size=16"]) == 0
    evaluate = [sys.executable, "-m", "experiments.evaluate", str(out)]
    four_devices = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([*evaluate, "--sequences", "5", "--batch-size", "2", "data.seq_len=40",
                             "--json", str(tmp_path / "acc.json")], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=four_devices)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "acc.json").read_text())
    assert printed["step"] == 2 and printed["seq_len"] == 40 and printed["sequences"] == 5
    assert printed["tokens"] == 20 and 0.0 <= printed["token_accuracy"] <= 1.0
    from experiments import evaluate as evaluate_lib

    with pytest.raises(SystemExit, match="expected data.KEY=VALUE items"):
        evaluate_lib.main([str(out), "model.hidden_size=8"])
    with pytest.raises(SystemExit, match="has no config.yaml"):
        evaluate_lib.main([str(tmp_path / "nowhere")])


def test_bytes_task_needs_text_the_run_did_not_train_on():
    """Every byte of a bytes run's corpus is training data (its batches ignore the seed): evaluating it on the
    same files would score the training set."""
    trained = DataConfig(task="bytes", text_dir="", text_glob="*.py")
    stdlib = os.path.dirname(os.__file__)
    for same in (trained, DataConfig(task="bytes", text_dir=stdlib, text_glob="*.py"),  # "" is this directory
                 DataConfig(task="bytes", text_dir=stdlib + "/./", text_glob="o*.py")):  # a part of the files
        with pytest.raises(ConfigError, match=r"data\.text_dir.*sharing no file with the run's \('' / '\*\.py'\)"):
            check_held_out(trained, same)
    check_held_out(trained, DataConfig(task="bytes", text_dir="/elsewhere", text_glob="*.py"))
    check_held_out(trained, DataConfig(task="bytes", text_dir="", text_glob="*.txt"))
    check_held_out(DataConfig(task="copy"), DataConfig(task="copy"))  # the seed offset holds the synthetic ones out
    # a run of a synthetic task never read a corpus: any text is held out for it (it was refused)
    check_held_out(DataConfig(task="mqar"), DataConfig(task="bytes", text_dir="", text_glob="*.py"))


def test_tokens_task_needs_another_token_file(tmp_path):
    trained = DataConfig(task="tokens", token_file=str(tmp_path / "train.npy"))
    with pytest.raises(ConfigError, match=r"^config field 'data.token_file': the tokens task trains on every token "
                                          r"of its file, .*expected another file than the run's '.*train.npy', "
                                          r"got '.*/\./train.npy'"):
        check_held_out(trained, DataConfig(task="tokens", token_file=f"{tmp_path}/./train.npy"))  # spelt apart
    check_held_out(trained, DataConfig(task="tokens", token_file=str(tmp_path / "held_out.npy")))


def test_sequences_are_the_streams_first_ones():
    """masked_accuracy scores the first ``sequences`` sequences of the evaluation stream, each once: the last,
    partial batch is the head of a whole batch (at a smaller batch size, the bytes task's windows started inside
    the previous batch's: 28 of 100 sequences were scored twice)."""
    from experiments.data import batch_at

    class Recorder:  # stands in for a model: records the inputs, predicts token 0
        config = SimpleNamespace(vocab_size=300)

        def __init__(self):
            self.seen = []

        def __call__(self, inputs):
            self.seen.append(np.asarray(inputs))
            return np.zeros(inputs.shape + (300,), np.float32)

    data = DataConfig(task="bytes", text_dir="", text_glob="*.py", seq_len=16)
    model = Recorder()
    masked_accuracy(model, data, sequences=5, batch_size=2, seed=0)
    whole = dataclasses.replace(data, batch_size=6)
    np.testing.assert_array_equal(np.concatenate(model.seen), batch_at(whole, 300, 0, 0)["inputs"][0, :5])



@pytest.fixture
def untrained_run(tmp_path):
    """An output_dir with a config.yaml (selective copying, vocabulary 16) and no checkpoints/."""
    from configs import dump_config, load_config

    run = load_config("tiny_falcon_mamba", [f"output_dir={tmp_path}", "data.task=selective_copying",
                                            "data.seq_len=24", "model.vocab_size=16"])
    (tmp_path / "config.yaml").write_text(dump_config(run))
    return tmp_path


@pytest.mark.parametrize("argv,named", [
    (["--sequences", "0"], "--sequences: expected a positive integer, got 0"),
    (["--batch-size", "-1"], "--batch-size: expected a positive integer, got -1"),
    (["--json", "{run}/no_dir/acc.json"], "--json: expected a file path in a writable directory, got "
                                          "'{run}/no_dir/acc.json' (its directory '{run}/no_dir' does not exist)"),
    (["--json", "{run}"], "--json: expected a file path in a writable directory, got '{run}' (is a directory)"),
    (["data.task=copy", "data.seq_len=1"], "config field 'data.seq_len': expected >= 2 for data.task 'copy'"),
    ([], "output_dir: '{run}' has no checkpoint yet"),  # the first thing loading the model finds
])
def test_arguments_are_checked_before_the_model_is_loaded(untrained_run, argv, named):
    """Each bad argument is one error line before the model is loaded (they were tracebacks after it; --json
    failed after the evaluation); reading a run creates no checkpoints/ directory in it."""
    from experiments import evaluate as evaluate_lib

    with pytest.raises(SystemExit) as exc:
        evaluate_lib.main([str(untrained_run), *(a.format(run=untrained_run) for a in argv)])
    assert str(exc.value).startswith("error: " + named.format(run=untrained_run)), exc.value
    assert not (untrained_run / "checkpoints").exists()


def test_a_reader_creates_no_checkpoint_directory_and_a_trainer_does(tmp_path):
    from experiments.checkpointing import Checkpointer

    reader = Checkpointer(tmp_path / "a" / "checkpoints", 1, create=False)
    assert reader.latest_step() is None and not (tmp_path / "a").exists()
    reader.close()
    Checkpointer(tmp_path / "b" / "checkpoints", 1).close()
    assert (tmp_path / "b" / "checkpoints").is_dir()


def test_the_batch_is_at_most_the_sequences(monkeypatch):
    """--batch-size 64 with --sequences 3 makes batches of 3 (64 rows were generated and 61 cut)."""
    from experiments import evaluate as evaluate_lib

    sizes, batch_at = [], evaluate_lib.batch_at

    def recording_batch_at(config, *args):
        sizes.append(config.batch_size)
        return batch_at(config, *args)

    monkeypatch.setattr(evaluate_lib, "batch_at", recording_batch_at)
    result = masked_accuracy(SelectiveCopyingOracle(), DATA, sequences=3, batch_size=64, seed=3)
    assert sizes == [3] and result == {"token_accuracy": 1.0, "sequence_accuracy": 1.0, "sequences": 3,
                                       "tokens": 12, "loss": pytest.approx(RIGHT_NLL, rel=1e-6)}


def test_rows_are_scored_as_many_at_a_time_as_logits_bytes_allows(monkeypatch):
    """The whole batch's logits were made at once (with a log_softmax copy): 34 GB each at 64 x 2048 x 65,024."""
    from experiments import evaluate as evaluate_lib

    calls, oracle = [], SelectiveCopyingOracle(wrong_from=2)

    def model(inputs):
        calls.append(len(inputs))
        return oracle(inputs)

    model.config = oracle.config
    whole = masked_accuracy(oracle, DATA, sequences=5, batch_size=5, seed=3)
    monkeypatch.setattr(evaluate_lib, "LOGITS_BYTES", 2 * DATA.seq_len * VOCAB * 4 + 1)  # two rows' logits
    assert masked_accuracy(model, DATA, sequences=5, batch_size=5, seed=3) == whole and calls == [2, 2, 1]


def test_a_corpus_task_scores_each_window_of_the_held_out_file_once(tmp_path):
    """The bytes and tokens streams wrap around at the corpus's end: --sequences past the windows a held-out file
    holds scored its text twice and counted it as more held-out tokens. It is refused before the model loads."""
    from configs import dump_config, load_config
    from experiments import evaluate as evaluate_lib
    from experiments.data import batch_at, stream_windows

    np.save(tmp_path / "held_out.npy", np.arange(100, dtype=np.uint16))
    run = load_config("tiny_falcon_mamba", [f"output_dir={tmp_path}", "data.task=tokens", "data.seq_len=10",
                                            f"data.token_file={tmp_path / 'train.npy'}"])
    (tmp_path / "config.yaml").write_text(dump_config(run))
    held_out = dataclasses.replace(run.data, token_file=str(tmp_path / "held_out.npy"), batch_size=10)
    assert stream_windows(held_out) == 9 and stream_windows(DATA) is None
    starts = batch_at(held_out, 256, 0, 0)["inputs"][0, :, 0]
    assert list(starts[:9]) == list(range(0, 90, 10)) and starts[9] < 90  # the tenth row reads text again
    argv = [str(tmp_path), f"data.token_file={tmp_path / 'held_out.npy'}"]
    with pytest.raises(SystemExit, match=r"^error: --sequences: expected at most 9 \(the windows of data.seq_len 10 "
                                         r"the held-out corpus holds, each scored once\), got 10$"):
        evaluate_lib.main([*argv, "--sequences", "10"])
    with pytest.raises(SystemExit, match="has no checkpoint yet"):  # 9 pass: the model is loaded next
        evaluate_lib.main([*argv, "--sequences", "9"])
