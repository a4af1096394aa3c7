"""Tier 2: our kernels on a CUDA GPU against mamba_ssm's / causal_conv1d's live CUDA and Triton kernels.

Marked ``gpu``; each test is skipped with a reason where JAX sees no GPU, or torch sees no CUDA or a kernel
package it uses (mamba_ssm, causal_conv1d) is not installed, and fails instead under scripts/gpu_tier.sh
(GPU_TIER_STRICT=1), which installs the kernels and runs this file on the GPU machine.

* selective scan, every impl, fp32 and bf16, variable and grouped B/C with D, z, delta_bias, softplus: out and
  last_state vs mamba_ssm.selective_scan_fn; gradients of every input vs mamba_ssm's backward;
* selective_state_update vs mamba_ssm's Triton selective_state_update;
* causal_conv1d_fn / causal_conv1d_update vs causal_conv1d's;
* a whole tiny Falcon Mamba in transformers on CUDA, running mamba_ssm's kernels (the test checks that the CUDA
  scan was called), vs the JAX model loaded from the same safetensors, on the GPU, for every scan impl;
* the JAX Falcon Mamba model on the GPU vs the same model on the CPU.
Tolerances are mamba_ssm's / causal_conv1d's own (REFERENCE.md).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_golden import TOL, check_scan_grad


# What each test needs besides a GPU that JAX sees ("torch": with CUDA). The scan and state-update tests do not
# need causal_conv1d (mamba_ssm imports without it), so a failed causal_conv1d build does not skip them.
MAMBA = ("torch", "mamba_ssm", "selective_scan_cuda")
CONV = ("torch", "causal_conv1d", "causal_conv1d_cuda")


def missing(needs=()) -> str | None:
    """Why a test that needs a GPU for JAX and the modules ``needs`` cannot run here, or None."""
    if not any(d.platform == "gpu" for d in jax.devices()):
        return f"JAX sees no GPU (devices: {jax.devices()})"
    for module in needs:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed" + ("" if module == "torch" else " (scripts/gpu_tier.sh builds it)")
        if module == "torch":
            import torch

            if not torch.cuda.is_available():
                return "torch sees no CUDA device"
    return None


def require(needs=()) -> None:
    """Skips the calling test where ``missing(needs)`` says why it cannot run; under scripts/gpu_tier.sh
    (GPU_TIER_STRICT=1) fails it instead, so that a GPU JAX does not see or a kernel that did not build is not
    reported as a passing run of skips."""
    reason = missing(needs)
    if reason is not None:
        (pytest.fail if os.environ.get("GPU_TIER_STRICT") == "1" else pytest.skip)(reason)


pytestmark = pytest.mark.gpu


def _torch(x, dtype):
    import torch

    return torch.tensor(np.asarray(x, np.float32), device="cuda").to(getattr(torch, dtype))


def _close(got, want, tol, name=""):
    """``want``: a torch tensor (detached here: mamba_ssm's last state requires grad) or a NumPy array."""
    np.testing.assert_allclose(np.asarray(jnp.asarray(got, jnp.float32)), want.detach().float().cpu().numpy()
                               if hasattr(want, "detach") else want, **tol, err_msg=name)


SCAN_CASES = [(256, "bnl"), (1024, "g2"), (4096, "g1")]
SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seqlen, bc", SCAN_CASES)
@pytest.mark.parametrize("impl", ["pallas", "chunked", "sequential", "reference"])  # the kernels first
def test_scan_matches_mamba_ssm(impl, seqlen, bc, dtype):
    require(MAMBA)
    import torch
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

    from scripts.record_goldens import CudaBackend, scan_inputs
    from ssm.scan import selective_scan_fn

    inputs = scan_inputs(seqlen, dtype, 2, 64, 16, seqlen, bc, True, True, True, True)
    low = ("u", "delta", "B", "C", "z")
    theirs = {k: _torch(v, dtype if k in low else "float32").requires_grad_() for k, v in inputs.items()}
    out_t, last_t = mamba_scan(*(theirs[k] for k in SCAN_INPUTS), True, True)
    rng = np.random.default_rng(seqlen)
    g = rng.standard_normal(out_t.shape).astype(np.float32)
    (out_t.float() * _torch(g, "float32")).sum().backward()

    ours = {k: jnp.asarray(v, jnp.bfloat16 if dtype == "bfloat16" and k in low else jnp.float32)
            for k, v in inputs.items()}

    def loss(diff):
        out, last = selective_scan_fn(**{**ours, **diff}, delta_softplus=True, return_last_state=True, impl=impl)
        return jnp.sum(out.astype(jnp.float32) * g), (out, last)

    grads, (out, last) = jax.jit(jax.grad(loss, has_aux=True))(ours)
    fp32 = dict.fromkeys(SCAN_INPUTS)
    if dtype == "bfloat16":  # the gradients computed in fp32 on the same bf16 values (check_scan_grad)
        fp32 = CudaBackend().scan_grads(inputs, True, dtype, g, fp32_reference=True)
    tol = TOL["scan", dtype]
    checks = [lambda: _close(out, out_t, tol, name="out"), lambda: _close(last, last_t, tol, name="last_state")]
    checks += [lambda n=n: check_scan_grad(n, grads[n], theirs[n].grad.float().cpu().numpy(), tol, True, fp32[n])
               for n in SCAN_INPUTS]
    errors = []  # every mismatch of the case reported, not the first only: the GPU runs this once
    for check in checks:
        try:
            check()
        except AssertionError as error:
            errors.append(str(error))
    torch.cuda.synchronize()
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("groups", [0, 2])
def test_state_update_matches_mamba_ssm_triton(groups, dtype):
    require(MAMBA)
    from scripts.record_goldens import mamba_state_update, state_update_inputs
    from ssm.scan import selective_state_update

    inputs = state_update_inputs(7 + groups, dtype, 4, 256, 16, groups, True, True, True, True)
    low = ("x", "dt", "B", "C", "z")
    theirs = {k: _torch(v, dtype if k in low else "float32") for k, v in inputs.items()}
    out_t = mamba_state_update(theirs["state"], theirs["x"], theirs["dt"], theirs["A"], theirs["B"], theirs["C"],
                               theirs["D"], theirs["z"], theirs["dt_bias"], True)
    ours = {k: jnp.asarray(v, jnp.bfloat16 if dtype == "bfloat16" and k in low else jnp.float32)
            for k, v in inputs.items()}
    out, state = selective_state_update(**ours, dt_softplus=True)
    tol = TOL["state_update", dtype]
    _close(out, out_t, tol, name="out")
    _close(state, theirs["state"], tol, name="state")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_cuda(activation, dtype):
    """causal_conv1d_fn (with and without initial_states / return_final_states) and causal_conv1d_update (one token
    and several, a state longer than kernel - 1) against causal_conv1d's CUDA kernels, called as the golden
    recorder calls them (which hands initial states to the kernel in the channel-last layout it needs)."""
    require(CONV)
    from scripts.record_goldens import CudaBackend, conv_inputs, conv_update_inputs
    from ssm.conv import causal_conv1d_fn, causal_conv1d_update

    cuda = CudaBackend()
    tol = TOL["conv", dtype]
    ours = lambda inputs: {k: jnp.asarray(v, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)  # noqa: E731
                           for k, v in inputs.items()}
    inputs = conv_inputs(3, dtype, 2, 256, 1000, 4, True)
    _close(causal_conv1d_fn(**ours(inputs), activation=activation), cuda.conv_fn(inputs, activation, dtype)["out"],
           tol, name="causal_conv1d_fn")
    inputs = conv_inputs(5, dtype, 2, 256, 1000, 4, True, initial=True)
    want = cuda.conv_fn(inputs, activation, dtype)
    out, final = causal_conv1d_fn(**ours(inputs), return_final_states=True, activation=activation)
    _close(out, want["out"], tol, name="causal_conv1d_fn with initial_states")
    _close(final, want["final_states"], dict(rtol=0, atol=0), name="causal_conv1d_fn final_states")  # input copies
    for seqlen, state_len in ((None, 4), (3, 6)):
        inputs = conv_update_inputs(4, dtype, 2, 256, 4, True, seqlen, state_len)
        want = cuda.conv_update(inputs, activation, dtype)
        out, state = causal_conv1d_update(**ours(inputs), activation=activation)
        _close(out, want["out"], tol, name=f"causal_conv1d_update out, x's seqlen {seqlen}")
        _close(state, want["conv_state"], tol, name=f"causal_conv1d_update conv_state, x's seqlen {seqlen}")


@pytest.mark.parametrize("preset", ["tiny_falcon_mamba", "tiny_falcon", "tiny_falcon_alibi"])
def test_model_on_gpu_matches_cpu(preset):
    """Each family's tiny JAX model: fp32 logits on the GPU == on the CPU (mamba_ssm's fp32 forward tolerance),
    fp32 matmuls at full precision on both (no TF32)."""
    require()
    from configs import load_model_config
    from experiments.models import family_of

    config = load_model_config(preset, [])
    lm = family_of(config).lm
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 64))
    with jax.default_matmul_precision("highest"):
        with jax.default_device(jax.devices("cpu")[0]):
            want = np.asarray(lm(config, seed=0)(ids))
        got = np.asarray(lm(config, seed=0)(ids))
    np.testing.assert_allclose(got, want, **TOL["scan", "float32"])


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_falcon_mamba_matches_transformers_on_cuda_kernels(impl, tmp_path, monkeypatch):
    """transformers' FalconMambaForCausalLM (eval mode, as build_and_save returns it) on CUDA takes its kernel path
    (causal_conv1d_fn where causal_conv1d is installed, and mamba_ssm's selective_scan_fn, checked by counting
    calls of the CUDA scan; mamba_inner_fn is its training mode's, another function); our model, loaded from the same
    safetensors, on the GPU: fp32 logits within mamba_ssm's fp32 scan tolerance. Then the training loss and every
    weight's gradient, theirs through the same kernels' backward (eval mode does not take mamba_inner_fn; counted
    too) against the trainer's loss on the GPU: within 1e-3 of each weight's largest gradient (on CPU, against
    transformers' PyTorch scan, 1e-4 holds with 10x room: tests/test_falcon_mamba_parity.py). fp32 matmuls on both
    sides at full precision (no TF32)."""
    require(MAMBA)
    import selective_scan_cuda
    import torch
    from transformers import FalconMambaConfig, FalconMambaForCausalLM

    import ssm
    from ssm.weights import weight_specs
    from tests.hf_models import assert_gradients_close, build_and_save, jax_loss_grads, torch_loss_grads

    kwargs = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4,
                  time_step_rank=8, tie_word_embeddings=False)
    model = build_and_save(FalconMambaConfig, FalconMambaForCausalLM, tmp_path, seed=11, **kwargs).cuda()
    calls = []
    cuda_forward = selective_scan_cuda.fwd
    monkeypatch.setattr(selective_scan_cuda, "fwd", lambda *args: calls.append(1) or cuda_forward(*args))
    backward_calls = []
    cuda_backward = selective_scan_cuda.bwd
    monkeypatch.setattr(selective_scan_cuda, "bwd", lambda *args: backward_calls.append(1) or cuda_backward(*args))
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = np.random.default_rng(1).integers(0, kwargs["vocab_size"], (2, 300))
    with torch.no_grad():
        want = model(torch.tensor(ids, device="cuda")).logits.float().cpu().numpy()
    assert calls, "transformers did not call mamba_ssm's CUDA selective scan (its kernel path was not taken)"
    ours = ssm.from_pretrained(tmp_path, scan_impl=impl)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(ids))
    np.testing.assert_allclose(got, want, **TOL["scan", "float32"])
    want_loss, want_grads = torch_loss_grads(model, ids)
    assert backward_calls, "transformers' backward did not call mamba_ssm's CUDA selective scan backward"
    with jax.default_matmul_precision("highest"):
        loss, grads = jax_loss_grads(ours, ids, weight_specs(ours.config))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_gradients_close(grads, want_grads, 1e-3)
