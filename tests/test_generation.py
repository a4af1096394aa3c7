"""Generation: the jit-compiled decode loop and streaming, for both families, against plain full forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import load_model_config
from configs.loader import replace
from experiments.models import build_model
from runtime.generation import NO_TOKEN, Sampling, decode, filter_logits, generate, sample_logits, stream

VOCAB = 61


@pytest.fixture(scope="module", params=["tiny_falcon_mamba", "tiny_falcon"])
def model(request):
    return build_model(load_model_config(request.param, ["num_hidden_layers=1", f"vocab_size={VOCAB}"]), seed=2)


def _greedy_by_full_forward(model, prompt, n, width=24):
    """Greedy continuation from full causal forwards; every call is padded to one shape (one compilation):
    the logits at position t do not depend on the tokens after t."""
    tokens = list(prompt)
    for _ in range(n):
        padded = np.array([tokens + [0] * (width - len(tokens))])
        tokens.append(int(np.argmax(np.asarray(model(padded))[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_greedy_equals_argmax_of_full_forward(model):
    prompts = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    result = generate(model, prompts, max_new_tokens=6, temperature=0, chunk_size=4)
    assert result.tokens.shape == (2, 6) and result.steps == 6
    for i in range(2):
        assert result.row(i) == _greedy_by_full_forward(model, prompts[i], 6)


def test_decode_continues_a_prefill(model):
    """decode from a prefilled (logits, state) of the whole prompt, or of a prompt extended by the first
    generated token, gives generate's tokens."""
    prompts = np.random.default_rng(4).integers(0, VOCAB, (2, 7))
    kwargs = dict(temperature=0.9, top_k=30, seed=5)
    expected = generate(model, prompts, max_new_tokens=5, **kwargs)
    logits, state = model.prefill(prompts, model.init_state(2, max_len=12), chunk_size=3)
    np.testing.assert_array_equal(decode(model, logits, state, max_new_tokens=5, **kwargs).tokens, expected.tokens)
    greedy = generate(model, prompts, max_new_tokens=4, temperature=0)
    extended = np.concatenate([prompts, greedy.tokens[:, :1]], axis=1)
    logits, state = model.prefill(extended, model.init_state(2, max_len=12))
    np.testing.assert_array_equal(decode(model, logits, state, max_new_tokens=3, temperature=0).tokens,
                                  greedy.tokens[:, 1:])
    with pytest.raises(ValueError, match=r"^logits: expected finite values, got NaN or Inf"):  # greedy gave token 0
        decode(model, logits.at[1, 3].set(jnp.nan), state, max_new_tokens=3, temperature=0)
    # bf16 logits (a bf16 model's, cast by the caller) failed inside the loop on its fp32 carry
    np.testing.assert_array_equal(decode(model, logits.astype(jnp.bfloat16), state, max_new_tokens=3,
                                         temperature=0).tokens,
                                  decode(model, logits.astype(jnp.bfloat16).astype(jnp.float32), state,
                                         max_new_tokens=3, temperature=0).tokens)


def test_padded_prompts_generate_as_alone(model):
    rng = np.random.default_rng(1)
    short, long = rng.integers(0, VOCAB, 4), rng.integers(0, VOCAB, 10)
    ids = np.zeros((2, 10), np.int64)
    mask = np.zeros((2, 10), np.int64)
    ids[0, 6:], mask[0, 6:] = short, 1  # left padding
    ids[1], mask[1] = long, 1
    result = generate(model, ids, max_new_tokens=4, temperature=0, attention_mask=mask)
    assert result.row(0) == _greedy_by_full_forward(model, short, 4)
    assert result.row(1) == _greedy_by_full_forward(model, long, 4)


def test_stop_tokens_end_rows(model):
    prompts = np.random.default_rng(2).integers(0, VOCAB, (2, 5))
    free = generate(model, prompts, max_new_tokens=8, temperature=0)
    stop = int(free.tokens[0, 2])
    result = generate(model, prompts, max_new_tokens=8, temperature=0, stop_tokens=[stop])
    first = list(free.tokens[0]).index(stop)
    assert result.row(0) == list(free.tokens[0, :first + 1])
    assert (result.tokens[0, first + 1:] == NO_TOKEN).all()


