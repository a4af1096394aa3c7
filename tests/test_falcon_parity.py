"""Falcon in JAX against transformers' FalconForCausalLM (sdpa) on tiny random checkpoints.

Each model is built by transformers from a deep-copied config, perturbed away from its init values, saved to
safetensors, loaded through transformer.from_pretrained and compared on fp32 logits (1e-4 absolute). The
reference runs attn_implementation="sdpa": transformers 5.23's eager path adds the ALiBi bias twice
(REFERENCE.md). The export direction is checked by loading transformer.save_pretrained's output back into
transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import FalconConfig, FalconForCausalLM

import transformer
from runtime.safetensors_io import CheckpointError, open_checkpoint, write_file
from transformer.weights import weight_specs
from tests.hf_models import (assert_gradients_close, build_and_save, jax_loss_grads, torch_logits,
                             torch_loss_grads)

ATOL = 1e-4

CASES = {
    # name: (transformers FalconConfig kwargs, sequence length)
    # falcon-7b: multi-query, parallel attention + MLP off one LayerNorm, tied head.
    "mqa_parallel": (dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          multi_query=True, parallel_attn=True), 41),
    # falcon-40b/180b: new decoder architecture, ln_attn + ln_mlp, 6 heads on 2 kv heads (group 3).
    "nda_2ln": (dict(vocab_size=80, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_kv_heads=2,
                     new_decoder_architecture=True), 37),
    # Falcon2-11B: new decoder architecture with one LayerNorm, untied head, theta 500042, ffn != 4h.
    "falcon2_1ln": (dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=1,
                         tie_word_embeddings=False, rope_theta=500042.0, ffn_hidden_size=72), 33),
    # falcon-rw: multi-head, sequential, biases, ALiBi at 300 tokens (bf16 positions round above 256) on 12 heads
    # (4 of whose slopes are not powers of two, so the bf16 rounding of slope x position matters).
    "rw_alibi": (dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=12,
                      multi_query=False, parallel_attn=False, bias=True, alibi=True), 300),
    "rope_linear": (dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}), 45),
    # dynamic NTK only changes the base beyond max_position_embeddings: 100 > 64.
    "rope_dynamic": (dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64), 100),
}


def _build(name, path, seed):
    kwargs, _ = CASES[name]
    return build_and_save(FalconConfig, FalconForCausalLM, path, seed=seed, attn_implementation="sdpa", **kwargs)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = _build(request.param, path, seed=len(request.param))
    assert torch_model.config._attn_implementation == "sdpa"
    return request.param, torch_model, path


def _ids(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def test_logits_match_transformers(case):
    name, torch_model, path = case
    kwargs, seq = CASES[name]
    ids = _ids(kwargs["vocab_size"], (2, seq))
    expected = torch_logits(torch_model, ids)
    got = np.asarray(transformer.from_pretrained(path)(ids))
    assert got.dtype == np.float32 and got.shape == (2, seq, kwargs["vocab_size"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    if name in ("nda_2ln", "rw_alibi"):  # the blockwise path in the model (block 16 divides neither length)
        blockwise = transformer.from_pretrained(path, attention_impl="blockwise", attention_block_size=16)
        np.testing.assert_allclose(np.asarray(blockwise(ids)), expected, rtol=0, atol=ATOL)


def test_training_gradients_match_transformers(case):
    """The trainer's loss and its gradient for every weight == transformers' (torch autograd, sdpa) on the same
    checkpoint: each within 1e-4 of that weight's largest gradient (2026-12-02: at most 2e-6 on these cases);
    the blockwise attention too where test_logits_match_transformers runs it."""
    name, torch_model, path = case
    kwargs, seq = CASES[name]
    ids = _ids(kwargs["vocab_size"], (2, seq), seed=1)
    want_loss, want = torch_loss_grads(torch_model, ids)
    impls = ["xla", "blockwise"] if name in ("nda_2ln", "rw_alibi") else ["xla"]
    for impl in impls:
        ours = transformer.from_pretrained(path, attention_impl=impl, attention_block_size=16)
        loss, got = jax_loss_grads(ours, ids, weight_specs(ours.config))
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=impl)
        assert_gradients_close(got, want, 1e-4, note=f"{impl}: ")


def test_export_round_trip(case, tmp_path):
    name, torch_model, path = case
    ours = transformer.from_pretrained(path)
    transformer.save_pretrained(ours, tmp_path)
    reloaded_torch = FalconForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = _ids(CASES[name][0]["vocab_size"], (1, 29), seed=1)
    np.testing.assert_allclose(torch_logits(reloaded_torch, ids), torch_logits(torch_model, ids), rtol=0, atol=1e-6)
    again = transformer.from_pretrained(tmp_path)
    assert again.config == ours.config
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(ours(ids)))
    original, written = open_checkpoint(path), open_checkpoint(tmp_path)
    for tensor_name, array in written.items():
        np.testing.assert_array_equal(array, original[tensor_name], err_msg=tensor_name)


def test_cached_decode_and_padded_batches_match_transformers(case):
    """The KV cache against transformers, for every layout (tests/test_inference.py compares it only with our own
    forward, on multi-query and multi-head presets): a prefill in chunks of 13 (dividing no prompt) then decode
    steps give transformers' logits at each position; a left-padded ragged batch (attention_mask, chunks of 13)
    gives each row transformers' logits for that row alone. Each layout runs on one attention implementation (one
    grouped case on each): blockwise in blocks of 16 over the cache, or xla."""
    name, torch_model, path = case
    kwargs, seq = CASES[name]
    impl = "blockwise" if name in ("nda_2ln", "rw_alibi", "rope_linear") else "xla"
    model = transformer.from_pretrained(path, attention_impl=impl, attention_block_size=16)
    if name == "rope_dynamic":  # no KV cache: test_dynamic_rope_log_likelihood_is_one_full_forward
        with pytest.raises(ValueError, match=r"rope_scaling: 'dynamic'"):
            model.init_state(1, max_len=seq)
        return
    vocab = kwargs["vocab_size"]
    ids = _ids(vocab, (2, seq), seed=6)
    expected = torch_logits(torch_model, ids)
    # both parts use one state shape and chunk size, so they share the step's and the chunks' compilations
    logits, state = model.prefill(ids[:, :seq - 2], model.init_state(2, max_len=seq), chunk_size=13)
    np.testing.assert_allclose(np.asarray(logits), expected[:, seq - 3], rtol=0, atol=ATOL)
    for t in range(seq - 2, seq):
        logits, state = model.step(ids[:, t], state)
        np.testing.assert_allclose(np.asarray(logits), expected[:, t], rtol=0, atol=ATOL, err_msg=f"step {t}")
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, vocab, n) for n in (seq // 3, seq - 2)]
    width = max(len(row) for row in rows)
    padded, mask = np.zeros((2, width), np.int64), np.zeros((2, width), np.int64)
    for i, row in enumerate(rows):
        padded[i, width - len(row):], mask[i, width - len(row):] = row, 1
    extra = rng.integers(0, vocab, (2, 2))
    logits, state = model.prefill(padded, model.init_state(2, max_len=seq), chunk_size=13, attention_mask=mask)
    stepped = []
    for t in range(extra.shape[1]):
        step_logits, state = model.step(extra[:, t], state)
        stepped.append(np.asarray(step_logits))
    for i, row in enumerate(rows):
        alone = torch_logits(torch_model, np.concatenate([row, extra[i]])[None])[0]
        np.testing.assert_allclose(np.asarray(logits[i]), alone[len(row) - 1], rtol=0, atol=ATOL, err_msg=f"row {i}")
        for t in range(extra.shape[1]):
            np.testing.assert_allclose(stepped[t][i], alone[len(row) + t], rtol=0, atol=ATOL, err_msg=f"row {i}")


def test_dynamic_rope_log_likelihood_is_one_full_forward(tmp_path):
    """Dynamic NTK scaling has no KV cache (its frequencies depend on the whole length), so log_likelihood of
    one chunk runs a plain forward: transformers' log-probabilities; several chunks are refused, naming why."""
    torch_model = _build("rope_dynamic", tmp_path, seed=4)
    kwargs, seq = CASES["rope_dynamic"]
    ids = _ids(kwargs["vocab_size"], (2, seq), seed=4)
    logits = torch_logits(torch_model, ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    model = transformer.from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(model.log_likelihood(ids)), want, rtol=0, atol=ATOL)
    # seq - 1: the one-token last chunk has no target, which leaves one chunk, still over all seq tokens
    np.testing.assert_allclose(np.asarray(model.log_likelihood(ids, chunk_size=seq - 1)), want, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match=r"rope_scaling: 'dynamic'.*log_likelihood with chunk_size=None"):
        model.log_likelihood(ids, chunk_size=seq // 2)


@pytest.mark.parametrize("name", ["nda_2ln", "rw_alibi"])
def test_bf16_compute_close_to_fp32(name, tmp_path):
    _build(name, tmp_path, seed=2)
    ids = _ids(CASES[name][0]["vocab_size"], (2, 64), seed=2)
    fp32 = np.asarray(transformer.from_pretrained(tmp_path)(ids))
    bf16 = np.asarray(transformer.from_pretrained(tmp_path, compute_dtype="bfloat16")(ids))
    assert bf16.dtype == np.float32  # logits leave in fp32 whatever the compute dtype
    # bf16 keeps 8 mantissa bits (relative step 3.9e-3) through 2 layers of matmuls, norms and the residual
    # stream: the mamba_ssm bf16 tolerances (rtol 3e-2, atol 5e-2) scaled to the logits' magnitude.
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2, atol=5e-2 * max(1.0, np.abs(fp32).max()))


