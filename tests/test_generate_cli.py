"""python -m experiments.generate on tiny checkpoints saved by transformers, with a local tokenizer.json: its main()
in this process (_main) as the command line runs it, and once in a process of its own (_run, from a training
run's output_dir)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
from transformers import FalconConfig, FalconForCausalLM, FalconMambaConfig, FalconMambaForCausalLM

from tests.hf_models import build_and_save


def _word_level_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module", params=["falcon_mamba", "falcon"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "falcon_mamba":
        build_and_save(FalconMambaConfig, FalconMambaForCausalLM, path, vocab_size=40, hidden_size=16,
                       num_hidden_layers=1, state_size=4, expand=2, eos_token_id=39)
    else:
        build_and_save(FalconConfig, FalconForCausalLM, path, vocab_size=40, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, eos_token_id=39)
    _word_level_tokenizer(path, 40)
    return path


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.generate", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def _main(*args) -> subprocess.CompletedProcess:
    """What _run returns, from experiments.generate's main() in this process (a process of its own spent most of
    its time importing JAX and compiling what the previous run had compiled): a SystemExit's message goes to
    stderr with exit status 1, as the interpreter reports it."""
    from experiments import generate

    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            generate.main([str(arg) for arg in args])
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                status = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
                status = 1
    return subprocess.CompletedProcess(["experiments.generate", *args], status, stdout.getvalue(), stderr.getvalue())


def test_text_prompt_and_ids_give_the_same_continuation(checkpoint):
    text = _main(checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--stop")
    ids = _main(checkpoint, "--ids", "1,2,3", "--max-new-tokens", "5", "--stop")
    assert text.returncode == 0, text.stderr
    assert ids.returncode == 0, ids.stderr
    words = text.stdout.split()
    assert len(words) == 5 and all(w.startswith("w") or w == "[UNK]" for w in words)
    assert [w if w == "[UNK]" else int(w[1:]) for w in words] == [
        "[UNK]" if int(t) == 39 else int(t) for t in ids.stdout.split()]
    assert "tokens/s" in text.stderr
    # --tokenizer with --ids decodes the output (it was ignored: ids were printed)
    decoded = _main(checkpoint, "--ids", "1,2,3", "--max-new-tokens", "5", "--stop", "--tokenizer",
                   checkpoint / "tokenizer.json")
    assert decoded.returncode == 0 and decoded.stdout == text.stdout, decoded.stderr


def test_stream_prints_the_same_text(checkpoint):
    """--stream prints what the plain run prints, sampled alike; with a tokenizer, the text of all the tokens
    (decoded token by token, the word-level tokenizer's spaces between tokens were lost: 'w3w3w3')."""
    args = (checkpoint, "--prompt", "w1 w2", "--max-new-tokens", "4", "--temperature", "0.9", "--seed", "3",
            "--stop")
    plain, streamed = _main(*args), _main(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout and len(plain.stdout.split()) == 4, (plain.stdout, streamed.stdout)


def test_generate_from_a_training_run(tmp_path):
    """experiments.train writes checkpoints; experiments.generate continues from the run directory with the
    restored model (compared with load_trained_model + greedy generation in this process), here with its
    parameters split over --mesh tensor=2 on two fake CPU devices (the run's mesh.rules)."""
    import os

    import numpy as np

    from experiments.train import load_trained_model, main as train_main
    from runtime.generation import generate

    out = tmp_path / "run"  # trained in this process (its command line runs in a process of its own in test_train)
    assert train_main(["tiny_falcon_mamba", "steps=3", "checkpoint_every=3", "log_every=1", "model.num_hidden_layers=1",
                       "data.seq_len=16", "data.batch_size=4", f"output_dir={out}"]) == 0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = _run(out, "--ids", "5,6,7", "--max-new-tokens", "4", "--stop", "--mesh", "tensor=2", env=env)
    assert result.returncode == 0, result.stderr
    assert "loaded checkpoint step 3" in result.stderr
    assert "[parameters split over the mesh data=1, fsdp=1, tensor=2]" in result.stderr
    model, step = load_trained_model(out)
    assert step == 3
    expected = generate(model, np.array([[5, 6, 7]]), max_new_tokens=4, temperature=0).row(0)
    assert [int(t) for t in result.stdout.split()] == expected
    bf16, _ = load_trained_model(out, compute_dtype="bfloat16")  # what --compute-dtype passes for a run
    assert bf16.config.compute_dtype == "bfloat16" and model.config.compute_dtype == "float32"
    np.testing.assert_array_equal(bf16.embeddings.embedding[...], model.embeddings.embedding[...])
    # resuming with another data stream would continue the checkpoint on other data: refused before any step
    from configs import load_config
    from configs.schema import ConfigError
    from experiments.train import train

    with pytest.raises(ConfigError, match="config field 'seed': resuming"):
        train(load_config("tiny_falcon_mamba", ["steps=4", "seed=5", "model.num_hidden_layers=1", "data.seq_len=16",
                                                "data.batch_size=4", f"output_dir={out}"]))
    assert "seed: 0" in (out / "config.yaml").read_text()  # the run's record is kept
    # a step that is not there, and (config.yaml gone) a model of another size: named, not Orbax's FileNotFound /
    # "Requested shape ... is not compatible" without the parameter
    with pytest.raises(ConfigError, match=r"step: expected one of the checkpoints in .*\[3\], got 7"):
        load_trained_model(out, step=7)
    result = _main(out, "--ids", "5", "--step", "7")
    assert result.returncode == 1 and result.stderr.startswith("error: --step: expected one of the checkpoints"), \
        result.stderr
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint 3 in .*: parameter 'embeddings.embedding' has shape "
                                          r"\(256, 64\), the config needs shape \(256, 32\)"):
        train(load_config("tiny_falcon_mamba", ["steps=4", "model.num_hidden_layers=1", "model.hidden_size=32",
                                                "data.seq_len=16", "data.batch_size=4", f"output_dir={out}"]))
    with pytest.raises(ConfigError, match=r"parameter 'layers.1.mixer.A_log' has no such parameter, the config "
                                          r"needs shape"):
        train(load_config("tiny_falcon_mamba", ["steps=4", "model.num_hidden_layers=2", "data.seq_len=16",
                                                "data.batch_size=4", f"output_dir={out}"]))


def test_an_eos_id_past_the_vocabulary_needs_stop(tmp_path, checkpoint):
    """config.json's eos_token_id is the default stop token; one past the vocabulary (transformers accepts it) is
    named with the way out, --stop."""
    import json
    import shutil

    path = tmp_path / "eos"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 45}))
    (path / "generation_config.json").unlink(missing_ok=True)  # transformers wrote one (eos 39), which comes first
    result = _main(path, "--ids", "1,2", "--max-new-tokens", "2")
    assert result.returncode == 1 and "eos_token_id 45 is not below its vocab_size (40): pass --stop" in \
        result.stderr, result.stderr
    assert _main(path, "--ids", "1,2", "--max-new-tokens", "2", "--stop").returncode == 0


