"""Fine-tuning: a run with init_from=DIR starts from a Hugging Face checkpoint saved by transformers. Its first
step's loss is the PyTorch model's loss on the same batch; a run whose model config is another model than the
checkpoint's is refused naming every differing field; the position-encoding fields that context-extension
fine-tuning changes may differ, and then the run computes with the run's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from configs import load_config
from configs.hf import model_config_to_hf
from configs.schema import ConfigError
from experiments.data import batch_at
from experiments.train import train
from tests.hf_models import build_and_save

CLASSES = {"tiny_falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
           "tiny_falcon": (transformers.FalconConfig, transformers.FalconForCausalLM)}


def run_config(preset, output_dir, *overrides):
    return load_config(preset, [f"output_dir={output_dir}", "steps=1", "data.task=bytes", "data.seq_len=16",
                                "data.batch_size=4", "model.num_hidden_layers=1", *overrides])


def save_checkpoint(preset, path):
    """A perturbed transformers model of the preset's (one-layer) architecture, saved to ``path``."""
    hf = model_config_to_hf(run_config(preset, path).model)
    return build_and_save(*CLASSES[preset], path, seed=4,
                          **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})


def torch_loss(model, run) -> float:
    """The trainer's loss of step 1 (the masked mean cross entropy of its batch), computed by ``model``."""
    batch = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in
             batch_at(run.data, run.model.vocab_size, run.seed, 0).items()}
    with torch.no_grad():
        logits = model(torch.tensor(batch["inputs"], dtype=torch.long)).logits.double()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(batch["targets"]).flatten().long(),
                                           reduction="none").numpy()
    mask = batch["mask"].reshape(-1)
    return float(np.sum(ce * mask) / max(np.sum(mask), 1.0))


@pytest.mark.parametrize("preset", sorted(CLASSES))
def test_first_step_loss_is_the_checkpoints(preset, tmp_path):
    torch_model = save_checkpoint(preset, tmp_path / "hf")
    run = run_config(preset, tmp_path / "run", f"init_from={tmp_path / 'hf'}")
    rows = train(run)
    np.testing.assert_allclose(rows[0]["loss"], torch_loss(torch_model, run), rtol=1e-5)