@pytest.mark.parametrize("name, style", [("rw_alibi", "RefinedWebModel"), ("nda_2ln", "RefinedWeb")])
def test_tii_original_config_loads_same_weights(name, style, tmp_path):
    """TII's config.json (n_head, n_layer, n_head_kv, model_type RefinedWeb*) over the same tensors."""
    torch_model = _build(name, tmp_path, seed=4)
    kwargs, _ = CASES[name]
    tii = {"model_type": style, "vocab_size": kwargs["vocab_size"], "hidden_size": kwargs["hidden_size"],
           "n_layer": kwargs["num_hidden_layers"], "n_head": kwargs["num_attention_heads"], "bias": False,
           "alibi": False, "bos_token_id": 11, "eos_token_id": 11, "layer_norm_epsilon": 1e-5,
           "apply_residual_connection_post_layernorm": False, "architectures": ["RWForCausalLM"]}
    if style == "RefinedWeb":
        tii["n_head_kv"] = kwargs["num_kv_heads"]
    else:  # RW: multi_query and parallel_attn default to false in TII's RWConfig
        tii.update(bias=True, alibi=True)
    (tmp_path / "config.json").write_text(json.dumps(tii))
    ids = _ids(kwargs["vocab_size"], (1, 50), seed=3)
    got = np.asarray(transformer.from_pretrained(tmp_path)(ids))
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), rtol=0, atol=ATOL)


