"""Training data: deterministic in (seed, step), the task registry, the byte stream over the stdlib, the token
stream over a .npy file."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest

from configs import DataConfig
from configs.schema import ConfigError
from experiments.data import TASKS, TRIGGER_TOKEN, batch_at, load_corpus, stream_windows


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """5,000 random ids below 256, as experiments.tokenize_corpus writes them (uint16)."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16))
    return str(path)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_batches_are_a_function_of_seed_and_step(task, token_file):
    config = DataConfig(task=task, batch_size=8, seq_len=32, grad_accum=2,
                        token_file=token_file if task == "tokens" else "")
    a, b = batch_at(config, 256, seed=1, step=5), batch_at(config, 256, seed=1, step=5)
    other = batch_at(config, 256, seed=1, step=6)
    for name in ("inputs", "targets", "mask"):
        assert a[name].shape == (2, 4, 32)
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["inputs"], other["inputs"])
    # another seed, another batch (what keeps evaluation sequences out of training); "bytes" and "tokens" read
    # their corpus by step alone (experiments.evaluate asks for another corpus for them)
    other_seed = batch_at(config, 256, seed=2, step=5)
    assert np.array_equal(a["inputs"], other_seed["inputs"]) == (task in ("bytes", "tokens"))
    assert a["inputs"].dtype == np.int32 and a["inputs"].max() < 256 and a["mask"].sum() > 0
    # targets are the inputs shifted by one
    np.testing.assert_array_equal(a["inputs"][..., 1:], a["targets"][..., :-1])


def test_induction_answer_is_the_token_after_the_first_trigger():
    batch = batch_at(DataConfig(task="induction", batch_size=16, seq_len=24), 64, seed=0, step=0)
    inputs, targets = batch["inputs"][0], batch["targets"][0]
    for row, target in zip(inputs, targets):
        first = int(np.flatnonzero(row == TRIGGER_TOKEN)[0])
        assert row[-1] == TRIGGER_TOKEN and target[-1] == row[first + 1]
    assert batch["mask"][0, :, :-1].sum() == 0 and batch["mask"][0, :, -1].all()


def test_byte_stream_reads_the_stdlib_sequentially():
    corpus = load_corpus("", "*.py")
    assert corpus.size > 1_000_000
    config = DataConfig(task="bytes", batch_size=2, seq_len=8)
    step0 = batch_at(config, 256, seed=0, step=0)["inputs"][0]
    np.testing.assert_array_equal(step0[0], corpus[:8])
    np.testing.assert_array_equal(step0[1], corpus[8:16])
    np.testing.assert_array_equal(batch_at(config, 256, seed=9, step=1)["inputs"][0, 0], corpus[16:24])


def test_byte_stream_under_a_length_curriculum_leaves_no_gap():
    """Steps of 4-byte windows, then 16, then 32: each step starts where the previous one ended (it jumped to
    step * batch * seq_len of the step's own length, skipping text)."""
    corpus = load_corpus("", "*.py")
    config = DataConfig(task="bytes", batch_size=2, seq_len=32, length_curriculum=((4, 3), (16, 2)))
    assert [config.positions_before(step) for step in range(7)] == [0, 4, 8, 12, 28, 44, 76]
    read = np.concatenate([batch_at(config, 256, 0, step)["inputs"][0].reshape(-1) for step in range(7)])
    np.testing.assert_array_equal(read, corpus[:read.size])


def test_bad_data_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.task': expected one of \['bytes', 'copy', 'induction', 'mqar', "
                                          r"'selective_copying', 'tokens'\], "
                                          r"got 'cpy'"):
        batch_at(DataConfig(task="cpy"), 256, 0, 0)
    with pytest.raises(ConfigError, match=r"'model.vocab_size': expected >= 256 for data.task 'bytes'"):
        batch_at(DataConfig(task="bytes"), 100, 0, 0)
    with pytest.raises(ConfigError, match=r"'data.text_dir': expected a directory with files matching"):
        batch_at(DataConfig(task="bytes", text_dir=str(tmp_path)), 256, 0, 0)
    with pytest.raises(ConfigError, match=r"'batch_size': expected a multiple of grad_accum \(3\), got 8"):
        DataConfig(batch_size=8, grad_accum=3)