def test_default_stop_tokens_follow_generation_config_json(tmp_path):
    """transformers' generate stops on generation_config.json's eos_token_id (instruct models list their end of
    turn there); only config.json's was read. A training run reads its init_from's."""
    from configs.schema import ConfigError
    from experiments.generate import default_stop_tokens

    assert default_stop_tokens(str(tmp_path), (3, 4)) == ([3, 4], "the model's eos_token_id (3, 4)")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [11, 12], "do_sample": true}')
    assert default_stop_tokens(str(tmp_path), 3)[0] == [11, 12]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"init_from: {tmp_path}\n")
    assert default_stop_tokens(str(tmp_path / "run"), 3)[0] == [11, 12]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(ConfigError, match=r"eos_token_id of '.*generation_config.json': expected None, a token id "
                                          r"or a list of them, got '</s>'"):
        default_stop_tokens(str(tmp_path), 3)


@pytest.mark.parametrize("args, message", [
    (["--ids", "99999999999"], r"--ids: expected token ids, integers in \[0, 2\*\*31\) \(int32\), got '99999999999'"),
    (["--ids", "1,-1"], r"--ids: expected token ids, integers in \[0, 2\*\*31\) \(int32\), got '-1'"),
    (["--ids", "1,x"], r"--ids: expected token ids, integers in \[0, 2\*\*31\) \(int32\), got 'x'"),
    (["--ids", " "], r"--ids: expected at least one token id, got ' '"),
    (["--ids", "1", "--stop", "-1"], r"--stop: expected token ids, integers in \[0, 2\*\*31\) \(int32\), got -1"),
    (["--ids", "1", "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer, got 0"),
    (["--ids", "1", "--temperature", "-1"], "--temperature: expected a finite number >= 0, got -1.0"),
    (["--ids", "1", "--top-p", "1.5"], r"--top-p: expected None or a number in \(0, 1\], got 1.5"),
    (["--ids", "1", "--chunk-size", "0"], "--chunk-size: expected a positive integer, got 0"),
    (["--ids", "1", "--seed", str(2**40)], r"--seed: expected an integer in \[-2\*\*31, 2\*\*32\)"),
    (["--ids", "1", "--step", "2"], "--step: expected only with a training run's output_dir .* has no config.yaml"),
    (["--prompt", "w1", "--tokenizer", "nope.json"], "--tokenizer: '.*nope.json' does not exist"),
    (["--prompt", "w1", "--tokenizer", "config.json"], "--tokenizer: expected a tokenizer.json of the tokenizers "
                                                       "package, got '.*config.json': "),
    (["--prompt", ""], "--prompt: expected text of at least one token, got ''"),
    (["--ids", "1", "--mesh", "tensr=2"], "--mesh: expected AXIS=N items with AXIS one of data, fsdp, tensor, each "
                                          "once, got 'tensr=2'"),
    (["--ids", "1", "--mesh", "tensor=2,tensor=1"], "--mesh: expected .* each once, got 'tensor' twice"),
    (["--ids", "1", "--mesh", "tensor=x"], "--mesh: expected tensor=N with N a positive integer or -1, got 'tensor=x'"),
    (["--ids", "1", "--mesh", "fsdp=0"], "--mesh fsdp=0: config field 'fsdp': expected a positive integer or -1"),
    (["--ids", "1", "--mesh", "tensor=2"], r"--mesh tensor=2: mesh.data=-1: the other axes \(data=-1 x fsdp=1 x "
                                           r"tensor=2\) use 2 devices, which does not divide the 1 devices"),
])
def test_bad_arguments_are_one_error_line_before_loading(tmp_path, monkeypatch, args, message):
    """A bad flag is an "error: ..." line (exit status 1), not a traceback, and is found before the model is
    loaded (--ids was parsed after loading; 99999999999 was NumPy's OverflowError)."""
    from experiments import generate

    _word_level_tokenizer(tmp_path, 40)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        generate.main([str(tmp_path), *args])


def test_a_mesh_axis_of_minus_one_takes_every_device():
    """--mesh tensor=-1 (N "a positive integer or -1") is tensor over every device, not the MeshConfig default data=-1
    beside it (which refused it: "at most one mesh axis of size -1"); an unnamed data is -1 only where no axis is."""
    from experiments.cli import mesh_description, parse_mesh

    for text, sizes in (("tensor=-1", (1, 1, -1)), ("fsdp=-1", (1, -1, 1)), ("tensor=1", (-1, 1, 1)),
                        ("data=-1,tensor=1", (-1, 1, 1))):
        mesh = parse_mesh("--mesh", text)
        assert (mesh.data, mesh.fsdp, mesh.tensor) == sizes, text
        assert mesh_description(mesh) == "data=1, fsdp=1, tensor=1"  # this process's one device
    with pytest.raises(SystemExit, match="^error: --mesh data=-1,tensor=-1: .*at most one mesh axis of size -1"):
        parse_mesh("--mesh", "data=-1,tensor=-1")


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,40"], r"--ids: expected token ids below the model's vocab_size \(40\), got 40"),  # a traceback
    (["--ids", "1", "--stop", "3", "40"], r"--stop: expected token ids below the model's vocab_size \(40\), got 40"),
])
def test_ids_past_the_vocabulary_are_one_error_line(checkpoint, args, message):
    from experiments.generate import main

    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        main([str(checkpoint), *args])