def test_seeded_sampling_is_reproducible_and_stream_matches(model):
    prompts = np.random.default_rng(3).integers(0, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=7, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    a, b = generate(model, prompts, **kwargs), generate(model, prompts, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    streamed = np.stack(list(stream(model, prompts, **kwargs)), axis=1)
    np.testing.assert_array_equal(streamed, a.tokens)
    other = generate(model, prompts, **{**kwargs, "seed": 12})
    assert not np.array_equal(other.tokens, a.tokens)


def test_sample_logits_filters():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)).repeat(4000, axis=0)
    keys = jax.random.PRNGKey(0)
    top2 = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_k=2)))
    assert set(np.unique(top2)) == {0, 1}
    assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03
    nucleus = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_p=0.7)))  # 0.5 + 0.3 reaches 0.7
    assert set(np.unique(nucleus)) == {0, 1}
    assert set(np.unique(np.asarray(sample_logits(logits, keys, Sampling(1.0, top_p=0.5))))) == {0}
    # the temperature comes first (as in transformers): at 2 the probabilities are sqrt(p) normalised,
    # [.38 .29 .21 .12], and top_p 0.7 keeps three tokens, not the two of the untempered ones
    tempered = np.asarray(sample_logits(logits, keys, Sampling(2.0, top_p=0.7)))
    assert set(np.unique(tempered)) == {0, 1, 2}
    kept = np.sqrt([0.5, 0.3, 0.15])
    assert abs((tempered == 2).mean() - kept[2] / kept.sum()) < 0.03
    free = np.asarray(sample_logits(logits, keys, Sampling(1.0)))
    assert abs((free == 3).mean() - 0.05) < 0.02
    assert (np.asarray(sample_logits(logits, keys, Sampling(0.0))) == 0).all()
    # a tiny temperature is greedy: logits / 1e-38 overflowed to inf, and categorical took the first of the infs
    shuffled = logits[:, ::-1]
    assert (np.asarray(sample_logits(shuffled, keys, Sampling(1e-38))) == 3).all()
    assert Sampling(1.0, top_k=np.int64(2)).top_k == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature: expected a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, "temperature: expected a finite number >= 0, got inf"),
    ({"temperature": True}, "temperature: expected a finite number >= 0, got True"),
    ({"top_k": True}, "top_k: expected None or an integer >= 0, got True"),
    ({"top_p": float("nan")}, r"top_p: expected None or a number in \(0, 1\], got nan"),
])
def test_sampling_refuses_non_finite_and_bool_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature: expected a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p: expected None or a number in \(0, 1\]"),
    ({"top_k": -2}, "top_k: expected None or an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens: expected a positive integer"),
    ({"max_new_tokens": True}, "max_new_tokens: expected a positive integer, got True"),
    ({"max_new_tokens": 2**31}, r"max_new_tokens: expected fewer than 2\*\*31, got 2147483648"),
    ({"stop_tokens": [VOCAB]}, rf"stop_tokens: expected integer ids in \[0, {VOCAB}\), got {VOCAB}"),
    ({"stop_tokens": [1.7]}, rf"stop_tokens: expected integer ids in \[0, {VOCAB}\), got 1.7"),  # was token 1
    ({"stop_tokens": 11}, "stop_tokens: expected a sequence of token ids, got 11"),  # was a TypeError
    ({"seed": 1.5}, r"seed: expected an integer in \[-2\*\*31, 2\*\*32\), got 1.5"),  # a JAX tracer error
    ({"seed": 2**70}, r"seed: expected an integer in \[-2\*\*31, 2\*\*32\)"),  # an OverflowError inside JAX
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, np.ones((1, 3), np.int32), **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("input_ids, message", [
    ([[1, 2, 3], [4, 5]], r"^input_ids: expected rows of equal length .*got lengths \[3, 2\]$"),  # was NumPy's
    (np.zeros((0, 3), np.int32), r"^input_ids: expected a non-empty array, got shape \(0, 3\)$"),  # was batch_size
])
def test_bad_prompts_are_named(model, input_ids, message):
    for run in (generate, stream):  # stream raises when called, before the first next()
        with pytest.raises(ValueError, match=message):
            run(model, input_ids, max_new_tokens=2)