def test_length_curriculum_stages_then_seq_len():
    config = DataConfig(task="induction", seq_len=64, batch_size=4, length_curriculum=((8, 3), (16, 2)))
    assert [config.seq_len_at(step) for step in range(7)] == [8, 8, 8, 16, 16, 64, 64]
    for step, length in ((0, 8), (4, 16), (5, 64)):
        batch = batch_at(config, 16, 0, step)
        assert batch["inputs"].shape == (1, 4, length)
        # a stage's batch is the task at that length: the answer follows the first trigger
        inputs, targets = batch["inputs"][0], batch["targets"][0]
        assert (inputs[:, -1] == TRIGGER_TOKEN).all()
        first = (inputs == TRIGGER_TOKEN).argmax(axis=1)
        np.testing.assert_array_equal(targets[:, -1], inputs[np.arange(4), first + 1])
    whole = DataConfig(task="induction", seq_len=64, batch_size=4)
    np.testing.assert_array_equal(batch_at(config, 16, 0, 5)["inputs"], batch_at(whole, 16, 0, 5)["inputs"])


def test_length_curriculum_errors_name_the_field():
    from configs import load_config

    with pytest.raises(ConfigError, match=r"length_curriculum\[0\].*<= data.seq_len \(64\)"):
        DataConfig(seq_len=64, length_curriculum=((128, 10),))
    with pytest.raises(ConfigError, match=r"length_curriculum\[1\].*two positive integers"):
        DataConfig(seq_len=64, length_curriculum=((16, 10), (32,)))
    with pytest.raises(ConfigError, match=r"data.length_curriculum.*fewer than steps \(20\)"):
        load_config("tiny_falcon_mamba", ["steps=20", "data.seq_len=64", "data.length_curriculum=[[16, 20]]"])
    run = load_config("tiny_falcon_mamba", ["steps=30", "data.seq_len=64", "data.length_curriculum=[[16, 10]]"])
    assert run.data.length_curriculum == ((16, 10),)
    # a stage too short for its task is named before step 0 (it failed at the step the stage started, naming
    # data.seq_len, which was fine)
    from experiments.data import check_data

    run = load_config("mqar_falcon_mamba", ["data.length_curriculum=[[64, 10], [8, 10]]", "steps=300",
                                            "optim.decay_steps=10"])
    with pytest.raises(ConfigError, match=r"'data.length_curriculum\[1\]': stage length 8 fails the task's check: "
                                          r"config field 'data.seq_len': expected >= 31"):
        check_data(run.data, run.model.vocab_size)
    check_data(load_config("mqar_falcon_mamba").data, 64)


@pytest.mark.parametrize("glob", ["", "/usr/lib/*.py", "**x"])
def test_a_text_glob_pathlib_refuses_is_named(glob):
    with pytest.raises(ConfigError, match=rf"'data.text_glob': expected a non-empty glob pattern relative to "
                                          rf"data.text_dir, got '{re.escape(glob)}'"):
        batch_at(DataConfig(task="bytes", text_glob=glob), 256, 0, 0)