def test_a_max_new_tokens_too_big_for_the_device_is_one_error_line(checkpoint, monkeypatch):
    """A --max-new-tokens whose KV cache (Falcon) or generated tokens (Falcon Mamba, whose state does not grow)
    cannot fit in the device's memory is named with the bytes (it was an XLA out-of-memory error naming nothing)."""
    from experiments.generate import main
    from runtime import generation

    monkeypatch.setattr(generation, "device_memory", lambda: (2**30, "a test's 1 GiB"))
    with pytest.raises(SystemExit, match=r"^error: --max-new-tokens: expected at most \d+ \(what fits in the "
                                         r"1073741824 bytes \(1\.0 GiB\) available: a test's 1 GiB\), got 2147483647, "
                                         r"which needs at least \d+ bytes"):
        main([str(checkpoint), "--ids", "1,2", "--max-new-tokens", str(2**31 - 1), "--stop"])

MESH_CHECK = r"""
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

import ssm
import transformer
from experiments.generate import main
from runtime import generation
from runtime.generation import generate

falcon, mamba, odd, *args = sys.argv[1:]
main([falcon, *args])  # --ids 1,2,3 --max-new-tokens 8 --temperature 1 --seed 3 --stop --mesh tensor=2
try:  # a vocabulary of 41 rows does not split in two
    main([odd, *args])
except SystemExit as err:
    print("odd:", err, file=sys.stderr)
one_device = generate(transformer.from_pretrained(falcon), np.array([[1, 2, 3]]), max_new_tokens=8, temperature=1,
                      seed=3)
print("one device:", " ".join(map(str, one_device.row(0))), file=sys.stderr)
mesh = jax.make_mesh((2,), ("tensor",))  # jax's default Explicit axes (from_pretrained puts them on Auto ones)
for family, path in ((transformer, falcon), (ssm, mamba)):
    split, whole = family.from_pretrained(path, mesh=mesh), family.from_pretrained(path)
    state = split.init_state(2, max_len=12)
    print("specs", [tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state.layers[0])], file=sys.stderr)
    if family is ssm:  # (Falcon's: the command line's tokens above, against one device's)
        prompts = np.array([[1, 2, 3], [4, 5, 6]])
        same = [generate(model, prompts, max_new_tokens=6, temperature=1, seed=4).tokens.tolist()
                for model in (split, whole)]
        print("same tokens", same[0] == same[1] and len(set(np.ravel(same[0]))) > 1, file=sys.stderr)
    # the memory check counts a device's shard: the state split in two, the (batch,) lengths whole on each device
    halves = generation._state_bytes(split, 2, 12) - 8 == (generation._state_bytes(whole, 2, 12) - 8) // 2
    print("a device's bytes", halves, file=sys.stderr)
    # a state made on one device stepped on the mesh, and the other way round: moved there (jit refused it)
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    logits = [b.step(np.array([7, 8]), a.prefill(prompts, a.init_state(2, max_len=12))[1])[0]
              for a, b in ((whole, split), (split, whole), (whole, whole))]
    print("a state moved across", all(np.allclose(x, logits[2], rtol=0, atol=1e-5) for x in logits[:2]),
          file=sys.stderr)
    # one on the same devices in another order (made by the model loaded on another mesh of them): jit refused it
    reverse = Mesh(np.array(jax.devices()[::-1]), ("tensor",))
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(reverse, x.sharding.spec)),
                         split.prefill(prompts, split.init_state(2, max_len=12))[1])
    print("another device order", np.allclose(split.step(np.array([7, 8]), state)[0], logits[2], rtol=0, atol=1e-5),
          file=sys.stderr)
# set to the Pallas scan (its interpreter here), each device scans its own half of d_inner inside shard_map (traced
# without the mesh, the kernel ran on every device with its inputs gathered whole), with one device's logits
import ssm.scan
widths, kernel = [], ssm.scan.selective_scan_pallas
ssm.scan.selective_scan_pallas = lambda u, *rest, **named: widths.append(u.shape[2]) or kernel(u, *rest, **named)
pallas = ssm.from_pretrained(mamba, mesh=mesh, scan_impl="pallas")
logits = [model.prefill(prompts, model.init_state(2))[0] for model in (pallas, whole)]
print("pallas channels", sorted(set(widths)), np.allclose(*logits, rtol=0, atol=1e-5), file=sys.stderr)
ssm.scan.selective_scan_pallas = kernel
# rules splitting d_state, not d_inner: the SSM state split as A_log (d_inner, d_state) is, as prefill leaves it
d_state = ssm.from_pretrained(mamba, mesh=mesh, rules={"d_inner": None, "d_state": "tensor"})
for state in (d_state.init_state(1), d_state.prefill(np.array([[1, 2, 3]]), d_state.init_state(1))[1]):
    print("d_state shards", [leaf.sharding.shard_shape(leaf.shape) for leaf in jax.tree.leaves(state.layers[0])],
          file=sys.stderr)
# rules splitting d_inner over fsdp: the state's rows are split over the batch axes d_inner leaves free (fsdp twice
# in one spec was a DuplicateSpecError)
fsdp = ssm.from_pretrained(mamba, mesh=jax.make_mesh((2,), ("fsdp",)), rules={"embed": None, "d_inner": "fsdp"})
print("d_inner over fsdp", [tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(fsdp.init_state(2))],
      file=sys.stderr)
# on a data axis the rows are split: the inputs, the state and so the logits; the scores those of one device
rows = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
for family, path in ((transformer, falcon), (ssm, mamba)):
    split, whole = family.from_pretrained(path, mesh=jax.make_mesh((2,), ("data",))), family.from_pretrained(path)
    state, logits = split.init_state(2, max_len=6), split(rows)
    print("rows split", {tuple(leaf.sharding.spec)[:1] for leaf in jax.tree.leaves(state)},
          tuple(logits.sharding.spec)[:1], np.allclose(logits, whole(rows), rtol=0, atol=1e-5), file=sys.stderr)
# loaded with rules whose batch is fsdp alone, the rows stay whole on a data axis: the loading rules', not the default's
by_rules = ssm.from_pretrained(mamba, mesh=jax.make_mesh((2,), ("data",)), rules={"batch": "fsdp"})
print("rows by the rules", {tuple(leaf.sharding.spec)[:1] for leaf in jax.tree.leaves(by_rules.init_state(2))},
      np.allclose(by_rules(rows), whole(rows), rtol=0, atol=1e-5), file=sys.stderr)
"""


