"""Builds tiny random transformers models, perturbed away from their init values, saved to safetensors."""

from __future__ import annotations

import copy
import functools

import numpy as np


def perturb_(model, seed: int, scale: float = 0.1) -> None:
    """Adds noise to every parameter so that no init-time symmetry (D = 1, A_log = log n...) hides a bug."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def build_and_save(config_cls, model_cls, path, seed: int = 0, **config_kwargs):
    """A deep-copied config (transformers shares config objects between models), a perturbed model saved to
    ``path`` with safetensors, returned in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(copy.deepcopy(config_cls(**config_kwargs))).eval()
    perturb_(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def torch_loss_grads(model, ids: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' training loss on ``ids`` (labels=ids: the mean next-token cross entropy) and its gradient for
    every parameter by checkpoint name (a tied lm_head's under the embedding's, as the checkpoint stores it), on the
    model's device and in its mode (FalconMamba in eval mode on CUDA takes its unfused kernel path)."""
    import torch

    model.zero_grad()
    ids = torch.tensor(ids, dtype=torch.long, device=model.device)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return float(loss), {name: param.grad.detach().float().cpu().numpy() for name, param in model.named_parameters()}


def jax_loss_grads(model, ids: np.ndarray, specs) -> tuple[float, dict[str, np.ndarray]]:
    """Our training loss (experiments.train.masked_loss, what the trainer differentiates) on ``ids`` with every
    next token a target, and its gradient mapped to checkpoint names and layouts by the export's ``specs``. As in
    transformers, the forward reads all of ``ids`` and the last position, which has no next token, is masked out
    (dynamic NTK RoPE depends on the length read)."""
    import jax
    from flax import nnx

    from experiments.mesh import flatten_params, unflatten_params
    from experiments.train import masked_loss
    from runtime.hf_weights import export_weights

    graphdef, state = nnx.split(model, nnx.Param)
    params, structure = flatten_params(state)
    mask = np.ones(ids.shape, np.float32)
    mask[:, -1] = 0
    batch = {"inputs": ids, "targets": np.roll(ids, -1, axis=1), "mask": mask}
    loss_fn = functools.partial(masked_loss, graphdef=graphdef, structure=structure)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch, float(mask.sum()))
    return float(loss), dict(export_weights(nnx.merge(graphdef, unflatten_params(grads, structure)), specs))


def assert_gradients_close(got: dict, want: dict, relative: float, note: str = "") -> None:
    """The same weights, each gradient within ``relative`` x that weight's largest |gradient| of ``want``'s."""
    assert sorted(got) == sorted(want)
    for weight, grad in want.items():
        np.testing.assert_allclose(got[weight], grad, rtol=0, atol=relative * np.max(np.abs(grad)),
                                   err_msg=f"{note}{weight}")
