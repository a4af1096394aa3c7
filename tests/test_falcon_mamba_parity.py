"""Falcon Mamba / Mamba in JAX against transformers' PyTorch models on tiny random checkpoints.

Each model is built by transformers, perturbed away from its init values, saved to safetensors, loaded
through ssm.from_pretrained and compared on fp32 logits (1e-4 absolute). The export direction is checked by
loading ssm.save_pretrained's output back into transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

import ssm
from runtime.safetensors_io import CheckpointError, open_checkpoint, write_file
from ssm.weights import weight_specs
from tests.hf_models import (assert_gradients_close, build_and_save, jax_loss_grads, torch_logits,
                             torch_loss_grads)

ATOL = 1e-4

CASES = {
    # name: (config class, model class, kwargs)
    "falcon_untied": (FalconMambaConfig, FalconMambaForCausalLM, dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
        time_step_rank=5, tie_word_embeddings=False)),
    "falcon_tied_bias": (FalconMambaConfig, FalconMambaForCausalLM, dict(
        vocab_size=64, hidden_size=24, num_hidden_layers=3, state_size=16, expand=3, conv_kernel=3,
        use_bias=True, use_conv_bias=False, tie_word_embeddings=True, mixer_rms_eps=1e-5)),
    "falcon_no_fp32_residual": (FalconMambaConfig, FalconMambaForCausalLM, dict(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=2,
        residual_in_fp32=False, tie_word_embeddings=False, layer_norm_epsilon=1e-6)),
    "mamba_untied": (MambaConfig, MambaForCausalLM, dict(
        vocab_size=80, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
        tie_word_embeddings=False)),
    "mamba_tied": (MambaConfig, MambaForCausalLM, dict(
        vocab_size=80, hidden_size=40, num_hidden_layers=2, state_size=12, expand=2, conv_kernel=4,
        time_step_rank=7, use_bias=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config_cls, model_cls, kwargs = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch_model = build_and_save(config_cls, model_cls, path, seed=len(request.param), **kwargs)
    return request.param, torch_model, path, kwargs


def _ids(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_logits_match_transformers(case, impl):
    name, torch_model, path, kwargs = case
    ids = _ids(kwargs["vocab_size"], (2, 67))
    ours = ssm.from_pretrained(path, scan_impl=impl, scan_chunk_size=16)
    assert ours.config.use_mixer_norms == name.startswith("falcon")
    got = np.asarray(ours(ids))
    assert got.dtype == np.float32 and got.shape == (2, 67, kwargs["vocab_size"])
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), rtol=0, atol=ATOL)


def test_padded_chunked_prefill_and_steps_match_transformers_rows_alone(tmp_path):
    """The decode path on a transformers checkpoint (in_proj bias, conv kernel 3, tied head; the other paths are
    tests/test_inference.py's on our own presets): a left-padded ragged batch prefilled in chunks that do not
    divide it (a row of 1 token, fewer than conv_kernel - 1; a last chunk of 1), then decode steps, against
    transformers' logits of each row alone. Not its padded forward: its in_proj bias leaks from the padding into
    the conv (~0.1 in logits)."""
    config_cls, model_cls, kwargs = CASES["falcon_tied_bias"]
    torch_model = build_and_save(config_cls, model_cls, tmp_path, seed=6, **kwargs)
    model = ssm.from_pretrained(tmp_path)
    lengths, steps = (1, 9, 5), 3
    rows = [_ids(kwargs["vocab_size"], (n,), seed=10 + n) for n in lengths]
    extra = _ids(kwargs["vocab_size"], (len(rows), steps), seed=4)
    ids, mask = np.zeros((len(rows), 9), np.int64), np.zeros((len(rows), 9), np.int64)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    logits, state = model.prefill(ids, model.init_state(len(rows)), chunk_size=4, attention_mask=mask)
    got = [np.asarray(logits)]
    for t in range(steps):
        step_logits, state = model.step(extra[:, t], state)
        got.append(np.asarray(step_logits))
    for i, row in enumerate(rows):
        alone = torch_logits(torch_model, np.concatenate([row, extra[i]])[None])[0, len(row) - 1:]
        np.testing.assert_allclose(np.stack([g[i] for g in got]), alone, rtol=0, atol=ATOL, err_msg=f"row {i}")


@pytest.mark.parametrize("impl", ["sequential", "chunked", "pallas"])  # the scans with hand-written VJPs
def test_training_gradients_match_transformers(case, impl):
    """The trainer's loss and its gradient for every weight == transformers' (torch autograd through its own
    scan) on the same checkpoint: each within 1e-4 of that weight's largest gradient (2026-12-02: at most 8e-6
    on these cases, every impl)."""
    name, torch_model, path, kwargs = case
    ids = _ids(kwargs["vocab_size"], (2, 37), seed=1)
    want_loss, want = torch_loss_grads(torch_model, ids)
    ours = ssm.from_pretrained(path, scan_impl=impl, scan_chunk_size=8)  # chunk boundaries inside the sequence
    loss, got = jax_loss_grads(ours, ids, weight_specs(ours.config))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert_gradients_close(got, want, 1e-4)


def test_export_round_trip(case, tmp_path):
    name, torch_model, path, kwargs = case
    config_cls, model_cls, _ = CASES[name]
    ours = ssm.from_pretrained(path)
    ssm.save_pretrained(ours, tmp_path)
    reloaded_torch = model_cls.from_pretrained(tmp_path).eval()
    assert type(reloaded_torch) is model_cls
    ids = _ids(kwargs["vocab_size"], (1, 33), seed=1)
    np.testing.assert_allclose(torch_logits(reloaded_torch, ids), torch_logits(torch_model, ids), rtol=0, atol=1e-6)
    # our own reload is bit-identical
    again = ssm.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(ours(ids)))
    # every tensor transformers wrote is written back with the same values
    original, written = open_checkpoint(path), open_checkpoint(tmp_path)
    for tensor_name, array in written.items():
        np.testing.assert_array_equal(array, original[tensor_name], err_msg=tensor_name)


def test_sharded_checkpoint_round_trip(tmp_path):
    config_cls, model_cls, kwargs = CASES["falcon_untied"]
    torch_model = build_and_save(config_cls, model_cls, tmp_path / "src", seed=3, **kwargs)
    ours = ssm.from_pretrained(tmp_path / "src")
    ssm.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = model_cls.from_pretrained(tmp_path / "sharded").eval()
    ids = _ids(kwargs["vocab_size"], (1, 20))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(torch_model, ids), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ssm.from_pretrained(tmp_path / "sharded")(ids)), np.asarray(ours(ids)))


def test_mamba_ssm_checkpoint_names(tmp_path):
    """mamba_ssm's own checkpoints: backbone.embedding.weight and its config.json (d_model, n_layer, ssm_cfg)."""
    config_cls, model_cls, kwargs = CASES["mamba_tied"]
    torch_model = build_and_save(config_cls, model_cls, tmp_path / "hf", seed=5, **kwargs)
    tensors = {name: np.array(a) for name, a in open_checkpoint(tmp_path / "hf").items()}
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    (tmp_path / "ms").mkdir()
    write_file(tmp_path / "ms" / "model.safetensors", tensors)
    (tmp_path / "ms" / "config.json").write_text(json.dumps({
        "d_model": 40, "n_layer": 2, "vocab_size": 80, "pad_vocab_size_multiple": 8, "rms_norm": True,
        "residual_in_fp32": True, "tie_embeddings": True,
        "ssm_cfg": {"d_state": 12, "d_conv": 4, "expand": 2, "dt_rank": 7, "bias": True}}))
    ours = ssm.from_pretrained(tmp_path / "ms")
    ids = _ids(80, (2, 19))
    np.testing.assert_allclose(np.asarray(ours(ids)), torch_logits(torch_model, ids), rtol=0, atol=ATOL)


