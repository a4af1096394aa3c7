"""Per-layer rematerialisation (config ``remat``, runtime.interface.call_layer) in the loss of experiments.train,
for both families: the same loss and gradients as without remat, and the residuals the backward pass keeps
(jax's saved_residuals of the loss) shrink to each layer's input ("full") or that plus the layer's matmul
outputs ("dots"). (XLA:CPU's compiled temp size grows with the layer count whether or not the layers are
rematerialised, docs/PLANNING.md "Limits", so it is not asserted on.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import load_config
from experiments import data as data_lib
from jax._src.ad_checkpoint import saved_residuals

from experiments.train import REMAT_POLICIES, masked_loss, prepare

# Four layers at seq 256: the saved intermediates of the layers dominate the step's temporaries.
CASES = {
    "tiny_falcon_mamba": ["model.num_hidden_layers=4", "data.seq_len=256", "data.batch_size=4", "data.task=bytes"],
    "tiny_falcon": ["model.num_hidden_layers=4", "data.seq_len=256", "data.batch_size=4", "data.task=bytes",
                    "model.max_position_embeddings=256"],
}


def _setup(preset: str):
    run = load_config(preset, CASES[preset])
    setup = prepare(run)
    batch = {k: jnp.asarray(v[0]) for k, v in data_lib.batch_at(run.data, run.model.vocab_size, 0, 0).items()}
    return setup, jax.jit(setup.init_state)()["params"], batch


def _loss(setup, batch, remat):
    policy = None if remat == "none" else REMAT_POLICIES[remat]
    return lambda params: masked_loss(params, batch, 1.0, graphdef=setup.graphdef, structure=setup.structure,
                                      remat=policy)


def _saved_activation_bytes(loss, params) -> int:
    return sum(aval.size * aval.dtype.itemsize for aval, where in saved_residuals(loss, params)
               if "from the argument" not in where)


@pytest.mark.parametrize("preset", sorted(CASES))
def test_remat_same_gradients_fewer_saved_residuals(preset):
    setup, params, batch = _setup(preset)
    layer_input = int(np.prod(batch["inputs"].shape)) * setup_hidden(preset) * 4
    saved, results = {}, {}
    for remat in ("none", "full", "dots"):
        loss = _loss(setup, batch, remat)
        saved[remat] = _saved_activation_bytes(loss, params)
        results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    base_loss, base_grads = results["none"]
    for remat in ("full", "dots"):
        loss, grads = results[remat]
        np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-6)
        for name, value in grads.items():
            scale = float(np.max(np.abs(np.asarray(base_grads[name]))))
            np.testing.assert_allclose(np.asarray(value), np.asarray(base_grads[name]), rtol=1e-5,
                                       atol=1e-6 * scale, err_msg=name)
    layers = 4
    assert saved["none"] > 8 * layers * layer_input, saved
    assert saved["full"] < saved["dots"] < saved["none"], saved
    # full: each layer's input, plus the final norm / lm_head / cross-entropy residuals (not rematerialised)
    assert saved["full"] <= (layers + 4) * layer_input + batch["inputs"].size * 256 * 4, saved


def setup_hidden(preset: str) -> int:
    return load_config(preset).model.hidden_size
