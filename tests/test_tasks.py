"""The synthetic tasks' definitions: induction heads, selective copying, MQAR (experiments/data.py)."""

from __future__ import annotations

import numpy as np
import pytest

from configs import DataConfig, load_config
from configs.schema import ConfigError
from experiments.data import (FIRST_CONTENT_TOKEN, NOISE_TOKEN, SEPARATOR_TOKEN, TRIGGER_TOKEN, TASKS,
                              batch_at)


def _rows(task, vocab=16, seq_len=64, batch=32, seed=0, step=0, **kw):
    data = batch_at(DataConfig(task=task, batch_size=batch, seq_len=seq_len, **kw), vocab, seed, step)
    return data["inputs"][0], data["targets"][0], data["mask"][0]


@pytest.mark.parametrize("vocab,seq_len", [(16, 256), (8, 5), (40, 1000)])
def test_induction_heads_answer_is_the_token_after_the_only_earlier_trigger(vocab, seq_len):
    inputs, targets, mask = _rows("induction", vocab, seq_len, batch=64)
    assert inputs.shape == (64, seq_len) and inputs.max() < vocab
    for row, target in zip(inputs, targets):
        triggers = np.flatnonzero(row == TRIGGER_TOKEN)
        assert len(triggers) == 2 and triggers[1] == seq_len - 1        # once earlier, once at the end
        assert triggers[0] + 1 < seq_len - 1 and target[-1] == row[triggers[0] + 1]
        assert row[triggers[0] + 1] >= FIRST_CONTENT_TOKEN
    # the loss is only on the final answer token
    assert mask[:, -1].all() and mask[:, :-1].sum() == 0


def test_induction_trigger_positions_cover_the_whole_sequence():
    inputs, _, _ = _rows("induction", 16, 32, batch=2000)
    first = np.argmax(inputs == TRIGGER_TOKEN, axis=1)
    assert first.min() == 0 and first.max() == 32 - 3


@pytest.mark.parametrize("task", ["induction", "selective_copying", "mqar", "copy"])
def test_tasks_are_deterministic_in_seed_and_step(task):
    kw = dict(vocab=64, seq_len=128, num_items=8)
    a, b = _rows(task, seed=3, step=7, **kw), _rows(task, seed=3, step=7, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], _rows(task, seed=3, step=8, **kw)[0])
    assert not np.array_equal(a[0], _rows(task, seed=4, step=7, **kw)[0])
    np.testing.assert_array_equal(a[0][:, 1:], a[1][:, :-1])    # targets are the next tokens


def test_copy_task_loss_is_on_the_copy_alone():
    """inputs: a random half, the separator, the half again; the masked targets are the copy, from the token
    after the separator."""
    half = 15
    for inputs, targets, mask in zip(*_rows("copy", vocab=64, seq_len=2 * half + 1, batch=4)):
        assert inputs[half] == SEPARATOR_TOKEN and (inputs[:half] >= FIRST_CONTENT_TOKEN).all()
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(half, 2 * half))
        np.testing.assert_array_equal(targets[mask == 1], inputs[:half])


@pytest.mark.parametrize("vocab,seq_len,n", [(16, 256, 16), (5, 10, 3), (100, 4096, 16)])
def test_selective_copying_copies_the_scattered_tokens_in_order(vocab, seq_len, n):
    inputs, targets, mask = _rows("selective_copying", vocab, seq_len, batch=16, num_items=n)
    region = seq_len - n
    assert inputs.max() < vocab
    for row, target, m in zip(inputs, targets, mask):
        content = row[:region][row[:region] != NOISE_TOKEN]
        assert len(content) == n and (content >= FIRST_CONTENT_TOKEN).all()
        assert row[region] == SEPARATOR_TOKEN
        np.testing.assert_array_equal(target[m > 0], content)             # copied in order
        assert np.flatnonzero(m).tolist() == list(range(region, seq_len))  # targets of the separator onwards
    # the content is scattered: positions differ between rows
    assert len({tuple(np.flatnonzero(r[:region])) for r in inputs}) > 1