def test_bf16_compute_close_to_fp32(case):
    name, torch_model, path, kwargs = case
    ids = _ids(kwargs["vocab_size"], (2, 40), seed=2)
    fp32 = np.asarray(ssm.from_pretrained(path)(ids))
    bf16 = np.asarray(ssm.from_pretrained(path, compute_dtype="bfloat16")(ids))
    assert bf16.dtype == np.float32  # logits leave in fp32 whatever the compute dtype
    # bf16 has 8 mantissa bits (relative step 2^-8 = 3.9e-3) and these logits pass through up to 3 layers
    # of matmuls: the mamba_ssm bf16 tolerances (rtol 3e-2, atol 5e-2) scaled to the logits' magnitude.
    scale = np.abs(fp32).max()
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2, atol=5e-2 * max(1.0, scale))


def test_residual_stream_is_fp32_under_bf16_compute_where_asked():
    """residual_in_fp32 (transformers' and mamba_ssm's flag): each block adds its bf16 mixer output to an fp32
    residual and hands fp32 on; with it off, the stream is bf16."""
    import jax.numpy as jnp
    from flax import nnx

    from configs import load_model_config
    from ssm.model import MambaBlock

    for flag, want in ((True, jnp.float32), (False, jnp.bfloat16)):
        config = load_model_config("tiny_falcon_mamba", ["compute_dtype=bfloat16", f"residual_in_fp32={flag}"])
        out, _ = MambaBlock(config, rngs=nnx.Rngs(0))(jnp.ones((1, 3, config.hidden_size), jnp.bfloat16))
        assert out.dtype == want, (flag, out.dtype)


