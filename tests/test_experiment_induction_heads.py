"""A tiny end-to-end run of experiments.induction_heads' main() (python -m experiments.induction_heads): trains both
models a few steps, evaluates at tiny lengths, and writes summary.json in exactly the documented form."""

from __future__ import annotations

import json

import numpy as np

from experiments import induction_heads
from experiments.data import TRIGGER_TOKEN

# --eval-batch 3: every point one prefill call, one compile a shape (2 left a call of one row at 8 and 16 tokens, a
# compile each; evaluate()'s batches are tested in test_evaluate_margins_and_misses_match_a_full_forward)
TINY = ["--steps", "3", "--curriculum", "8:1", "--train-length", "16", "--batch-size", "4", "--min-log2", "3",
        "--max-log2", "6",
        "--falcon-max-log2", "5", "--eval-sequences", "3", "--eval-tokens", "64", "--falcon-eval-tokens", "64",
        "--min-sequences", "2", "--eval-batch", "3", "--chunk-size", "16", "--falcon-chunk-size", "8",
        "--set", "model.num_hidden_layers=1"]


def test_tiny_run_writes_the_summary_table_and_plot(tmp_path, capsys):
    # in this process: a process of its own spent its first seconds importing what this one has imported
    out = tmp_path / "ih"
    induction_heads.main(["--output-dir", str(out), *TINY])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["train_length", "falcon_mamba", "falcon"] and summary["train_length"] == 16
    assert list(summary["falcon_mamba"]) == ["8", "16", "32", "64"] and list(summary["falcon"]) == ["8", "16", "32"]
    for name in ("falcon_mamba", "falcon"):
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in summary[name].values())
    details = json.loads((out / "details.json").read_text())
    # 3 sequences while the 64-token budget allows, never fewer than 2
    assert [p["sequences"] for p in details["points"]["falcon_mamba"].values()] == [3, 3, 2, 2]
    for name in ("falcon_mamba", "falcon"):
        run = details["runs"][name]
        assert run["steps"] == 3 and run["length_curriculum"] == [[8, 1]] and run["train_length"] == 16
    rows = [json.loads(line) for line in (out / "falcon_mamba" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["seq_len"] == 16
    table = (out / "summary.md").read_text()
    assert "| 64 | 6 |" in table and "| Falcon Mamba |" in table and table.splitlines()[-1] in printed
    assert "| Falcon Mamba | sequences | Falcon (RoPE attention) | sequences |" in table
    assert details["runs"]["falcon"]["label"] == "Falcon (RoPE attention)"
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "falcon_mamba" / "checkpoints").is_dir()


def test_analysis_helpers_on_a_random_model():
    from configs import load_config
    from experiments.models import build_model

    model = build_model(load_config("induction_heads_falcon_mamba").model, seed=0)
    ids, answers = induction_heads.induction_batch(16, 40, 2, seed=0, index=0)
    assert ids.shape == (2, 40) and (ids[:, -1] == TRIGGER_TOKEN).all() and answers.shape == (2,)
    dt = induction_heads.mixer_dt(model, ids)
    assert dt.shape == (2, 2, 40, 128) and (dt > 0).all()
    norms = induction_heads.ssm_state_norms(model, ids, chunk_size=16)
    assert norms["positions"].tolist() == [16, 32, 40] and norms["norms"].shape == (2, 3)
    # the last norm is the norm of the state of one full prefill
    _, state = model.prefill(ids, model.init_state(2))
    expected = np.mean(np.linalg.norm(np.asarray(state.layers[1].ssm).reshape(2, -1), axis=-1))
    np.testing.assert_allclose(norms["norms"][1, -1], expected, rtol=1e-5)


def test_evaluate_margins_and_misses_match_a_full_forward():
    from configs import load_config
    from experiments.evaluate import EVAL_SEED_OFFSET
    from experiments.models import build_model

    model = build_model(load_config("induction_heads_falcon_mamba").model, seed=0)  # untrained: many misses
    length, n = 40, 12
    point = induction_heads.evaluate(model, length, n, seed=5, eval_batch=5, chunk_size=16, kv_cache=False)
    logits, answers, distance = [], [], []
    for index, rows in enumerate((5, 5, 2)):
        ids, ans = induction_heads.induction_batch(16, length, rows, 5 + EVAL_SEED_OFFSET + length, index)
        logits.append(np.asarray(model(ids))[:, -1])
        answers.append(ans)
        distance.append(length - np.argmax(ids == TRIGGER_TOKEN, axis=1))
    logits, answers, distance = np.concatenate(logits), np.concatenate(answers), np.concatenate(distance)
    right = logits[np.arange(n), answers]
    others = logits.copy()
    others[np.arange(n), answers] = -np.inf
    margin = right - others.max(-1)
    assert point["misses"] == int(np.sum(margin <= 0)) > 0
    assert point["accuracy"] == np.mean(np.argmax(logits, -1) == answers)
    np.testing.assert_allclose(point["min_margin"], margin.min(), atol=2e-3)
    np.testing.assert_allclose(point["median_margin"], np.median(margin), atol=2e-3)
    farther = np.argsort(distance, kind="stable")[n // 2:]  # the 6 sequences whose trigger is farthest back
    assert np.all(distance[farther].min() >= np.delete(distance, farther))
    assert point["misses_farther_half"] == int(np.sum(margin[farther] <= 0))


def test_fewer_steps_scale_the_presets_step_counts(tmp_path):
    """--steps below the preset's curriculum (2000 steps of stages for Falcon Mamba) was a ConfigError traceback
    after nothing ran: the preset's stages, warm-up and decay now scale with the steps; an explicit --curriculum
    that does not fit is one 'error:' line before anything trains."""
    import pytest

    args = induction_heads.parse_args(["--steps", "20", "--output-dir", str(tmp_path)])
    run = induction_heads.run_config(args.falcon_mamba_preset, args, "falcon_mamba", args.steps)
    assert run.steps == 20 and run.data.length_curriculum == ((32, 6), (64, 6)) and run.optim.warmup_steps == 2
    falcon = induction_heads.run_config(args.falcon_preset, args, "falcon", 300)
    assert falcon.data.length_curriculum == ((64, 166),) and falcon.optim.warmup_steps == 100
    with pytest.raises(SystemExit, match=r"^error: config field 'data.length_curriculum': expected stages totalling "
                                         r"fewer than steps \(20\)"):
        induction_heads.main(["--steps", "20", "--curriculum", "32:30", "--output-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_evaluation_budgets_and_log2_range():
    """Each family reads its own token budget (the transformer's prefill is quadratic: it gets 2^16 tokens a point,
    not Falcon Mamba's 2^22), and a single evaluation length (min = max) is accepted."""
    import pytest

    args = induction_heads.parse_args([])
    assert induction_heads.sequences_at(1 << 12, args, "falcon_mamba") == 64  # 2^22 / 2^12 = 1024, capped at 64
    assert induction_heads.sequences_at(1 << 12, args, "falcon") == 16  # 2^16 / 2^12
    assert induction_heads.sequences_at(1 << 20, args, "falcon_mamba") == 4  # 2^22 / 2^20
    assert induction_heads.sequences_at(1 << 20, args, "falcon") == 4  # min_sequences
    one = induction_heads.parse_args(["--min-log2", "6", "--max-log2", "6"])
    assert (one.min_log2, one.max_log2) == (6, 6)
    with pytest.raises(SystemExit):
        induction_heads.parse_args(["--min-log2", "7", "--max-log2", "6"])


def test_bad_curriculum_and_log2_range_are_argparse_errors(capsys):
    """--curriculum abc was a ValueError from int() naming no option; --falcon-max-log2 below --min-log2 left the
    transformer nothing to evaluate, silently."""
    import pytest

    assert induction_heads.parse_args(["--curriculum", "32:10,64:20"]).curriculum == [[32, 10], [64, 20]]
    assert induction_heads.parse_args(["--curriculum", "none"]).curriculum == []
    for bad in ("abc", "8:x", "", "8", "8:1:2", "8:1,"):
        with pytest.raises(SystemExit):
            induction_heads.parse_args(["--curriculum", bad])
        assert (f"error: argument --curriculum: expected LEN:STEPS,... (e.g. 32:1000,64:1000) or 'none', got {bad!r}"
                in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        induction_heads.parse_args(["--falcon-max-log2", "5"])
    assert "error: --falcon-max-log2: expected >= --min-log2 (6), got 5" in capsys.readouterr().err
    assert induction_heads.parse_args(["--falcon-max-log2", "6"]).falcon_max_log2 == 6
    assert induction_heads.parse_args(["--falcon-max-log2", "5", "--skip-falcon"]).skip_falcon  # no transformer


def test_steps_at_the_presets_warmup_and_decay_scale_too(tmp_path):
    """--steps equal to the preset's 100 warm-up steps takes a tenth of them as warm-up (warmup < steps); a
    decay (--set optim.decay_steps) longer than what is left after warm-up is cut to fit."""
    args = induction_heads.parse_args(["--output-dir", str(tmp_path)])
    run = induction_heads.run_config(args.falcon_preset, args, "falcon", 100)
    assert run.steps == 100 and run.optim.warmup_steps == 10
    args = induction_heads.parse_args(["--output-dir", str(tmp_path), "--set", "optim.decay_steps=2900"])
    run = induction_heads.run_config(args.falcon_mamba_preset, args, "falcon_mamba", 150)
    assert run.optim.warmup_steps == 100 and run.optim.decay_steps == 50


def test_a_preset_of_the_other_family_is_refused_before_training(tmp_path):
    import pytest

    # a Falcon preset given as the Falcon Mamba one trained, then failed with a traceback (init_state without a
    # KV cache length); a Falcon Mamba preset given as the Falcon one was trained and reported as "Falcon (RoPE)"
    for flag, preset, family, other in (("--falcon-mamba-preset", "tiny_falcon", "falcon_mamba", "falcon"),
                                        ("--falcon-preset", "tiny_falcon_mamba", "falcon", "falcon_mamba")):
        with pytest.raises(SystemExit, match=rf"^error: {flag}: expected a preset of model.family '{family}', got "
                                             rf"'{preset}' \(model.family '{other}'\)$"):
            induction_heads.main([*TINY, flag, preset, "--output-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_resumed_run_counts_only_the_steps_it_trains_and_a_refused_resume_is_an_error_line(tmp_path, monkeypatch):
    """A run resumed from its checkpoint at step 2 of 4 (a demo stopped by Ctrl-C, then rerun) trains 2 steps: its
    train_tokens_per_s counted all 4 steps' tokens over the 2 steps' time. A resume train() refuses (--steps below
    the checkpoint's) was a ConfigError traceback."""
    import types

    import jax.numpy as jnp
    import pytest

    from configs.schema import ConfigError
    from experiments.checkpointing import Checkpointer

    checkpointer = Checkpointer(tmp_path / "falcon_mamba" / "checkpoints", 3)
    checkpointer.save(2, {"x": jnp.zeros(2)}, {"step": 2})
    checkpointer.wait()
    checkpointer.close()
    clock = iter(range(100))  # every perf_counter() call one second later: training takes 1 s
    monkeypatch.setattr(induction_heads, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(induction_heads, "train", lambda run: [{"step": 4, "loss": 1.0}])
    monkeypatch.setattr(induction_heads, "load_trained_model", lambda output_dir: (None, 4))
    monkeypatch.setattr(induction_heads, "n_params", lambda model: 0)
    monkeypatch.setattr(induction_heads, "evaluate", lambda *a, **k: {
        "accuracy": 1.0, "sequences": 2, "seconds": 1.0, "tokens_per_s": 8, "min_margin": 1.0, "median_margin": 1.0,
        "misses_farther_half": 0, "misses": 0})
    argv = ["--output-dir", str(tmp_path), "--steps", "4", "--curriculum", "none", "--train-length", "16",
            "--batch-size", "4", "--min-log2", "3", "--max-log2", "3", "--skip-falcon", "--no-plot"]
    induction_heads.main(argv)
    run = json.loads((tmp_path / "details.json").read_text())["runs"]["falcon_mamba"]
    assert run["train_seconds"] == 1.0 and run["train_tokens_per_s"] == 2 * 4 * 16  # steps 2 and 3 of 4 x 16

    def refused(run):
        raise ConfigError("config field 'steps': expected at least 2")

    monkeypatch.setattr(induction_heads, "train", refused)
    with pytest.raises(SystemExit, match=r"^error: config field 'steps': expected at least 2$"):
        induction_heads.main(argv)


def _stub_training_and_evaluation(monkeypatch):
    """main() with train, the checkpoint load and evaluate stubbed: what it writes, in well under a second."""
    monkeypatch.setattr(induction_heads, "train", lambda run: [{"step": run.steps, "loss": 1.0}])
    monkeypatch.setattr(induction_heads, "load_trained_model", lambda output_dir: (None, 1))
    monkeypatch.setattr(induction_heads, "n_params", lambda model: 0)
    monkeypatch.setattr(induction_heads, "evaluate", lambda *a, **k: {
        "accuracy": 1.0, "sequences": 2, "seconds": 1.0, "tokens_per_s": 8, "min_margin": 1.0, "median_margin": 1.0,
        "misses_farther_half": 0, "misses": 0})


def test_the_summary_gives_the_length_trained(tmp_path, monkeypatch):
    """--set data.seq_len=32 trained both models at 32 while summary.json, summary.md and the plot said
    --train-length's 16."""
    _stub_training_and_evaluation(monkeypatch)
    induction_heads.main(["--output-dir", str(tmp_path), "--steps", "4", "--curriculum", "none", "--train-length", "16",
                          "--set", "data.seq_len=32", "--min-log2", "3", "--max-log2", "3", "--falcon-max-log2", "3",
                          "--no-plot"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    details = json.loads((tmp_path / "details.json").read_text())
    assert summary["train_length"] == details["train_length"] == 32
    assert [run["train_length"] for run in details["runs"].values()] == [32, 32]
    assert (tmp_path / "summary.md").read_text().startswith("# Induction heads (trained at length 32)\n")


def test_the_transformers_label_names_its_position_encoding(tmp_path, monkeypatch, capsys):
    """An ALiBi --falcon-preset was trained and reported as "Falcon (RoPE)" (the table; "Falcon (RoPE attention)"
    in the log and the plot)."""
    _stub_training_and_evaluation(monkeypatch)
    induction_heads.main(["--output-dir", str(tmp_path), "--steps", "4", "--curriculum", "none", "--train-length", "16",
                          "--falcon-preset", "tiny_falcon_alibi", "--min-log2", "3", "--max-log2", "3",
                          "--falcon-max-log2", "3", "--no-plot"])
    details = json.loads((tmp_path / "details.json").read_text())
    assert details["runs"]["falcon"]["label"] == "Falcon (ALiBi attention)"
    assert induction_heads.run_labels(details) == {"falcon_mamba": "Falcon Mamba", "falcon": "Falcon (ALiBi attention)"}
    table = (tmp_path / "summary.md").read_text()
    assert "| Falcon Mamba | sequences | Falcon (ALiBi attention) | sequences |" in table and "RoPE" not in table
    assert "== training Falcon (ALiBi attention): 4 steps" in capsys.readouterr().out
    assert induction_heads.run_labels({"runs": {}}) == {"falcon_mamba": "Falcon Mamba", "falcon": "Falcon"}


def test_a_few_steps_drop_the_presets_stages_that_do_not_fit_and_no_steps_is_an_argparse_error(tmp_path, monkeypatch,
                                                                                                capsys):
    """--steps 1 (and 2) failed with a ConfigError on data.length_curriculum [[32, 1], [64, 1]], stages the user
    never set (each of the preset's stages scaled to at least a step): the first stages that leave a step at the
    training length are kept. --steps 0 was a ConfigError naming the config field, -3 one naming warm-up."""
    import pytest

    args = induction_heads.parse_args(["--output-dir", str(tmp_path)])
    expected = {("falcon_mamba", 1): (), ("falcon_mamba", 2): ((32, 1),), ("falcon_mamba", 3): ((32, 1), (64, 1)),
                ("falcon", 1): (), ("falcon", 2): ((64, 1),)}
    for (name, steps), curriculum in expected.items():
        preset = args.falcon_mamba_preset if name == "falcon_mamba" else args.falcon_preset
        run = induction_heads.run_config(preset, args, name, steps)
        assert (run.steps, run.data.length_curriculum, run.optim.warmup_steps) == (steps, curriculum, 0)
    _stub_training_and_evaluation(monkeypatch)
    induction_heads.main(["--output-dir", str(tmp_path), "--steps", "1", "--min-log2", "3", "--max-log2", "3",
                          "--falcon-max-log2", "3", "--no-plot"])
    assert {run["length_curriculum"] == [] for run in json.loads((tmp_path / "details.json").read_text())["runs"]
            .values()} == {True}
    for flag, value in (("--steps", "0"), ("--steps", "-3"), ("--falcon-steps", "0")):
        with pytest.raises(SystemExit):
            induction_heads.parse_args([flag, value])
        assert f"error: {flag}: expected a positive integer, got {value}" in capsys.readouterr().err
