"""`make demo`: Falcon Mamba's forward over a long random sequence, with its throughput.

A randomly initialised small Falcon Mamba (configs/small_falcon_mamba.yaml) reads a random prompt of
--length tokens in one pass (the sequential scan keeps one fp32 state per channel; memory grows only with
the activations), then reports tokens/s and the next-token distribution at the last position.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import load_model_config
from experiments.models import n_params
from experiments.timing import time_call, versions
from ssm import FalconMambaLM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small_falcon_mamba")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = load_model_config(args.preset)
    model = FalconMambaLM(config, seed=args.seed)
    print(f"Falcon Mamba {args.preset}: {n_params(model) / 1e6:.1f}M parameters, d_model {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, d_state {config.state_size}; {versions()}")

    @nnx.jit
    def last_logits(model, ids):
        hidden, _ = model.run(ids, None)
        return model.logits(hidden[:, -1:])[:, 0]

    ids = jnp.asarray(np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.length)),
                      jnp.int32)
    seconds = time_call(last_logits, model, ids, repeats=2)
    logits = last_logits(model, ids)
    probs = jax.nn.softmax(logits[0])
    top = jnp.argsort(-probs)[:5]
    print(f"forward over {args.batch} x {args.length} tokens: {seconds:.2f} s, "
          f"{args.batch * args.length / seconds:,.0f} tokens/s on {jax.default_backend()}")
    print("next-token top-5 at the last position (random weights):",
          ", ".join(f"{int(t)}:{float(probs[t]):.4f}" for t in top))


if __name__ == "__main__":
    main()