def test_a_corpus_of_one_window_is_read_whole(tmp_path):
    """seq_len + 1 bytes is the smallest corpus (its windows wrapped modulo 0: a divide-by-zero warning and
    garbage starts); one byte fewer is named."""
    (tmp_path / "a.txt").write_bytes(b"0123456789")
    config = DataConfig(task="bytes", text_dir=str(tmp_path), text_glob="*.txt", seq_len=9, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = batch_at(config, 256, 0, 3)
    np.testing.assert_array_equal(batch["inputs"][0], [list(b"012345678")] * 2)
    np.testing.assert_array_equal(batch["targets"][0], [list(b"123456789")] * 2)
    with pytest.raises(ConfigError, match=r"'data.seq_len': expected < the corpus size \(10 bytes\), got 10"):
        batch_at(dataclasses.replace(config, seq_len=10), 256, 0, 0)


def test_the_stream_reads_a_corpus_to_its_last_byte(tmp_path):
    """Window starts wrap modulo the corpus's valid starts (size - seq_len): they wrapped one earlier, so the last
    byte was never read, and a corpus whose last window ended at its last byte lost that window."""
    (tmp_path / "a.txt").write_bytes(bytes(range(13)))
    config = DataConfig(task="bytes", text_dir=str(tmp_path), text_glob="*.txt", seq_len=9, batch_size=1)
    ends = {int(batch_at(config, 256, 0, step)["targets"][0, 0, -1]) for step in range(4)}
    assert ends == {9, 10, 11, 12}  # starts 9 * step modulo the 4 valid starts
    assert stream_windows(config) == 1 and stream_windows(dataclasses.replace(config, seq_len=7)) == 1
    assert stream_windows(dataclasses.replace(config, seq_len=6)) == 2  # bytes 0..6 and 6..12


def test_token_stream_reads_the_file_sequentially(token_file):
    tokens = np.load(token_file)
    config = DataConfig(task="tokens", token_file=token_file, batch_size=2, seq_len=8)
    step0 = batch_at(config, 256, seed=0, step=0)
    np.testing.assert_array_equal(step0["inputs"][0], [tokens[:8], tokens[8:16]])
    np.testing.assert_array_equal(step0["targets"][0], [tokens[1:9], tokens[9:17]])
    assert step0["inputs"].dtype == np.int32 and step0["mask"].all()
    np.testing.assert_array_equal(batch_at(config, 256, seed=9, step=1)["inputs"][0, 0], tokens[16:24])


def test_bad_token_files_are_named(tmp_path, token_file):
    def fails(path, message, vocab=256):
        with pytest.raises(ConfigError, match=message):
            batch_at(DataConfig(task="tokens", token_file=str(path), seq_len=8, batch_size=2), vocab, 0, 0)

    fails("", r"^config field 'data.token_file': expected a .npy file of token ids for data.task 'tokens' "
              r"\(python -m experiments.tokenize_corpus writes one\), got ''$")
    fails(tmp_path / "none.npy", r"^config field 'data.token_file': expected a .npy file of token ids, got "
                                 r"'.*none.npy'")
    (tmp_path / "text.npy").write_text("not numpy")
    fails(tmp_path / "text.npy", r"expected a .npy file of token ids, got '.*text.npy' \(")
    np.save(tmp_path / "grid.npy", np.zeros((4, 4), np.int32))
    fails(tmp_path / "grid.npy", r"expected a non-empty 1-D array of integer token ids, got '.*grid.npy' with shape "
                                 r"\(4, 4\) and dtype int32")
    np.savez(tmp_path / "archive.npz", ids=np.arange(64))
    fails(tmp_path / "archive.npz", r"expected a .npy file of token ids, got '.*archive.npz' \(an .npz archive\)$")
    np.save(tmp_path / "floats.npy", np.zeros(64, np.float32))
    fails(tmp_path / "floats.npy", r"with shape \(64,\) and dtype float32")
    fails(token_file, r"^config field 'data.token_file': expected token ids in \[0, 200\) \(model.vocab_size\), "
                      r"got ids from 0 to 255 in", vocab=200)


def test_a_rewritten_token_file_is_read_again(tmp_path):
    """The memory map and the id range are remembered per file version: a file rewritten in place (tokenize_corpus
    run again) gave the old windows, and the old range check, in the same process."""
    path = tmp_path / "tokens.npy"
    config = DataConfig(task="tokens", token_file=str(path), batch_size=1, seq_len=4)
    np.save(path, np.arange(16, dtype=np.uint16))
    np.testing.assert_array_equal(batch_at(config, 256, 0, 0)["inputs"][0, 0], [0, 1, 2, 3])
    np.save(path, np.arange(300, 332, dtype=np.uint16))
    with pytest.raises(ConfigError, match=r"expected token ids in \[0, 256\) .* got ids from 300 to 331"):
        batch_at(config, 256, 0, 0)
    np.testing.assert_array_equal(batch_at(config, 400, 0, 0)["inputs"][0, 0], [300, 301, 302, 303])


def test_a_rewritten_text_corpus_is_read_again_at_a_runs_start(tmp_path):
    """check_data (the start of a train or evaluate call) reads a bytes corpus rewritten since it was read: a second
    run in the same process (a notebook) trained on the old text, and its resume check compared the old size."""
    from experiments.data import check_data, corpus_identity

    (tmp_path / "a.txt").write_bytes(b"x" * 100)
    config = DataConfig(task="bytes", text_dir=str(tmp_path), text_glob="*.txt", batch_size=1, seq_len=4)
    assert corpus_identity(config)["corpus_size"] == 100
    (tmp_path / "a.txt").write_bytes(b"y" * 50)
    (tmp_path / "b.txt").write_bytes(b"z" * 9)
    check_data(config, 256)
    assert corpus_identity(config)["corpus_size"] == 60
    np.testing.assert_array_equal(batch_at(config, 256, 0, 0)["inputs"][0, 0], list(b"yyyy"))
