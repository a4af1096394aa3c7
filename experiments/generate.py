"""Generate a continuation from a local Hugging Face directory or a training run's output_dir, either family.

    python -m experiments.generate PATH --prompt "Hello" [--tokenizer PATH/tokenizer.json]
    python -m experiments.generate runs/a --ids 1,2,3 [--step 20]     # a checkpoint of experiments.train
    python -m experiments.generate PATH --ids 1,2,3 --max-new-tokens 32 --temperature 0.7 --top-p 0.9
    python -m experiments.generate PATH --prompt "Hello" --mesh tensor=8    # the parameters split over 8 devices

Text prompts go through a local tokenizer.json (the `tokenizers` package; default: PATH/tokenizer.json, or for a
training run started from a Hugging Face directory, that directory's).
The continuation is printed (streamed token by token with --stream) with the decode throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from configs.loader import load_preset_dict
from configs.schema import ConfigError
from experiments.cli import MESH_HELP, error_line, mesh_description, parse_mesh
from experiments.mesh import MeshError
from experiments.models import check_step, is_training_run, load_model
from runtime.safetensors_io import CheckpointError
from runtime.checks import check_positive_int
from runtime.generation import check_sampling, generate, stream


def _parse_ids(text: str) -> list[int]:
    """--ids' token ids: integers that an int32 prompt holds, >= 0 (the vocabulary is checked once loaded)."""
    tokens = text.replace(",", " ").split()
    if not tokens:
        raise SystemExit(f"error: --ids: expected at least one token id, got {text!r}")
    _check_ids("--ids", tokens)
    return [int(token) for token in tokens]


def _check_ids(flag: str, tokens) -> None:
    """SystemExit naming ``flag`` unless every token is an integer in [0, 2**31) (an int32 token id)."""
    for token in tokens:
        try:
            valid = 0 <= int(token) < 2**31
        except ValueError:
            valid = False
        if not valid:
            raise SystemExit(f"error: {flag}: expected token ids, integers in [0, 2**31) (int32), got {token!r}")


def incremental_text(decode: Callable[[list[int]], str], tokens: Iterable[int]) -> Iterator[str]:
    """The text of ``tokens`` as they come, in pieces that join to ``decode(all tokens)``: a token decoded alone
    loses the spaces and the multi-byte characters a tokenizer joins across tokens, and decoding all tokens at
    each step is quadratic. So the tokens from ``first`` on are decoded with and without those after ``shown``
    (the text is printed up to there) and the difference is the piece; a piece ending inside a multi-byte
    character (U+FFFD) waits for the next token."""
    produced: list[int] = []
    first = shown = 0
    for token in tokens:
        produced.append(token)
        before, text = decode(produced[first:shown]), decode(produced[first:])
        if text.startswith(before) and not text.endswith("\ufffd"):
            yield text[len(before):]
            first, shown = shown, len(produced)
    before, text = decode(produced[first:shown]), decode(produced[first:])
    if text != before:  # what waited: the end of the text (or, where a decoding rewrote earlier text, all of it)
        yield text[len(before):] if text.startswith(before) else "\n" + decode(produced)


def _hf_directory(path: str) -> Path:
    """PATH; for a training run started from a Hugging Face directory (init_from in its config.yaml), that
    directory: where its tokenizer and generation config are."""
    if is_training_run(path):  # ConfigError naming config.yaml where it is not a YAML mapping
        run = load_preset_dict(Path(path) / "config.yaml")
        if run.get("init_from"):
            return Path(run["init_from"])
    return Path(path)


def default_tokenizer(path: str) -> Path:
    """_hf_directory(path)/tokenizer.json."""
    return _hf_directory(path) / "tokenizer.json"


