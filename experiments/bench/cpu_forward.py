"""CPU benchmark: the JAX Falcon Mamba forward against transformers' PyTorch forward of the same weights,
and each scan implementation's forward and forward+backward throughput.

    python -m experiments.bench.cpu_forward [--length 4096] [--batch 1] [--preset small_falcon_mamba]
        [--vocabs 1024 65024]

Both models compute full-sequence fp32 logits for the same token ids; the weights are built once (random,
mamba_ssm init), exported with ssm.save_pretrained and loaded by transformers. Printed: seconds, tokens/s
and the JAX/transformers ratio, all measured in this run, plus the max logits difference as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from configs import load_model_config
from experiments.bench import check_preset, positive_int, provenance
from experiments.timing import time_call, versions
from ssm import FalconMambaLM, save_pretrained
from ssm.scan import selective_scan


def bench_model(args, vocab: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(args.preset, [f"vocab_size={vocab}"])
    model = FalconMambaLM(config, seed=0)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    jax_seconds = time_call(model, ids, repeats=args.repeats)
    jax_logits = np.asarray(model(ids))

    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        torch_model = AutoModelForCausalLM.from_pretrained(tmp).eval()
    torch_ids = torch.tensor(ids)
    with torch.no_grad():
        torch_seconds = time_call(lambda: torch_model(torch_ids).logits, repeats=args.repeats)
        torch_logits = torch_model(torch_ids).logits
    tokens = args.batch * args.length
    return {
        "preset": args.preset, "vocab_size": config.vocab_size, "batch": args.batch, "length": args.length,
        "jax_seconds": jax_seconds, "transformers_seconds": torch_seconds,
        "jax_tokens_per_s": tokens / jax_seconds, "transformers_tokens_per_s": tokens / torch_seconds,
        "speedup_vs_transformers": torch_seconds / jax_seconds,
        "max_abs_logits_diff": float(np.abs(jax_logits - torch_logits.numpy()).max()),
    }


def bench_scans(args) -> list[dict]:
    config = load_model_config(args.preset)
    dim, dstate = config.intermediate_size, config.state_size
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    b, l = args.batch, args.length
    u = jax.random.normal(keys[0], (b, l, dim))
    delta = jax.random.normal(keys[1], (b, l, dim)) - 2.0
    A = -jnp.exp(jax.random.normal(keys[2], (dim, dstate)))
    B = jax.random.normal(keys[3], (b, l, 1, dstate))
    C = jax.random.normal(keys[4], (b, l, 1, dstate))
    rows = []
    for impl, chunk in (("reference", None), ("sequential", 64), ("sequential", 256), ("chunked", 64),
                        ("chunked", 256)):
        def run(u, delta, A, B, C, impl=impl, chunk=chunk):
            return selective_scan(u, delta, A, B, C, delta_softplus=True, impl=impl, chunk_size=chunk)[0]

        forward = jax.jit(run)
        backward = jax.jit(jax.grad(lambda *a: run(*a).sum(), argnums=(0, 1, 2, 3, 4)))
        fwd = time_call(forward, u, delta, A, B, C, repeats=args.repeats)
        bwd = time_call(backward, u, delta, A, B, C, repeats=args.repeats)
        rows.append({"impl": impl, "chunk_size": chunk, "dim": dim, "dstate": dstate, "batch": b, "length": l,
                     "forward_tokens_per_s": b * l / fwd, "forward_backward_tokens_per_s": b * l / bwd})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small_falcon_mamba")
    parser.add_argument("--vocabs", type=positive_int, nargs="+", default=[1024, 65024],
                        help="vocab sizes to run: a small one measures the model body; at Falcon's 65024 the "
                             "lm_head matmul, the same in both frameworks, dominates")
    parser.add_argument("--length", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--torch-threads", type=positive_int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    # FalconMambaLM and its scans: a transformer preset has no Falcon Mamba model (checked before anything is built)
    for vocab in args.vocabs:
        check_preset(parser, "--preset", args.preset, "falcon_mamba", [f"vocab_size={vocab}"])

    models = [bench_model(args, vocab) for vocab in args.vocabs]
    scans = bench_scans(args)
    if args.json:
        print(json.dumps({"versions": versions(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "models": models,
                          "scans": scans, "provenance": provenance("experiments.bench.cpu_forward", argv)},
                         indent=2))
        return
    print(f"versions: {versions()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for row in models:
        print(f"model {row['preset']} (vocab {row['vocab_size']}), batch {row['batch']} x {row['length']} tokens, "
              f"fp32 logits:")
        print(f"  JAX          {row['jax_seconds']:8.3f} s  {row['jax_tokens_per_s']:10,.0f} tokens/s")
        print(f"  transformers {row['transformers_seconds']:8.3f} s  {row['transformers_tokens_per_s']:10,.0f} "
              f"tokens/s")
        print(f"  JAX / transformers throughput: {row['speedup_vs_transformers']:.1f}x   "
              f"(max |logits diff| {row['max_abs_logits_diff']:.2e})")
    print(f"scan only (dim {scans[0]['dim']}, dstate {scans[0]['dstate']}):")
    for row in scans:
        name = row["impl"] + (f"(chunk {row['chunk_size']})" if row["chunk_size"] else "")
        print(f"  {name:18s} forward {row['forward_tokens_per_s']:10,.0f} tokens/s   "
              f"forward+backward {row['forward_backward_tokens_per_s']:10,.0f} tokens/s")


if __name__ == "__main__":
    main()