def test_decode_refuses_a_cache_without_room(model):
    """decode's loop feeds max_new_tokens - 1 tokens (the last one sampled is never fed: it cost a model step and
    a cache slot); past a KV cache's max_len the writes would clamp onto its last slot, so it refuses first,
    naming max_new_tokens (a Mamba state has no max_len: nothing to refuse). A cache with exactly the room gives
    what a roomy one gives."""
    prompts = np.random.default_rng(3).integers(0, VOCAB, (1, 4))
    logits, state = model.prefill(prompts, model.init_state(1, max_len=6))
    if model.state_capacity(state) is None:
        assert decode(model, logits, state, max_new_tokens=5, temperature=0).tokens.shape == (1, 5)
        return
    with pytest.raises(ValueError, match=r"^max_new_tokens: 3 new tokens after 4 cached ones need 7 positions \(the "
                                         r"last of 4 new tokens is not fed to the model\), but the KV cache holds "
                                         r"max_len=6"):
        decode(model, logits, state, max_new_tokens=4, temperature=0)
    roomy = decode(model, *model.prefill(prompts, model.init_state(1, max_len=16)), max_new_tokens=3, temperature=0)
    np.testing.assert_array_equal(decode(model, logits, state, max_new_tokens=3, temperature=0).tokens, roomy.tokens)


def test_step_checks_its_state(model):
    state = model.init_state(2, max_len=8)
    with pytest.raises(ValueError, match=r"^state: expected a DecodeState for batch 3 from init_state, got batch 2"):
        model.step(np.ones(3, np.int32), state)
    with pytest.raises(ValueError, match=r"^state: expected a DecodeState for batch 2 from init_state, got NoneType"):
        model.step(np.ones(2, np.int32), None)


def test_a_state_of_another_model_is_refused(model):
    """A state from a model with another layer count, width or compute dtype: named (with fewer layers, zip ran
    the model's first layers only and returned wrong logits silently)."""
    def other(**fields):
        return build_model(replace(model.config, **fields), seed=2).init_state(2, max_len=8)

    ids = np.ones(2, np.int32)
    with pytest.raises(ValueError, match=r"^state: expected the 1 layers of this model's init_state, got 2"):
        model.step(ids, other(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"^state: expected the 1 layers of this model's init_state, got 0"):
        model.step(ids, other(num_hidden_layers=2)._replace(layers=[]))  # an IndexError for the transformer
    family = "tiny_falcon" if model.config.family == "falcon_mamba" else "tiny_falcon_mamba"
    with pytest.raises(ValueError, match=r"^state: expected layers of this model's init_state"):
        model.step(ids, build_model(load_model_config(family, ["num_hidden_layers=1", f"vocab_size={VOCAB}"]))
                   .init_state(2, max_len=8))
    with pytest.raises(ValueError, match=r"^state\.layers\[0\].*: expected shape .* float32 \(this model's "
                                         r"init_state\), got .* bfloat16"):
        model.prefill(np.ones((2, 3), np.int32), other(compute_dtype="bfloat16"))
    wider = {"hidden_size": 2 * model.config.hidden_size} if model.config.family == "falcon" else \
        {"intermediate_size": 2 * model.config.intermediate_size}
    with pytest.raises(ValueError, match=r"^state\.layers\[0\].*: expected shape"):
        model.step(ids, other(**wider))
    logits, state = model.prefill(np.ones((2, 3), np.int32), model.init_state(2, max_len=8))
    with pytest.raises(ValueError, match=r"^logits: expected shape \(batch, vocab_size\).*, got \(61,\)"):
        decode(model, logits[0], state, max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"^logits: expected shape \(batch, {VOCAB}\) \(vocab_size\), got \(2, 5\)"):
        decode(model, logits[:, :5], state, max_new_tokens=2)


def _until_stop(row, stops):
    """A free row's tokens up to and including its first stop token, NO_TOKEN after."""
    out = np.full(len(row), NO_TOKEN)
    for i, token in enumerate(row):
        out[i] = token
        if token in stops:
            break
    return out


def test_a_row_that_stops_leaves_the_other_rows_running(model):
    """Stop tokens end rows one by one: the loop (and stream) runs until every row has stopped, not the first."""
    prompts = np.random.default_rng(2).integers(0, VOCAB, (2, 5))
    free = generate(model, prompts, max_new_tokens=8, temperature=0)
    stop = next(int(t) for t in free.tokens[0, :3] if t not in free.tokens[1])  # row 0 stops early, row 1 never
    result = generate(model, prompts, max_new_tokens=8, temperature=0, stop_tokens=[stop])
    expected = np.stack([_until_stop(row, [stop]) for row in free.tokens])
    np.testing.assert_array_equal(result.tokens, expected)
    assert result.steps == 8
    streamed = np.stack(list(stream(model, prompts, max_new_tokens=8, temperature=0, stop_tokens=[stop])), axis=1)
    np.testing.assert_array_equal(streamed, expected)


def test_each_step_samples_with_a_fresh_key(model):
    """Near-uniform sampling (a huge temperature): one key reused every step would draw the same Gumbel noise each
    step, hence the same token; fresh keys give many different tokens."""
    prompts = np.random.default_rng(6).integers(0, VOCAB, (2, 5))
    result = generate(model, prompts, max_new_tokens=16, temperature=1e4, seed=3)
    for i in range(2):
        assert len(set(result.row(i))) > 4, result.row(i)


@pytest.mark.parametrize("partitionable", [True, False])
def test_a_rows_samples_do_not_depend_on_the_other_rows(partitionable):
    """Each row draws with its own key (fold_in(step key, row)): rows 0..3 sample the same tokens whatever rows
    follow them, or none, with either threefry mode (one batch-wide draw gave the same noise to row 0 only where
    jax_threefry_partitionable is on, JAX's default). The model's logits of a row do not depend on the other rows
    either (test_inference's padded-batch tests), so neither do a row's generated tokens."""
    import jax

    rng = np.random.default_rng(8)
    first = rng.standard_normal((4, VOCAB)).astype(np.float32)
    keys = [jax.random.PRNGKey(seed) for seed in range(6)]
    with jax.threefry_partitionable(partitionable):
        for sampling in (Sampling(1.5), Sampling(1.0, top_k=20, top_p=0.9)):
            alone = np.stack([np.asarray(sample_logits(first, key, sampling)) for key in keys])
            assert len(np.unique(alone)) > 4  # sampled, not one repeated token
            for rows in (4, 16):
                batch = np.concatenate([first, rng.standard_normal((rows, VOCAB)).astype(np.float32)])
                got = np.stack([np.asarray(sample_logits(batch, key, sampling))[:4] for key in keys])
                np.testing.assert_array_equal(got, alone)


def test_no_stop_tokens_stop_nothing(model):
    """stop_tokens=() stops no row, whatever it generates (token 0 included)."""
    prompts = np.ones((1, 4), np.int32)
    _, state = model.prefill(prompts, model.init_state(1, max_len=8))
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 0] = 10.0  # the first generated token is 0
    result = decode(model, logits, state, max_new_tokens=3, temperature=0)
    assert result.steps == 3 and result.tokens[0, 0] == 0 and (result.tokens != NO_TOKEN).all()