def test_another_architecture_is_refused_naming_every_field(tmp_path):
    save_checkpoint("tiny_falcon_mamba", tmp_path / "hf")
    run = run_config("tiny_falcon_mamba", tmp_path / "run", f"init_from={tmp_path / 'hf'}",
                     "model.layer_norm_epsilon=0.001", "model.state_size=8", "model.compute_dtype=bfloat16")
    with pytest.raises(ConfigError) as err:
        train(run)
    assert str(err.value) == (
        f"config field 'init_from': {str(tmp_path / 'hf')!r} is another model than the run's: "
        "model.state_size=8, config.json has 16; model.layer_norm_epsilon=0.001, config.json has 1e-05 "
        "(set these to config.json's values)")
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="^config field 'init_from': config.json not found at"):
        train(run_config("tiny_falcon_mamba", tmp_path / "run", f"init_from={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="holds a 'falcon_mamba' model, the run's model.family is 'falcon'"):
        train(run_config("tiny_falcon", tmp_path / "run", f"init_from={tmp_path / 'hf'}"))
    assert not (tmp_path / "run").exists()  # the refused runs left an empty output_dir/checkpoints


def test_a_resume_needs_the_runs_init_from(tmp_path):
    """A resume never reads init_from: one added to a randomly initialised run was ignored, yet config.yaml then
    recorded it (and export and generate took its tokenizer)."""
    train(run_config("tiny_falcon_mamba", tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^config field 'init_from': resuming .* needs the value its checkpoints "
                                          r"were trained with, ''; got '.*hf'"):
        train(run_config("tiny_falcon_mamba", tmp_path / "run", "steps=2", f"init_from={tmp_path / 'hf'}"))
    assert load_config(tmp_path / "run" / "config.yaml", []).init_from == ""


def test_context_extension_fields_may_differ_and_take_the_runs_values(tmp_path, capsys):
    torch_model = save_checkpoint("tiny_falcon", tmp_path / "hf")
    run = run_config("tiny_falcon", tmp_path / "run", f"init_from={tmp_path / 'hf'}", "model.rope_theta=500.0",
                     "model.rope_scaling_type=linear", "model.rope_scaling_factor=4.0")
    rows = train(run)
    assert "init_from: model.rope_theta=500.0 (config.json has another value)" in capsys.readouterr().out
    extended = transformers.FalconForCausalLM(transformers.FalconConfig(**{
        k: v for k, v in model_config_to_hf(run.model).items() if k not in ("architectures", "model_type")}))
    extended.load_state_dict(torch_model.state_dict())
    np.testing.assert_allclose(rows[0]["loss"], torch_loss(extended.eval(), run), rtol=1e-5)
    # with the checkpoint's RoPE the loss is another (measured 6e-4 away): 10x the tolerance above
    assert abs(torch_loss(torch_model, run) - rows[0]["loss"]) > 10 * 1e-5 * rows[0]["loss"]


def test_a_fine_tuned_run_exports_to_a_directory_transformers_loads(tmp_path, capsys, monkeypatch):
    """init_from -> train -> experiments.export: transformers gives the run's logits, the tokenizer comes along, and
    generate's default tokenizer for the run is init_from's, from any working directory (config.yaml records
    init_from given relative as an absolute path)."""
    from tokenizers import Tokenizer, models

    from experiments.export import main as export_main
    from experiments.generate import default_tokenizer
    from experiments.train import check_resume, load_trained_model

    save_checkpoint("tiny_falcon_mamba", tmp_path / "hf")
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "hf" / "tokenizer.json"))
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    train(run_config("tiny_falcon_mamba", run_dir, "init_from=hf", "steps=2",
                     "optim.warmup_steps=0", "optim.learning_rate=0.01"))
    monkeypatch.chdir(run_dir)
    recorded = load_config(run_dir / "config.yaml", [])
    assert recorded.init_from == str(tmp_path / "hf") and recorded.data.text_dir == ""  # "": the default corpus
    check_resume(recorded, run_config("tiny_falcon_mamba", run_dir, f"init_from={tmp_path / 'hf'}"), run_dir)
    with pytest.raises(ConfigError, match=f"^config field 'init_from': resuming .* needs the value its checkpoints "
                                          f"were trained with, '{tmp_path / 'hf'}'; got '{run_dir / 'hf'}'"):
        check_resume(recorded, run_config("tiny_falcon_mamba", run_dir, "init_from=hf"), run_dir)  # another hf/
    assert export_main([str(run_dir), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote checkpoint step 2 of {run_dir} to {tmp_path / 'out'} with "
                                               f"tokenizer.json from its init_from")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    ids = np.random.default_rng(1).integers(0, 256, (2, 24))
    ours = np.asarray(load_trained_model(run_dir)[0](ids))
    exported = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        theirs = exported(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    # trained: not the checkpoint it started from
    started = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert np.abs(started(torch.tensor(ids)).logits.numpy() - theirs).max() > 1e-2
    assert default_tokenizer(str(run_dir)) == tmp_path / "hf" / "tokenizer.json"

    capsys.readouterr()  # transformers' progress bars
    assert export_main([str(run_dir), str(run_dir)]) == 1
    assert capsys.readouterr().err == f"error: out_dir: expected another directory than the run's, got '{run_dir}'\n"
    # into init_from: the pretrained weights were overwritten, then copying the tokenizer onto itself raised
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert export_main([str(run_dir), str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == (f"error: out_dir: expected another directory than the run's init_from (the "
                                       f"checkpoint it started from), got '{tmp_path / 'hf'}'\n")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights
    assert export_main([str(tmp_path / "hf"), str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == (f"error: run_dir: {str(tmp_path / 'hf')!r} has no config.yaml (not a training "
                                       f"run)\n")  # export's argument: run_dir, not output_dir
    assert export_main([str(run_dir), str(tmp_path / "x"), "--step", "7"]) == 1  # named by the flag, not step:
    assert capsys.readouterr().err.startswith("error: --step: expected one of the checkpoints in")


def test_export_into_a_file_is_one_error_line(tmp_path, capsys, monkeypatch):
    """out_dir an existing file is refused before the model is loaded; an out_dir that cannot be made (under a file)
    is an error line, not a traceback."""
    from configs import dump_config
    from experiments import export
    from experiments.models import build_model

    run = run_config("tiny_falcon_mamba", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(run))
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(export, "load_trained_model", lambda *a: pytest.fail("loaded the model"))
    assert export.main([str(tmp_path / "run"), str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err == (f"error: out_dir: expected a directory (new or existing), got "
                                       f"'{tmp_path / 'file'}', which is a file\n")
    monkeypatch.setattr(export, "load_trained_model", lambda *a: (build_model(run.model), 1))
    assert export.main([str(tmp_path / "run"), str(tmp_path / "file" / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"error: out_dir: expected a directory this process can create and "
                                              f"write, got '{tmp_path / 'file' / 'out'}' ([Errno 20] Not a directory:")