def test_wrong_qkv_row_count_is_named(tmp_path):
    _build("mqa_parallel", tmp_path, seed=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["multi_query"] = False  # now the config wants 3 * hidden rows; the weights have hidden + 2 * head_dim
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.self_attention\.query_key_value\.weight' has "
                                              r"48 rows.*interleaved layout needs 96"):
        transformer.from_pretrained(tmp_path)


def test_tensors_the_config_does_not_use_are_refused(tmp_path):
    _build("mqa_parallel", tmp_path, seed=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor\(s\) that the config does not use: 'transformer\.h\.1\."):
        transformer.from_pretrained(tmp_path)


def test_tensors_transformers_ignores_are_ignored(tmp_path):
    """A tied model's stored lm_head.weight and a rotary inv_freq buffer (TII's older checkpoints) load as
    transformers loads them: ignored; the logits do not change."""
    _build("mqa_parallel", tmp_path, seed=1)
    ids = _ids(CASES["mqa_parallel"][0]["vocab_size"], (1, 20), seed=5)
    want = np.asarray(transformer.from_pretrained(tmp_path)(ids))
    tensors = {n: np.array(a) for n, a in open_checkpoint(tmp_path).items()}
    assert json.loads((tmp_path / "config.json").read_text()).get("tie_word_embeddings", True)
    tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"]
    tensors["transformer.h.0.self_attention.maybe_rotary.inv_freq"] = np.ones(4, np.float32)
    write_file(tmp_path / "model.safetensors", tensors)
    np.testing.assert_array_equal(np.asarray(transformer.from_pretrained(tmp_path)(ids)), want)


def test_model_safetensors_wins_over_a_stale_index(tmp_path):
    """transformers reads model.safetensors before an index; its save_pretrained, saving one file over shards,
    leaves the old index behind (whose shards were deleted, or still there with old weights)."""
    _build("mqa_parallel", tmp_path, seed=1)
    ids = _ids(CASES["mqa_parallel"][0]["vocab_size"], (1, 20), seed=5)
    want = np.asarray(transformer.from_pretrained(tmp_path)(ids))
    stale = {n: np.array(a) * 0 for n, a in open_checkpoint(tmp_path).items()}
    write_file(tmp_path / "model-00001-of-00001.safetensors", stale)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in stale}}))
    np.testing.assert_array_equal(np.asarray(transformer.from_pretrained(tmp_path)(ids)), want)


def test_a_tied_config_with_a_different_lm_head_is_refused_or_loaded_untied(tmp_path):
    """transformers 5 loads a stored lm_head.weight that differs from the embeddings untied, whatever
    tie_word_embeddings says: ignoring it loaded another model (logits 19 apart). It is refused, naming the way to
    load it, tie_word_embeddings=False, which gives transformers' logits."""
    _build("mqa_parallel", tmp_path, seed=1)
    ids = _ids(CASES["mqa_parallel"][0]["vocab_size"], (1, 20), seed=5)
    tensors = {n: np.array(a) for n, a in open_checkpoint(tmp_path).items()}
    tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"] * 0.5
    write_file(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' differs from 'transformer.word_embeddings.weight'.*"
                                              r"tie_word_embeddings=False"):
        transformer.from_pretrained(tmp_path)
    import torch

    untied_torch = FalconForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert untied_torch.lm_head.weight.data_ptr() != untied_torch.transformer.word_embeddings.weight.data_ptr()
    model = transformer.from_pretrained(tmp_path, tie_word_embeddings=False)
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(untied_torch, ids), rtol=0, atol=ATOL)


def test_token_ids_outside_vocab_raise(tmp_path):
    _build("mqa_parallel", tmp_path, seed=1)
    vocab = CASES["mqa_parallel"][0]["vocab_size"]
    model = transformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"input_ids.*\[0, {vocab}\).*got {vocab}"):
        model(np.array([[1, 2, vocab]]))