def test_generate_gives_the_kv_cache_room_for_every_step():
    """generate sizes the KV cache itself: a cache short by one slot for the tokens the loop feeds would write
    the last ones over earlier ones (dynamic_update_slice clamps) and change the last tokens. A model with a
    10x initializer_range, whose next token depends on the context (at 0.02 it hardly does), must generate what
    decode generates from a roomy cache."""
    model = build_model(load_model_config("tiny_falcon", ["num_hidden_layers=1", f"vocab_size={VOCAB}",
                                                          "initializer_range=0.2"]), seed=2)
    prompts = np.random.default_rng(7).integers(0, VOCAB, (8, 2))
    logits, state = model.prefill(prompts, model.init_state(8, max_len=16))
    roomy = decode(model, logits, state, max_new_tokens=4, temperature=0)
    np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=4, temperature=0).tokens, roomy.tokens)


def test_generate_and_stream_refuse_non_finite_prefill_logits(model, monkeypatch):
    """A prefill that overflowed (NaN logits) is named before decoding, as decode's own logits are."""
    prefill = type(model)._prefill  # prefill's body, which generation calls with its own state

    def overflowed(self, *args, **kwargs):
        logits, state = prefill(self, *args, **kwargs)
        return logits.at[0, 0].set(jnp.inf), state

    monkeypatch.setattr(type(model), "_prefill", overflowed)
    for run in (generate, stream):  # stream raises when called, before the first next()
        with pytest.raises(ValueError, match=r"^logits: expected finite values, got NaN or Inf"):
            run(model, np.ones((1, 3), np.int32), max_new_tokens=2, temperature=0)