def test_mesh_splits_the_parameters_and_the_state_and_samples_the_tokens_of_one_device(tmp_path):
    """On two (fake CPU) devices: --mesh tensor=2 splits a grouped-KV Falcon's parameters over tensor and samples
    the tokens of one device; from_pretrained(mesh=...) with a jax.make_mesh mesh does the same for both families,
    and init_state makes the state split like the parameters (kv heads; Falcon Mamba's d_inner), not whole on one
    device; on a data axis the rows of the inputs and the state are split (data-parallel inference); a state made
    on one device is moved onto the mesh (and back). A training run's parameters: test_generate_from_a_training_run.
    """
    import os

    falcon, mamba, odd = tmp_path / "falcon", tmp_path / "mamba", tmp_path / "odd"
    for path, vocab_size in ((falcon, 40), (odd, 41)):
        build_and_save(FalconConfig, FalconForCausalLM, path, vocab_size=vocab_size, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                       multi_query=False)
    build_and_save(FalconMambaConfig, FalconMambaForCausalLM, mamba, vocab_size=40, hidden_size=16,
                   num_hidden_layers=1, state_size=4, expand=2)
    args = ["--ids", "1,2,3", "--max-new-tokens", "8", "--temperature", "1", "--seed", "3", "--stop"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    split = subprocess.run([sys.executable, "-c", MESH_CHECK, falcon, mamba, odd, *args, "--mesh", "tensor=2"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert split.returncode == 0, split.stderr
    assert "[parameters split over the mesh data=1, fsdp=1, tensor=2]" in split.stderr
    assert f"one device: {split.stdout.strip()}\n" in split.stderr and len(set(split.stdout.split())) > 1, \
        (split.stdout, split.stderr)
    falcon_kv = "(None, None, 'tensor', None)"
    assert f"specs [{falcon_kv}, {falcon_kv}]" in split.stderr, split.stderr
    assert "specs [(None, None, 'tensor'), (None, 'tensor', None)]" in split.stderr, split.stderr  # conv, ssm
    assert "pallas channels [16] True" in split.stderr, split.stderr  # d_inner 32 over tensor=2
    assert split.stderr.count("same tokens True") == 1, split.stderr
    assert split.stderr.count("a device's bytes True") == 2, split.stderr
    assert split.stderr.count("a state moved across True") == 2, split.stderr
    assert split.stderr.count("another device order True") == 2, split.stderr
    assert split.stderr.count("d_state shards [(1, 3, 32), (1, 32, 2)]") == 2, split.stderr  # conv whole
    assert split.stderr.count("rows split {('data',)} ('data',) True") == 2, split.stderr
    assert "rows by the rules {(None,)} True" in split.stderr, split.stderr
    assert "d_inner over fsdp [(None, None, 'fsdp'), (None, 'fsdp', None), ('fsdp',)]" in split.stderr, split.stderr
    assert ("odd: error: --mesh tensor=2: tensor 'transformer.word_embeddings.weight' (parameter "
            "'word_embeddings.embedding'): dimension 0 ('vocab') has size 41, which is not divisible by mesh axes "
            "tensor=2") in split.stderr, split.stderr


def test_incremental_text_joins_to_the_whole_decoding_in_linear_work():
    """--stream's pieces, with a byte-level BPE tokenizer whose tokens split multi-byte characters: they join to
    the decoding of all tokens, no piece ends inside a character, and each step decodes a few tokens (decoding
    all tokens so far at every step was quadratic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from experiments.generate import incremental_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["hello world café naïve", "the cat sat"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    ids = tokenizer.encode("café naïve 日本語 hello world 🙂 x " * 20).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case: tokens that are parts of a character
    decoded = []

    def decode(tokens):
        decoded.append(len(tokens))
        return tokenizer.decode(tokens)

    pieces = list(incremental_text(decode, iter(ids)))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces) and "日" in pieces and "🙂" in pieces
    assert max(decoded) <= 8 and sum(decoded) < 8 * len(ids), (max(decoded), sum(decoded), len(ids))


def test_incremental_text_flushes_a_character_cut_by_the_last_token():
    """A generation that stops inside a multi-byte character (max_new_tokens reached): the pieces still join to
    the decoding of all tokens (the replacement character the cut bytes decode to comes out at the end)."""
    from experiments.generate import incremental_text

    decode = lambda tokens: bytes(tokens).decode("utf-8", errors="replace")  # noqa: E731  one token per byte
    tokens = list("ab 日本".encode())[:-1]  # the last character's final byte is missing
    pieces = list(incremental_text(decode, iter(tokens)))
    assert "".join(pieces) == decode(tokens) and pieces[-1].endswith("\ufffd")


def test_a_run_whose_config_yaml_is_not_yaml_is_one_error_line_with_a_text_prompt(tmp_path, monkeypatch):
    """The default tokenizer of a training run is read from its config.yaml's init_from: a config.yaml that is not
    YAML (a run's file cut short) was yaml's ParserError traceback, before the model's own load could name it."""
    from experiments import generate

    (tmp_path / "config.yaml").write_text("model: [\n")
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit, match=r"^error: preset '.*config.yaml': expected YAML, got "):
        generate.main([str(tmp_path), "--prompt", "w1"])


def test_a_path_that_is_no_model_is_named(tmp_path):
    """A missing path read as a missing config.json inside it ("config.json not found at '.../config.json'")."""
    from experiments import generate

    with pytest.raises(SystemExit, match=r"^error: path: expected a training run's output_dir \(config.yaml\) or a "
                                         r"local Hugging Face directory \(config.json\), got '.*nowhere', which does "
                                         r"not exist$"):
        generate.main([str(tmp_path / "nowhere"), "--ids", "1"])