@pytest.mark.parametrize("vocab,seq_len,n", [(64, 128, 8), (11, 16, 4), (8192, 512, 64)])
def test_mqar_answers_are_the_values_of_the_queried_keys(vocab, seq_len, n):
    inputs, targets, mask = _rows("mqar", vocab, seq_len, batch=8, num_items=n)
    assert inputs.max() < vocab
    for row, target, m in zip(inputs, targets, mask):
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert len(set(keys.tolist())) == n
        table = dict(zip(keys.tolist(), values.tolist()))
        asked = np.flatnonzero(m)
        assert len(asked) == n and (asked >= 2 * n).all()
        assert sorted(row[asked].tolist()) == sorted(keys.tolist())      # every key queried once
        for pos in asked:
            assert target[pos] == table[int(row[pos])]
        assert set(np.unique(row[2 * n:])) <= set(keys.tolist()) | set(values.tolist()) | {NOISE_TOKEN}


def test_task_settings_that_cannot_fit_are_named():
    with pytest.raises(ConfigError, match=r"'data.seq_len': expected >= 31 \(4 \* data.num_items - 1\)"):
        batch_at(DataConfig(task="mqar", seq_len=20, num_items=8), 64, 0, 0)
    with pytest.raises(ConfigError, match=r"'model.vocab_size': expected >= 19 for data.task 'mqar'"):
        batch_at(DataConfig(task="mqar", seq_len=128, num_items=8), 16, 0, 0)
    with pytest.raises(ConfigError, match=r"'data.seq_len': expected >= 32 \(2 \* data.num_items\)|"
                                          r"'data.seq_len': expected >= 2 \* data.num_items \(32\)"):
        batch_at(DataConfig(task="selective_copying", seq_len=20, num_items=16), 16, 0, 0)
    with pytest.raises(ConfigError, match=r"'data.seq_len': expected >= 3 for data.task 'induction'"):
        batch_at(DataConfig(task="induction", seq_len=2), 16, 0, 0)
    with pytest.raises(ConfigError, match=r"'num_items': expected a positive integer"):
        DataConfig(num_items=0)


@pytest.mark.parametrize("preset,task", [("induction_heads_falcon_mamba", "induction"),
                                         ("induction_heads_falcon", "induction"),
                                         ("selective_copying_falcon_mamba", "selective_copying"),
                                         ("mqar_falcon_mamba", "mqar"),
                                         ("mqar_falcon", "mqar")])
def test_task_presets_load_and_make_batches(preset, task):
    run = load_config(preset, ["data.batch_size=2"])
    assert run.data.task == task and task in TASKS
    batch = batch_at(run.data, run.model.vocab_size, run.seed, 0)
    assert batch["inputs"].shape == (1, 2, run.data.seq_len_at(0)) and batch["mask"].sum() > 0


@pytest.mark.parametrize("task,minimum,kw", [("copy", 2, {}), ("induction", 3, {}),
                                             ("selective_copying", 6, {"num_items": 3}),
                                             ("mqar", 11, {"num_items": 3})])
def test_each_task_scores_a_token_of_every_row_at_its_minimum_seq_len_and_names_it_below(task, minimum, kw):
    """The minimum seq_len a task accepts is its true one: every row has a scored token there (copy at seq_len
    1 had an empty mask, and evaluate divided by zero), one less is refused naming it (mqar said 4n, took 4n-1);
    a curriculum stage below it is named too."""
    from experiments.data import check_data

    mask = _rows(task, vocab=32, seq_len=minimum, batch=8, **kw)[2]
    assert (mask.sum(axis=1) > 0).all()
    with pytest.raises(ConfigError, match=rf"'data.seq_len': expected >= {minimum}\b.*got {minimum - 1}$"):
        _rows(task, vocab=32, seq_len=minimum - 1, batch=8, **kw)
    with pytest.raises(ConfigError, match=rf"'data.length_curriculum\[0\]': stage length {minimum - 1} fails"):
        check_data(DataConfig(task=task, seq_len=64, length_curriculum=((minimum - 1, 2),), **kw), 32)
