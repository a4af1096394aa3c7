"""Builds tiny random transformers models, perturbed away from their init values, saved to safetensors."""

from __future__ import annotations

import copy

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