def default_stop_tokens(path: str, model_eos) -> tuple[list[int], str]:
    """(the stop tokens, where they come from): generation_config.json's eos_token_id in _hf_directory(path), as
    transformers' generate reads it (instruct models list their end-of-turn tokens there), else the model config's
    eos_token_id (``model_eos``: None, an id or a tuple of ids)."""
    source, eos = "the model's eos_token_id", model_eos
    generation_config = _hf_directory(path) / "generation_config.json"
    if generation_config.is_file():
        try:
            values = json.loads(generation_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{str(generation_config)!r}: expected a JSON object, got {err}") from None
        if isinstance(values, dict) and "eos_token_id" in values:
            source, eos = f"eos_token_id of {str(generation_config)!r}", values["eos_token_id"]
    tokens = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ConfigError(f"{source}: expected None, a token id or a list of them, got {eos!r}")
    return tokens, f"{source} {eos}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="local HF directory (config.json + *.safetensors [+ tokenizer.json]) or a "
                                     "training output_dir (config.yaml + checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: newest)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs a tokenizer.json)")
    source.add_argument("--ids", help="prompt token ids, e.g. 1,2,3")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: PATH/tokenizer.json; for a training run "
                                            "started from a Hugging Face directory, init_from's)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=int, nargs="*", default=None,
                        help="stop token ids (default: generation_config.json's eos_token_id, else the model's)")
    parser.add_argument("--chunk-size", type=int, default=None, help="prefill chunk size")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    parser.add_argument("--mesh", default=None, help=MESH_HELP)
    args = parser.parse_args(argv)

    # everything that needs no model is checked before loading one
    try:
        check_step(args.path, args.step)
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        if args.chunk_size is not None:
            check_positive_int("chunk_size", args.chunk_size)
    except ValueError as err:  # named by the library's parameter (top_p); the flag is --top-p
        name, _, problem = str(err).partition(":")
        raise SystemExit(f"error: --{name.replace('_', '-')}:{problem}")
    _check_ids("--stop", args.stop or [])
    mesh = parse_mesh("--mesh", args.mesh)
    tokenizer = None
    if args.prompt is not None or args.tokenizer is not None:  # --tokenizer with --ids: the output is decoded
        from tokenizers import Tokenizer

        try:
            tokenizer_path = Path(args.tokenizer) if args.tokenizer else default_tokenizer(args.path)
        except ConfigError as err:  # a training run's config.yaml that is not YAML
            raise SystemExit(f"error: {err}")
        if not tokenizer_path.is_file():
            raise SystemExit(f"error: --tokenizer: {str(tokenizer_path)!r} does not exist (text prompts need a "
                             f"tokenizer.json; or pass --ids)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as err:  # the tokenizers package raises a bare Exception for a file it cannot read
            raise SystemExit(f"error: --tokenizer: expected a tokenizer.json of the tokenizers package, got "
                             f"{str(tokenizer_path)!r}: {err}")
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise SystemExit(f"error: --prompt: expected text of at least one token, got {args.prompt!r}")
    else:
        ids = _parse_ids(args.ids)

    try:  # what a path cannot give (no checkpoint, no such step, a misfit config) is one error line
        model, step = load_model(args.path, args.step, args.compute_dtype, mesh)
    except (ConfigError, CheckpointError, MeshError, FileNotFoundError) as err:  # MeshError: --mesh does not fit
        raise SystemExit(error_line(err, {"step": "--step"}, mesh=args.mesh))
    if step is not None:
        print(f"[loaded checkpoint step {step} of {args.path}]", file=sys.stderr)
    if mesh is not None:
        print(f"[parameters split over the mesh {mesh_description(mesh)}]", file=sys.stderr)
    vocab_size = model.config.vocab_size
    source = "--ids" if args.prompt is None else f"--prompt: the tokenizer {str(tokenizer_path)!r}"
    for flag, tokens in ((source, ids), ("--stop", args.stop or [])):
        if max(tokens, default=0) >= vocab_size:
            raise SystemExit(f"error: {flag}: expected token ids below the model's vocab_size ({vocab_size}), got "
                             f"{max(tokens)}")
    stop = args.stop
    if stop is None:
        try:
            stop, source = default_stop_tokens(args.path, model.config.eos_token_id)
        except ConfigError as err:
            raise SystemExit(f"error: {err}; or pass --stop IDS (--stop alone for none)")
        if any(token >= vocab_size for token in stop):
            raise SystemExit(f"error: {source} is not below its vocab_size ({vocab_size}): pass --stop IDS (or "
                             f"--stop alone for none)")
    decode = (lambda toks: tokenizer.decode(toks)) if tokenizer else (lambda toks: " ".join(map(str, toks)))
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop_tokens=stop, chunk_size=args.chunk_size)
    prompt = np.array([ids], np.int32)

    start = time.perf_counter()
    try:  # what only the model shows (NaN logits of a prefill, a KV cache too big for the device): one error line too
        if args.stream:
            produced: list[int] = []

            def tokens():
                for step_tokens in stream(model, prompt, **kwargs):
                    if step_tokens[0] >= 0:
                        produced.append(int(step_tokens[0]))
                        yield produced[-1]

            for piece in incremental_text(decode, tokens()):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        else:
            produced = generate(model, prompt, **kwargs).row(0)
            print(decode(produced))
    except ValueError as err:  # named by the library's parameter: max_new_tokens is --max-new-tokens
        raise SystemExit(error_line(err, {"max_new_tokens": "--max-new-tokens"}))
    seconds = time.perf_counter() - start
    print(f"[{len(ids)} prompt tokens, {len(produced)} generated in {seconds:.2f} s: "
          f"{len(produced) / seconds:.1f} tokens/s including prefill and compilation]", file=sys.stderr)


if __name__ == "__main__":
    main()