def test_missing_tensor_is_named(tmp_path):
    config_cls, model_cls, kwargs = CASES["falcon_untied"]
    build_and_save(config_cls, model_cls, tmp_path, seed=1, **kwargs)
    tensors = {n: np.array(a) for n, a in open_checkpoint(tmp_path).items()}
    del tensors["backbone.layers.1.mixer.x_proj.weight"]
    write_file(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.x_proj\.weight"):
        ssm.from_pretrained(tmp_path)


def test_misshapen_tensor_is_named(tmp_path):
    config_cls, model_cls, kwargs = CASES["falcon_untied"]
    build_and_save(config_cls, model_cls, tmp_path, seed=1, **kwargs)
    tensors = {n: np.array(a) for n, a in open_checkpoint(tmp_path).items()}
    tensors["backbone.layers.0.mixer.A_log"] = tensors["backbone.layers.0.mixer.A_log"][:, :-1]
    write_file(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.A_log.*\(64, 7\).*\(64, 8\)"):
        ssm.from_pretrained(tmp_path)


def test_tensors_the_config_does_not_use_are_refused(tmp_path):
    """A config.json with fewer layers than the checkpoint (a missing num_hidden_layers falls back to its default
    the same way) would load a cut-down model: refused, naming the tensors left over."""
    config_cls, model_cls, kwargs = CASES["falcon_untied"]
    build_and_save(config_cls, model_cls, tmp_path, seed=1, **kwargs)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = kwargs["num_hidden_layers"] - 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    last = kwargs["num_hidden_layers"] - 1
    with pytest.raises(CheckpointError,
                       match=rf"tensor\(s\) that the config does not use: 'backbone\.layers\.{last}\."):
        ssm.from_pretrained(tmp_path)


def test_token_ids_outside_vocab_raise(case):
    _, _, path, kwargs = case
    model = ssm.from_pretrained(path)
    vocab = kwargs["vocab_size"]
    with pytest.raises(ValueError, match=rf"input_ids.*\[0, {vocab}\).*got {vocab}"):
        model(np.array([[1, 2, vocab]]))
    with pytest.raises(ValueError, match=r"input_ids.*got -1"):
        model(np.array([[1, -1]]))
    with pytest.raises(TypeError, match="input_ids: expected an integer dtype"):
        model(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"input_ids: expected an integer array of shape \(batch, seq\)"):
        model(np.zeros((3,), np.int32))


def test_step_sizes_match_the_dt_transformers_scans_with(case, monkeypatch):
    """experiments.induction_heads.mixer_dt (the notebook's selectivity plot: MambaMixer.step_sizes of every
    layer) against softplus(dt + dt_bias) captured at the input of transformers' own selective scan
    (its mamba_selective_scan, wrapped in the model's modeling module)."""
    import sys

    import torch

    from experiments.induction_heads import mixer_dt

    name, torch_model, path, kwargs = case
    modeling = sys.modules[type(torch_model).__module__]  # modeling_falcon_mamba or modeling_mamba
    captured = []
    original = modeling.mamba_selective_scan

    def capture(hidden_states, dt, *args, delta_bias=None, delta_softplus=False, **kw):
        assert delta_softplus and delta_bias is not None
        captured.append(torch.nn.functional.softplus(dt.float() + delta_bias[:, None]).transpose(1, 2).numpy())
        return original(hidden_states, dt, *args, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)

    monkeypatch.setattr(modeling, "mamba_selective_scan", capture)
    ids = _ids(kwargs["vocab_size"], (2, 45), seed=2)
    torch_logits(torch_model, ids)
    assert len(captured) == kwargs["num_hidden_layers"]
    got = mixer_dt(ssm.from_pretrained(path), ids)
    assert got.shape == (len(captured),) + captured[0].shape
    np.testing.assert_allclose(got, np.stack(captured), rtol=1e-5, atol=1e-6)


def test_from_scratch_init_follows_mamba_ssm():
    """A new model's mixer: A = -(1..n), D = 1, dt = softplus(dt_proj bias) log-uniform in [time_step_min,
    time_step_max], zero conv bias and zero in_proj/out_proj biases (mamba_ssm and transformers zero them; they
    were drawn uniformly)."""
    from configs import load_model_config

    config = load_model_config("tiny_falcon_mamba", ["use_bias=true", "use_conv_bias=true"])
    mixer = ssm.FalconMambaLM(config, seed=0).layers[0].mixer
    n = config.state_size
    np.testing.assert_allclose(np.exp(np.asarray(mixer.A_log[...])),
                               np.broadcast_to(np.arange(1, n + 1), (config.intermediate_size, n)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
    dt = np.log1p(np.exp(np.asarray(mixer.dt_proj.bias[...], np.float64)))
    assert config.time_step_min * 0.999 <= dt.min() and dt.max() <= config.time_step_max * 1.001 and dt.std() > 0
    for bias in (mixer.in_proj.bias, mixer.out_proj.bias, mixer.conv_bias):
        np.testing.assert_array_equal(np.asarray(bias[...]), 0.0)
    assert np.abs(np.asarray(mixer.conv_kernel[...])).max() <= config.conv_kernel ** -0.5


def test_from_scratch_embedding_and_projection_scales():
    """The embedding is N(0, 0.02^2) (mamba_ssm's init) and the plain projections (x_proj, out_proj) torch
    Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)): a scale drawn from the wrong fan or left at 1 trains another model
    but passes every parity test (those load trained weights)."""
    from configs import load_model_config

    config = load_model_config("tiny_falcon_mamba", ["intermediate_size=256", "rescale_prenorm_residual=false"])
    model = ssm.FalconMambaLM(config, seed=0)
    np.testing.assert_allclose(np.std(np.asarray(model.embeddings.embedding[...])), 0.02, rtol=0.05)
    mixer = model.layers[0].mixer
    for dense, fan_in in ((mixer.x_proj, config.intermediate_size), (mixer.out_proj, config.intermediate_size)):
        bound = np.abs(np.asarray(dense.kernel[...])).max()
        assert 0.95 * fan_in ** -0.5 < bound <= fan_in ** -0.5, (bound, fan_in)
