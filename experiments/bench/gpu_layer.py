"""One Falcon Mamba mixer layer (in_proj, causal conv, x_proj, the dt/B/C norms, dt_proj, selective scan, gate,
out_proj) in JAX beside transformers' FalconMambaMixer, same weights, same run: forward and forward+backward.

    python -m experiments.bench.gpu_layer falcon_mamba_7b [--lengths 2048 8192] [--batches 1 4]
                                          [--impls chunked pallas] [--out DIR]

On a GPU with mamba_ssm and causal_conv1d installed, transformers' mixer takes its kernel path: in eval mode, which
this script uses, causal_conv1d_fn and mamba_ssm's selective_scan_fn (backward included); its training mode would
fuse them in mamba_inner_fn, which puts the dt norm after dt_proj and so computes another function (REFERENCE.md).
Without the kernels (or on CPU) it runs its PyTorch path, which the smoke test uses. Both
sides hold bf16 weights and compute in bf16 with the fp32 scan state (model.param_dtype / compute_dtype
bfloat16 on our side, module.to(bfloat16) on theirs). The layer is the preset's with num_hidden_layers=1, saved
by transformers and loaded by ssm.from_pretrained, so before timing the script checks that both layers compute
the same function (max |difference| relative to max |output|, printed). Prints per shape each side's
milliseconds and the ratio torch / JAX (above 1: JAX faster); --out writes DIR/gpu_layer.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import load_model_config
from configs.hf import model_config_to_hf
from experiments.bench import check_out_dir, check_preset, positive_int, provenance, write_provenance
from experiments.timing import format_row, time_call, versions
from ssm.scan import IMPLS


def build_theirs(preset: str, overrides: list[str], path: str):
    """transformers' one-layer ``preset`` model saved to ``path``; returns its bf16 mixer and the torch device."""
    import torch
    import transformers

    config = load_model_config(preset, [*overrides, "num_hidden_layers=1"])
    hf_config = transformers.AutoConfig.for_model(**model_config_to_hf(config))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(path, safe_serialization=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixer = model.backbone.layers[0].mixer.to(device=device, dtype=torch.bfloat16)
    return mixer.eval(), device  # eval: Falcon Mamba's function (see the module docstring)


def load_ours(path: str, impl: str):
    """Our bf16 mixer from the same safetensors, scanning with ``impl``."""
    import ssm

    return ssm.from_pretrained(path, compute_dtype="bfloat16", param_dtype="bfloat16", scan_impl=impl).layers[0].mixer


def jax_layer(mixer):
    """(params, jitted forward(params, x), jitted gradients(params, x, dout) in params and x for the output's
    cotangent dout): compiled once per input shape, reused for the agreement check and the timings. Both sides'
    backward passes take the same dout, ones like the output (the gradient of sum(out)), made before timing: as a
    constant inside the jitted function XLA would fold it away."""
    graphdef, params = nnx.split(mixer)

    def forward(params, x):
        return nnx.merge(graphdef, params)(x)[0]

    return params, jax.jit(forward), jax.jit(lambda p, x, dout: jax.vjp(forward, p, x)[1](dout))


def torch_layer(mixer, dout=None):
    """The timed call of the PyTorch layer: its forward, or with ``dout`` its forward and backward."""
    import torch

    def run(x):
        if dout is not None:
            mixer.zero_grad(set_to_none=True)
            x = x.detach().requires_grad_()
            mixer(x).backward(dout)
        else:
            with torch.no_grad():
                mixer(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    return run


def bench(preset: str, overrides: list[str], lengths, batches, impls, repeats: int, save=None) -> list[dict]:
    """The rows, one per impl and shape; ``save(rows)`` is called after each (a run stopped by its time limit keeps
    what it measured). A shape that raises (an out-of-memory, a kernel that does not compile) gets a row with
    ``error`` and the run goes on."""
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as path:
        theirs, device = build_theirs(preset, overrides, path)
        mixers = {impl: load_ours(path, impl) for impl in impls}
    for impl, ours in mixers.items():
        hidden = ours.config.hidden_size
        params, forward, gradients = jax_layer(ours)
        for batch in batches:
            for length in lengths:
                row = dict(impl=impl, batch=batch, length=length, device=device)
                try:
                    x = np.random.default_rng(batch * length).standard_normal((batch, length, hidden), np.float32)
                    x_jax = jnp.asarray(x, jnp.bfloat16)
                    x_torch = torch.tensor(x, device=device).to(torch.bfloat16)
                    got = np.asarray(forward(params, x_jax).astype(jnp.float32))
                    with torch.no_grad():
                        want = theirs(x_torch).float().cpu().numpy()
                    row["max_abs_diff_over_max_abs"] = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                    dout_jax, dout_torch = jnp.ones_like(x_jax), torch.ones_like(x_torch)  # output shape = input's
                    timed = (("fwd", forward, (), None), ("fwd+bwd", gradients, (dout_jax,), dout_torch))
                    for name, fn, extra, dout in timed:
                        row[f"jax_{name}_ms"] = 1e3 * time_call(fn, params, x_jax, *extra, repeats=repeats)
                        row[f"torch_{name}_ms"] = 1e3 * time_call(torch_layer(theirs, dout), x_torch, repeats=repeats)
                        row[f"torch_over_jax_{name}"] = row[f"torch_{name}_ms"] / row[f"jax_{name}_ms"]
                except Exception as error:  # noqa: BLE001 - recorded in the results, the run goes on
                    row["error"] = f"{type(error).__name__}: {error}"[:500]
                rows.append(row)
                if save is not None:
                    save(rows)
                print(format_row(row), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*", help="model config overrides, key=value (hidden_size=64)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--impls", nargs="+", default=["chunked", "pallas"], choices=IMPLS)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # a Falcon Mamba mixer layer: a transformer preset has none (it failed with an AttributeError once built)
    check_preset(parser, "preset", args.preset, "falcon_mamba", args.overrides)
    if args.out is not None:
        check_out_dir(parser, args.out)
    environment = versions()
    origin = provenance("experiments.bench.gpu_layer", argv) if args.out else None

    def save(rows):  # after every row: a run cut short by its time limit keeps what it measured
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            result = dict(preset=args.preset, overrides=args.overrides, versions=environment, rows=rows,
                          date=time.strftime("%Y-%m-%d %H:%M:%S %z"))
            (args.out / "gpu_layer.json").write_text(json.dumps(result, indent=2) + "\n")
            write_provenance(args.out / "gpu_layer.json", origin)

    rows = bench(args.preset, args.overrides, args.lengths, args.batches, args.impls, args.repeats, save)
    print(f"\n{'impl':>8} {'batch':>5} {'len':>6} {'jax fwd ms':>11} {'torch fwd ms':>13} {'ratio':>6} "
          f"{'jax f+b ms':>11} {'torch f+b ms':>13} {'ratio':>6} {'rel diff':>9}")
    columns = (("jax_fwd_ms", 11, ".3f"), ("torch_fwd_ms", 13, ".3f"), ("torch_over_jax_fwd", 6, ".2f"),
               ("jax_fwd+bwd_ms", 11, ".3f"), ("torch_fwd+bwd_ms", 13, ".3f"), ("torch_over_jax_fwd+bwd", 6, ".2f"),
               ("max_abs_diff_over_max_abs", 9, ".2e"))
    for r in rows:
        cells = " ".join(f"{r[key]:{width}{spec}}" if key in r else f"{'-':>{width}}" for key, width, spec in columns)
        error = f"  {r['error'][:100]}" if "error" in r else ""
        print(f"{r['impl']:>8} {r['batch']:>5} {r['length']:>6} {cells}{error}")
    if args.out:
        print(f"wrote {args.out / 'gpu_layer.json'}")


if __name__ == "__main__":
    main()