def test_decoding_updates_its_own_state_in_place_and_leaves_the_callers(model, monkeypatch):
    """generate and stream donate the state they make (init_state, then the prefill's chunks, then the loop or each
    step) so XLA updates one KV cache in place, not a copy of it per chunk or token; prefill and decode leave the
    caller's state valid and unchanged."""
    from runtime import generation

    made, init_state = [], type(model).init_state
    monkeypatch.setattr(type(model), "init_state", lambda *args, **kwargs: made.append(init_state(*args, **kwargs))
                        or made[-1])
    prompts = np.random.default_rng(6).integers(0, VOCAB, (2, 5))
    generate(model, prompts, max_new_tokens=3, temperature=0, chunk_size=2)
    list(stream(model, prompts, max_new_tokens=3, temperature=0, chunk_size=2))
    assert len(made) == 2 and all(leaf.is_deleted() for leaf in jax.tree.leaves(made))
    state = init_state(model, 2, max_len=10)
    logits, prefilled = model.prefill(prompts, state, chunk_size=2)
    decode(model, logits, prefilled, max_new_tokens=3, temperature=0)
    for kept in (state, prefilled):
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))
    np.testing.assert_array_equal(state.lengths, [0, 0])
    np.testing.assert_array_equal(prefilled.lengths, [5, 5])
    # the loop's state is an alias of its input: no second copy of it exists while decoding
    loop = generation._decode_loop.__wrapped__  # the jitted loop (a one-device model's: traced without a mesh)
    compiled = loop.lower(model, logits, prefilled, jax.random.PRNGKey(0), jnp.asarray([-1]), Sampling(0), 3).compile()
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(prefilled))
    assert compiled.memory_analysis().alias_size_in_bytes >= state_bytes


def test_stream_yields_each_token_before_feeding_it(model, monkeypatch):
    """A token is fed to the model only when another is to be sampled after it: the first token is yielded
    straight after the prefill (it waited for a model step before), and max_new_tokens tokens cost
    max_new_tokens - 1 steps, with the same tokens as generate."""
    from runtime import generation

    feeds, feed = [], generation._jit_feed
    monkeypatch.setattr(generation, "_jit_feed", lambda *args: feeds.append(1) or feed(*args))
    prompts = np.random.default_rng(5).integers(0, VOCAB, (2, 3))
    tokens = stream(model, prompts, max_new_tokens=4, temperature=0.8, seed=3)
    first = next(tokens)
    assert feeds == []
    rest = list(tokens)
    assert len(feeds) == 3
    expected = generate(model, prompts, max_new_tokens=4, temperature=0.8, seed=3).tokens
    np.testing.assert_array_equal(np.stack([first, *rest], axis=1), expected)


def test_every_fed_token_lands_inside_the_kv_cache(model, monkeypatch):
    """generate sizes the KV cache prompt + max_new_tokens - 1 and feeds max_new_tokens - 1 tokens: each lands
    below max_len (a write past it clamps onto the last slot, which these tiny random models' tokens do not
    show: a cache far too small gives the same tokens), in the jitted loop and in stream."""
    import jax

    from runtime import generation

    prompts = np.random.default_rng(6).integers(0, VOCAB, (3, 6))
    mask = np.ones((3, 6), np.int32)
    mask[1, :2] = 0  # left padding: that row writes at its own, smaller, positions
    if model.state_capacity(model.init_state(1, max_len=1)) is None:
        return
    seen = []  # (the largest position written, max_len) per feed
    feed, jit_feed = generation.run_one_token, generation._jit_feed

    def spy(model, tokens, state):  # traced into _decode_loop (max_new_tokens=7 compiles it afresh)
        capacity = model.state_capacity(state)
        jax.debug.callback(lambda lengths: seen.append((int(lengths.max()), capacity)), state.lengths)
        return feed(model, tokens, state)

    def jit_spy(model, tokens, state):
        seen.append((int(state.lengths.max()), model.state_capacity(state)))
        return jit_feed(model, tokens, state)

    monkeypatch.setattr(generation, "run_one_token", spy)
    monkeypatch.setattr(generation, "_jit_feed", jit_spy)
    kwargs = dict(max_new_tokens=7, temperature=1.0, seed=4, attention_mask=mask)
    expected = generate(model, prompts, **kwargs).tokens
    assert sorted(seen) == [(position, 12) for position in range(6, 12)]
    seen.clear()
    np.testing.assert_array_equal(np.stack(list(stream(model, prompts, **kwargs)), axis=1), expected)
    assert seen == [(position, 12) for position in range(6, 12)]



