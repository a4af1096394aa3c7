"""The same model's training step in PyTorch (transformers; on a GPU with mamba_ssm / causal_conv1d installed,
their CUDA kernels), beside experiments.bench.train_throughput's JAX step, in one run: the ratio the sharded
training issue's "within 1.5x of mamba_ssm" goal asks for.

    python -m experiments.bench.torch_train_step falcon_mamba_7b model.num_hidden_layers=8 [--steps 5] [--bf16]

The PyTorch model is built by transformers from the preset's Hugging Face config (configs.hf.model_config_to_hf),
trained with torch.optim.AdamW (the preset's lr, betas, eps, weight decay) and gradient clipping, on the same
random-token batch shape (data.batch_size x data.seq_len); --bf16 runs it under torch.autocast(bfloat16) with
fp32 master weights, as the JAX step does with model.compute_dtype=bfloat16. Prints both steps' seconds and
tokens/s and the ratio torch / JAX (above 1: JAX faster). In training mode transformers' Falcon Mamba fuses conv
and scan in mamba_ssm's mamba_inner_fn, which applies the dt norm after dt_proj (REFERENCE.md): the same cost,
a slightly different function. The torch model is built on the GPU directly and each framework's row is printed
as soon as it is measured."""

from __future__ import annotations

import argparse
import json

from configs import load_config
from configs.hf import model_config_to_hf
from experiments.bench import check_runs, positive_int, provenance
from experiments.bench.train_throughput import bench as jax_bench
from experiments.timing import time_call, versions


def torch_bench(preset: str, overrides: list[str], steps: int, bf16: bool) -> dict:
    import torch
    import transformers

    run = load_config(preset, overrides)
    hf = model_config_to_hf(run.model)
    config = transformers.AutoConfig.for_model(**hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialised where it runs (a 7B-shaped model on the CPU first takes minutes)
        model = transformers.AutoModelForCausalLM.from_config(config).train()
    opt = run.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    shape = (run.data.batch_size, run.data.seq_len)
    ids = torch.randint(0, run.model.vocab_size, shape, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def synced():
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    seconds = time_call(synced, repeats=steps)  # median after one warm-up step (kernel selection, allocator)
    tokens = shape[0] * shape[1]
    return {"framework": "torch", "device": device, "bf16_autocast": bf16, "step_seconds": seconds,
            "tokens_per_s": tokens / seconds, "params": sum(p.numel() for p in model.parameters())}


def _row_line(name: str, row: dict) -> str:
    return (f"{name:6s} {row['params'] / 1e6:8.2f}M params: {row['step_seconds'] * 1000:9.1f} ms/step, "
            f"{row['tokens_per_s']:10,.0f} tokens/s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, for both steps")
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--bf16", action="store_true", help="torch autocast bf16 and JAX model.compute_dtype=bfloat16 "
                        "(without it both fp32, whatever the preset's compute_dtype)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # the JAX step in the torch step's dtype either way (the 7B presets compute in bf16 by themselves)
    jax_overrides = args.overrides + [f"model.compute_dtype={'bfloat16' if args.bf16 else 'float32'}"]
    check_runs(parser, [args.preset], jax_overrides, "preset")  # before the JAX step is compiled and timed
    jax_row = jax_bench(args.preset, jax_overrides, args.steps, None)
    if not args.json:  # printed now: a time limit reached during the torch step keeps this row
        print(_row_line("jax", jax_row), flush=True)
    torch_row = torch_bench(args.preset, args.overrides, args.steps, args.bf16)
    result = {"versions": versions(), "preset": args.preset, "overrides": args.overrides, "jax": jax_row,
              "torch": torch_row, "torch_over_jax_seconds": torch_row["step_seconds"] / jax_row["step_seconds"]}
    if args.json:
        print(json.dumps(dict(result, provenance=provenance("experiments.bench.torch_train_step", argv)), indent=2))
        return
    print(f"versions: {result['versions']}")
    print(_row_line("torch", torch_row))
    print(f"torch / jax step time: {result['torch_over_jax_seconds']:.2f}x (above 1: JAX faster)")


if __name__ == "__main__":
    main()