def _transformers_keeps(logits, sampling):
    """The tokens (a boolean mask) that transformers' warpers keep of ``logits``, in the order its generate applies
    them: TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (left out at top_p 1.0, as generate does)."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = torch.from_numpy(logits)
    if sampling.temperature != 1:
        scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return np.isfinite(scores.numpy())


def test_filter_logits_keeps_what_transformers_keeps(monkeypatch):
    """Temperature, top-k and top-p keep the tokens that transformers' warpers keep, on logits full of ties. top-p
    kept every token tied with its cut-off one (a tiny top_p kept all the tied top tokens, transformers one); and
    k tied tokens of probability 1/k put the cumulative probability on 1 - top_p exactly, where a float32 cumsum
    misses torch's float64-accumulated one. Ties are kept from the highest id down, as torch.sort orders them with
    stable=True (by default too, in rows of up to 16 tokens; arbitrarily in longer ones)."""
    import functools

    import torch

    rng = np.random.default_rng(0)
    vocab = 40
    flat = np.where(np.arange(vocab) <= np.arange(vocab)[:, None], 1, -1e3)  # 1 to 40 tied top tokens
    logits = np.concatenate([rng.integers(0, 4, (64, vocab)) * rng.choice([1.0, 0.5, 0.37], (64, 1)), flat,
                             rng.standard_normal((16, vocab))]).astype(np.float32)
    monkeypatch.setattr(torch, "sort", functools.partial(torch.sort, stable=True))
    for sampling in (Sampling(1.0, top_p=1e-9), Sampling(1.0, top_p=0.5), Sampling(0.9, top_p=0.8),
                     Sampling(0.7, top_k=3, top_p=0.5), Sampling(2.0, top_k=3, top_p=0.25), Sampling(1.0, top_p=1.0)):
        kept = np.asarray(filter_logits(logits, sampling)) > -np.inf
        np.testing.assert_array_equal(kept, _transformers_keeps(logits, sampling), err_msg=str(sampling))


def test_a_max_new_tokens_that_cannot_fit_is_refused_before_allocating(model, monkeypatch):
    """A KV cache for prompt + max_new_tokens - 1 positions (one: decoding updates it in place), and the (batch,
    max_new_tokens) int32 tokens of the loop: a max_new_tokens whose bytes exceed the device's memory is named
    before init_state allocates anything (it ended in an XLA out-of-memory error naming nothing). Falcon Mamba's
    state does not grow: stream is never refused, generate only for the tokens themselves."""
    import re

    from runtime import generation

    monkeypatch.setattr(generation, "device_memory", lambda: (2**30, "a test's 1 GiB"))
    huge, prompt = 2**31 - 1, np.ones((1, 4), np.int32)
    kv_cache = model.state_capacity(model.init_state(1, max_len=1)) is not None
    if kv_cache:
        init_state = type(model).init_state
        monkeypatch.setattr(type(model), "init_state", lambda self, batch, max_len=None: pytest.fail(
            "init_state allocated a huge cache") if max_len > 2**20 else init_state(self, batch, max_len))
        config = model.config
        per_position = 2 * config.num_hidden_layers * config.kv_heads * config.head_dim * 4  # k and v, float32
        fixed = 3 * per_position + 4  # 3 prompt positions (the 4th is a new token's) and the lengths
        for run, per_token, tokens in ((generate, per_position + 4, 4 * huge), (stream, per_position, 0)):
            most, state = (2**30 - fixed) // per_token, (3 + huge) * per_position + 4
            message = (f"max_new_tokens: expected at most {most} (what fits in the 1073741824 bytes (1.0 GiB) "
                       f"available: a test's 1 GiB), got {huge}, which needs at least {state + tokens} bytes")
            with pytest.raises(ValueError, match="^" + re.escape(message) + rf" \(.* GiB\): the KV cache of "
                                                 rf"{3 + huge} positions for a batch of 1 is {state} bytes"):
                run(model, prompt, max_new_tokens=huge)
            generation._check_memory(model, 1, most, lambda n: 3 + n, run is generate)  # the most fits
            with pytest.raises(ValueError, match=f"^max_new_tokens: expected at most {most} "):
                generation._check_memory(model, 1, most + 1, lambda n: 3 + n, run is generate)
        return
    assert next(stream(model, prompt, max_new_tokens=huge, temperature=0)).shape == (1,)  # not refused
    generation._check_memory(model, 1, 10**8, lambda n: 3 + n, True)  # 400 MB of tokens fit in 1 GiB
    state = generation._state_bytes(model, 1, 1)
    with pytest.raises(ValueError, match=rf"^max_new_tokens: expected at most {(2**30 - state) // 4} .*: the "
                                         rf"decode state for a batch of 1 is {state} bytes; the "
                                         rf"generated int32 tokens take {4 * huge} bytes"):
        generate(model, prompt, max_new_tokens=huge)  # 8 GiB of tokens
