"""The config system: presets, overrides, key and value checks, HF config.json import and export."""

from __future__ import annotations

import json
import re

import pytest

import configs
from configs import ConfigError, FalconMambaConfig, load_config, load_model_config, model_config_from_hf


def test_every_preset_loads():
    names = configs.list_presets()
    assert {"falcon_mamba_7b", "tiny_falcon_mamba", "tiny_mamba"} <= set(names)
    for name in names:
        run = load_config(name)
        assert run.model.vocab_size > 0


def test_falcon_mamba_7b_preset_matches_published_config():
    cfg = load_model_config("falcon_mamba_7b")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.state_size, cfg.intermediate_size,
            cfg.conv_kernel, cfg.time_step_rank) == (65024, 4096, 64, 16, 8192, 4, 256)
    assert not cfg.use_bias and cfg.use_conv_bias and cfg.residual_in_fp32 and not cfg.tie_word_embeddings
    assert cfg.use_mixer_norms and cfg.mixer_rms_eps == 1e-6 and cfg.eos_token_id == cfg.pad_token_id == 11


def test_overrides_and_base_inheritance():
    run = load_config("tiny_mamba", ["model.hidden_size=96", "seed=7", "mesh.data=2", "model.mixer_rms_eps=1e-5"])
    assert run.model.hidden_size == 96 and run.seed == 7 and run.mesh.data == 2
    assert run.model.use_mixer_norms is False  # from tiny_mamba, over its base tiny_falcon_mamba
    assert run.model.mixer_rms_eps == 1e-5 and run.model.state_size == 16
    assert load_model_config("tiny_falcon_mamba", ["scan_impl=chunked"]).scan_impl == "chunked"


def test_override_values_are_yaml_1_2_scalars():
    """010 is ten and 1:30 a string (YAML 1.1, which yaml.safe_load reads, has octal and base-60 integers: 8 and
    90); a glob is a string (in YAML, *.py is an alias, a parse error); lists and mappings stay YAML."""
    run = load_config("tiny_falcon_mamba", ["seed=010", "steps=1_000", "data.text_glob=*.py",
                                            "mesh.rules.d_inner=[tensor]", "optim.clip_norm=0", "remat=full"])
    assert (run.seed, run.steps, run.data.text_glob, run.optim.clip_norm) == (10, 1000, "*.py", 0.0)
    assert run.mesh.rules["d_inner"] == ("tensor",) and run.remat == "full"
    with pytest.raises(ConfigError, match=r"'steps': expected an integer, got '1:30'"):
        load_config("tiny_falcon_mamba", ["steps=1:30"])
    with pytest.raises(ConfigError, match=r"override 'mesh.rules.d_inner=\[tensor': expected a YAML list"):
        load_config("tiny_falcon_mamba", ["mesh.rules.d_inner=[tensor"])


def test_preset_files_read_scalars_as_overrides_do(tmp_path):
    """A file's plain scalars are YAML 1.2's too: seed 010 was 8 in a file and 10 on the command line, 1:30 was 90,
    1e-3 a string and yes a boolean. dump_config quotes a string that would read back as a number."""
    (tmp_path / "run.yaml").write_text("base: tiny_falcon_mamba\nseed: 010\nsteps: 1_000\n"
                                       "optim:\n  learning_rate: 1e-3\ndata:\n  text_glob: 1:30\n")
    run = load_config(tmp_path / "run.yaml")
    assert (run.seed, run.steps, run.optim.learning_rate, run.data.text_glob) == (10, 1000, 1e-3, "1:30")
    assert run == load_config("tiny_falcon_mamba", ["seed=010", "steps=1_000", "optim.learning_rate=1e-3",
                                                       "data.text_glob=1:30"])
    (tmp_path / "bool.yaml").write_text("base: tiny_falcon_mamba\nmodel:\n  use_bias: yes\n")
    with pytest.raises(ConfigError, match=r"'model.use_bias': expected true or false, got 'yes'"):
        load_config(tmp_path / "bool.yaml")
    written = configs.replace(run, data=configs.replace(run.data, text_glob="1e3"), output_dir="-.5")
    (tmp_path / "config.yaml").write_text(configs.dump_config(written))
    assert load_config(tmp_path / "config.yaml") == written
    # mesh.rules' shared axis lists were written once as an anchor and then as aliases (*id001)
    assert "&id" not in (tmp_path / "config.yaml").read_text() and "*id" not in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", r"unknown config key 'model.hiden_size'; did you mean 'hidden_size'"),
    ("sed=1", r"unknown config key 'sed'; did you mean 'seed'"),
    ("mesh.tensr=2", r"unknown config key 'mesh.tensr'; did you mean 'tensor'"),
    ("model.scan_impl=fast",
     r"'model.scan_impl': expected one of \['auto', 'reference', 'sequential', 'chunked', 'pallas'\], got 'fast'"),
    ("model.hidden_size=-4", r"'model.hidden_size': expected a positive integer, got -4"),
    ("model.hidden_size=2.5", r"'model.hidden_size': expected an integer, got 2.5"),
    ("model.use_bias=maybe", r"'model.use_bias': expected true or false, got 'maybe'"),
    ("model.compute_dtype=float16", r"'model.compute_dtype': expected one of \['float32', 'bfloat16'\]"),
    ("model.family=llama", r"model.family: expected one of \['falcon', 'falcon_mamba'\], got 'llama'"),
    ("mesh.data=0", r"'mesh.data': expected a positive integer or -1, got 0"),
    ("model.time_step_min=0.5", r"'model.time_step_min': expected <= time_step_max"),
    ("optim.decay_steps=-1", r"'optim.decay_steps': expected an integer >= 0, got -1"),
    ("optim.decay_steps=100000", r"'optim.decay_steps': expected <= steps - optim.warmup_steps"),
    ("optim.learning_rate=.inf", r"'optim.learning_rate': expected a finite positive number, got inf"),
    ("optim.clip_norm=.nan", r"'optim.clip_norm': expected a finite non-negative number, got nan"),
    ("seed=-1", r"'seed': expected an integer in \[0, 2\*\*32\), got -1"),
    # jax.random keys keep 32 bits: 2**32 was seed 0's model again, 2**64 an OverflowError in jax.random
    ("seed=4294967296", r"'seed': expected an integer in \[0, 2\*\*32\), got 4294967296"),
    ("seed=99999999999999999999", r"'seed': expected an integer in \[0, 2\*\*32\), got 99999999999999999999"),
    ("model.time_step_max=.inf", r"'model.time_step_max': expected a finite positive number, got inf"),  # NaN model
    ("model.layer_norm_epsilon=.inf", r"'model.layer_norm_epsilon': expected a finite positive number, got inf"),
    ("output_dir=", r"'output_dir': expected a non-empty path, got ''"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_falcon_mamba", [override])


def test_limits_are_inclusive_below_them():
    run = load_config("tiny_falcon_mamba", ["seed=4294967295", "model.eos_token_id=[0, 255]", "model.bos_token_id=255"])
    assert run.seed == 2**32 - 1 and run.model.eos_token_id == (0, 255) and run.model.bos_token_id == 255


@pytest.mark.parametrize("text, message", [
    # yaml's ScannerError and ConstructorError (safe_load refuses the tag; nothing runs) came raw, unnamed
    ("bad: : :\n", r"syntax.yaml': expected YAML, got mapping values are not allowed here at line 1, column 6$"),
    ("seed: 1\nx: !!python/object/apply:os.system ['echo hi']\n",
     r"syntax.yaml': expected YAML, got could not determine a constructor for the tag "
     r"'tag:yaml.org,2002:python/object/apply:os.system' at line 2, column 4$"),
    # an empty file (a config.yaml cut to 0 bytes) was every default: hidden_size 4096, then an orbax shape error
    ("", r"syntax.yaml': expected a mapping at the top level, got an empty document \(write \{\} for every default\)"),
    ("# only a comment\n", r"syntax.yaml': expected a mapping at the top level, got an empty document"),
    ("- seed\n", r"syntax.yaml': expected a mapping at the top level, got list"),
])
def test_bad_yaml_files_are_named(tmp_path, text, message):
    (tmp_path / "syntax.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"^preset '.*" + message):
        load_config(str(tmp_path / "syntax.yaml"))
    (tmp_path / "child.yaml").write_text("base: syntax.yaml\n")  # reached through a base chain: the same message
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "child.yaml"))
    (tmp_path / "empty_ok.yaml").write_text("{}\n")
    assert load_config(str(tmp_path / "empty_ok.yaml")).model.hidden_size == 4096


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny_falcon_mambo'; did you mean 'tiny_falcon_mamba'"):
        load_config("tiny_falcon_mambo")


def test_yaml_file_path(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny_falcon_mamba\nmodel:\n  num_hidden_layers: 3\nseed: 4\n")
    run = load_config(str(path))
    assert run.model.num_hidden_layers == 3 and run.seed == 4 and run.model.hidden_size == 64
    # a relative base path is found beside the file that names it, from any working directory
    (tmp_path / "child.yaml").write_text("base: mine.yaml\nseed: 5\n")
    monkeypatch.chdir(tmp_path.parent)
    run = load_config(str(tmp_path / "child.yaml"))
    assert run.seed == 5 and run.model.num_hidden_layers == 3


def test_to_dict_round_trip():
    run = load_config("falcon_mamba_7b", ["seed=2"])
    assert configs.from_dict(configs.RunConfig, configs.to_dict(run)) == run


def test_replace_checks_keys():
    cfg = load_model_config("tiny_falcon_mamba")
    assert configs.replace(cfg, scan_impl="chunked").scan_impl == "chunked"
    with pytest.raises(ConfigError, match=r"unknown config key 'scan_iml'; did you mean 'scan_impl'"):
        configs.replace(cfg, scan_iml="chunked")


def test_replace_derives_again_what_the_config_derived():
    """ffn_hidden_size and num_kv_heads left None derive from hidden_size and num_attention_heads: replacing
    those derives them anew (from_pretrained's overrides go through replace); set ones stay set."""
    tiny = load_model_config("tiny_falcon")
    assert configs.replace(tiny, hidden_size=128).ffn_hidden_size == 512
    rw = configs.replace(load_model_config("falcon_rw_1b"), num_attention_heads=16)
    assert rw.num_kv_heads == 16
    explicit = configs.replace(tiny, ffn_hidden_size=100)
    assert configs.replace(explicit, hidden_size=128).ffn_hidden_size == 100
    assert configs.replace(tiny, hidden_size=128, ffn_hidden_size=300).ffn_hidden_size == 300
    assert configs.from_dict(type(tiny), configs.to_dict(tiny)) == tiny and "derived" not in configs.to_dict(tiny)


def test_falcon_mamba_sizes_left_out_derive_from_hidden_size():
    """intermediate_size and time_step_rank default to transformers' 2 x hidden_size and ceil(hidden_size / 16)
    (they were the 7B's 8192 and 256 whatever hidden_size: 40 x the parameters for hidden_size 256), and derive
    anew under replace; set ones stay set."""
    cfg = FalconMambaConfig(hidden_size=256, vocab_size=256, num_hidden_layers=2)
    assert (cfg.intermediate_size, cfg.time_step_rank) == (512, 16)
    assert (configs.replace(cfg, hidden_size=128).intermediate_size, configs.replace(cfg, hidden_size=128)
            .time_step_rank) == (256, 8)
    tiny = load_model_config("tiny_falcon_mamba")  # sets both
    assert configs.replace(tiny, hidden_size=128).intermediate_size == tiny.intermediate_size
    assert configs.from_dict(FalconMambaConfig, configs.to_dict(cfg)) == cfg


@pytest.mark.parametrize("preset, extra, changed, derived", [
    ("tiny_falcon_mamba", ["model.intermediate_size=null", "model.time_step_rank=null"], {"hidden_size": 128},
     {"intermediate_size": 256, "time_step_rank": 8}),
    # multi-head: num_kv_heads derives from num_attention_heads (a stale 6 was refused with 2 heads)
    ("tiny_falcon_alibi", [], {"hidden_size": 48, "num_attention_heads": 2}, {"ffn_hidden_size": 192,
                                                                              "num_kv_heads": 2}),
])
def test_a_saved_config_derives_again_what_it_derived(tmp_path, preset, extra, changed, derived):
    """dump_config (a run's config.yaml) wrote derived fields as values: a file basing itself on it, or an override,
    with another hidden_size or head count kept the old intermediate_size, time_step_rank, ffn_hidden_size or
    num_kv_heads. They are written null (their value in a comment) and read back as the same config."""
    run = load_config(preset, extra)
    text = configs.dump_config(run)
    (tmp_path / "config.yaml").write_text(text)
    back = load_config(tmp_path / "config.yaml")
    assert back == run and back.model.derived == run.model.derived
    (tmp_path / "child.yaml").write_text("base: config.yaml\nmodel:\n" + "".join(f"  {k}: {v}\n"
                                                                                  for k, v in changed.items()))
    model = load_config(tmp_path / "child.yaml").model
    assert {name: getattr(model, name) for name in derived} == derived
    assert load_config(tmp_path / "config.yaml", [f"model.{k}={v}" for k, v in changed.items()]).model == model
    assert configs.replace(back.model, **changed) == model  # from_pretrained's overrides on a run's model
    for name in derived:
        assert f"\n  {name}: null  # derived: {getattr(run.model, name)}\n" in text


def test_a_saved_config_keeps_what_was_set(tmp_path):
    """tiny_falcon_mamba sets intermediate_size and time_step_rank: its config.yaml keeps them set."""
    text = configs.dump_config(load_config("tiny_falcon_mamba"))
    assert "\n  intermediate_size: 128\n" in text and "\n  time_step_rank: 4\n" in text
    (tmp_path / "config.yaml").write_text(text)
    model = load_config(tmp_path / "config.yaml", ["model.hidden_size=128"]).model
    assert (model.intermediate_size, model.time_step_rank) == (128, 4)


def test_replace_takes_a_built_model_config():
    run = load_config("tiny_falcon")
    assert configs.replace(run, model=configs.replace(run.model, hidden_size=128)).model.hidden_size == 128


def test_hf_import_falcon_mamba_7b_style():
    # the published file's keys (abridged to what matters): expand 16 AND intermediate_size 8192
    published = {
        "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba", "vocab_size": 65024,
        "hidden_size": 4096, "num_hidden_layers": 64, "state_size": 16, "expand": 16, "intermediate_size": 8192,
        "conv_kernel": 4, "time_step_rank": 256, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": False,
        "pad_token_id": 11, "eos_token_id": 11, "bos_token_id": 0, "mixer_rms_eps": 1e-6, "use_cache": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    }
    cfg = model_config_from_hf(published)
    preset = load_model_config("falcon_mamba_7b")
    assert cfg == configs.replace(preset, compute_dtype="float32")


def test_hf_import_defaults_and_mamba():
    cfg = model_config_from_hf({"model_type": "mamba", "hidden_size": 40})
    assert cfg.intermediate_size == 80 and cfg.time_step_rank == 3 and not cfg.use_mixer_norms
    assert cfg.tie_word_embeddings and cfg.vocab_size == 50280
    # mamba_ssm's own config.json: vocab_size defaults to its 50277, padded to a multiple of 8 (a KeyError before)
    assert model_config_from_hf({"d_model": 64, "n_layer": 2}).vocab_size == 50280
    with pytest.raises(ConfigError, match=r"config.json d_intermediate: expected 0 \(a plain Mamba-1 stack\), got 256"):
        model_config_from_hf({"d_model": 64, "n_layer": 2, "d_intermediate": 256})


def test_hf_import_rejects_other_models_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"model_type: expected one of \['falcon_mamba', 'mamba'\].*got 'llama'"):
        model_config_from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match=r"config.json:state_size"):
        model_config_from_hf({"model_type": "falcon_mamba", "state_size": 0})
    with pytest.raises(ConfigError, match="config.json not found"):
        model_config_from_hf(tmp_path)


@pytest.mark.parametrize("hf, message", [
    # a string expand multiplied a string: intermediate_size 2222222222222222
    ({"d_model": 16, "n_layer": 1, "ssm_cfg": {"expand": "2"}}, r"config.json ssm_cfg.expand: expected a positive "
                                                                 r"number, got '2'$"),
    ({"model_type": "falcon_mamba", "hidden_size": 16, "expand": "2"}, r"config.json expand: expected a positive "
                                                                        r"number, got '2'$"),
    ({"model_type": "mamba", "hidden_size": 16, "expand": 0}, r"config.json expand: expected a positive number, got 0"),
    ({"model_type": "falcon_mamba", "hidden_size": None}, r"config.json hidden_size: expected a positive integer, "
                                                          r"got None"),  # a TypeError
    ({"d_model": "16", "n_layer": 1}, r"config.json d_model: expected a positive integer, got '16'"),  # TypeError
    ({"d_model": 16, "n_layer": 1, "pad_vocab_size_multiple": 0},
     r"config.json pad_vocab_size_multiple: expected a positive integer, got 0"),  # ZeroDivisionError
    ({"d_model": 16, "n_layer": 1, "pad_vocab_size_multiple": "8"},
     r"config.json pad_vocab_size_multiple: expected a positive integer, got '8'"),  # TypeError
    ({"d_model": 16, "n_layer": 1, "vocab_size": "32"},
     r"config.json vocab_size: expected a positive integer, got '32'"),  # a string-formatting TypeError
    ({"d_model": 16, "n_layer": 1, "ssm_cfg": [1, 2]}, r"config.json ssm_cfg: expected a mapping, got \[1, 2\]"),
    ({"d_model": 16, "n_layer": 1, "ssm_cfg": "abc"}, r"config.json ssm_cfg: expected a mapping, got 'abc'"),
])
def test_hf_import_checks_values_before_using_them(hf, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(hf)


def test_hf_import_names_a_bad_source_or_file(tmp_path):
    assert model_config_from_hf({"d_model": 16.0, "n_layer": 1}).hidden_size == 16  # as the loader reads 16.0
    with pytest.raises(ConfigError, match=r"model_config_from_hf source: expected a path to config.json .* or a "
                                          r"mapping, got 5"):
        model_config_from_hf(5)  # a TypeError from pathlib
    (tmp_path / "config.json").write_text('{"d_model": 16,\n {bad')
    with pytest.raises(ConfigError, match=r"config.json': expected a JSON object, got invalid JSON at line 2, "
                                          r"column 2: Expecting property name"):
        model_config_from_hf(tmp_path)  # a JSONDecodeError that named no file


def test_hf_export_is_read_back_identically(tmp_path):
    from transformers import AutoConfig

    cfg = load_model_config("tiny_falcon_mamba", ["intermediate_size=192", "time_step_rank=6"])
    (tmp_path / "config.json").write_text(json.dumps(configs.model_config_to_hf(cfg)))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert (hf.model_type, hf.intermediate_size, hf.time_step_rank, hf.state_size) == ("falcon_mamba", 192, 6, 16)
    assert model_config_from_hf(tmp_path) == cfg


@pytest.mark.parametrize("preset, overrides", [
    ("tiny_falcon", ["layer_norm_epsilon=0.001", "initializer_range=0.05", "max_position_embeddings=777"]),
    ("tiny_falcon_mamba", ["layer_norm_epsilon=0.001", "mixer_rms_eps=0.0003", "time_step_scale=0.5",
                           "time_step_min=0.002", "time_step_max=0.2", "initializer_range=0.05"]),
])
def test_hf_round_trip_keeps_values_other_than_the_defaults(preset, overrides):
    """The presets' eps and init values are the defaults: a field dropped on import would fall back unseen."""
    cfg = load_model_config(preset, overrides)
    assert model_config_from_hf(configs.model_config_to_hf(cfg)) == cfg


def test_falcon_export_keeps_null_token_ids_and_writes_4x_rope_keys(tmp_path):
    """A null token id stays null through export and import (transformers keeps None; our default is 11); RoPE
    is written both as transformers 5's rope_parameters and as 4.x's rope_theta / rope_scaling."""
    from transformers import AutoConfig

    cfg = load_model_config("tiny_falcon", ["bos_token_id=null", "eos_token_id=null", "rope_theta=500042.0",
                                            "rope_scaling_type=dynamic", "rope_scaling_factor=2.0"])
    hf = configs.model_config_to_hf(cfg)
    assert hf["rope_theta"] == 500042.0 and hf["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert model_config_from_hf(hf) == cfg
    assert model_config_from_hf({k: v for k, v in hf.items() if k != "rope_parameters"}) == cfg  # as 4.x reads it
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (None, None)
    assert loaded.rope_parameters["rope_theta"] == 500042.0 and loaded.rope_parameters["rope_type"] == "dynamic"


@pytest.mark.parametrize("family", ["falcon", "falcon_mamba"])
def test_several_eos_ids_are_kept(family, tmp_path):
    """config.json's eos_token_id may be a list (transformers keeps it; generation stops at any): imported whole
    (it was cut to its first id), exported as a list that transformers reads back, and refused when not ids."""
    from transformers import AutoConfig

    cfg = load_model_config(f"tiny_{family}", ["eos_token_id=[11, 7]"])
    assert cfg.eos_token_id == (11, 7)
    hf = configs.model_config_to_hf(cfg)
    assert hf["eos_token_id"] == [11, 7] and model_config_from_hf(hf) == cfg
    assert model_config_from_hf({**hf, "eos_token_id": [5]}).eos_token_id == 5
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert AutoConfig.from_pretrained(tmp_path).eos_token_id == [11, 7]
    for bad in ("[]", "[11, -1]", "[x]"):
        with pytest.raises(ConfigError, match="eos_token_id"):
            load_model_config(f"tiny_{family}", [f"eos_token_id={bad}"])


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match=r"'state_size': expected <= 256"):
        FalconMambaConfig(state_size=300)
    # built in Python, the bool and str fields were not checked: 'false' is truthy
    from configs.schema import DistributedConfig, FalconConfig

    with pytest.raises(ConfigError, match=r"'alibi': expected true or false, got 'false'"):
        FalconConfig(alibi="false")
    with pytest.raises(ConfigError, match=r"'use_mixer_norms': expected true or false, got None"):
        FalconMambaConfig(use_mixer_norms=None)
    with pytest.raises(ConfigError, match=r"'coordinator_address': expected a string or null, got 5"):
        DistributedConfig(coordinator_address=5)


def test_time_step_rank_auto_is_null(tmp_path):
    """transformers' FalconMambaConfig says time_step_rank "auto" for ceil(hidden_size / 16); the schema (our
    null) refused the word on the command line, in YAML and in Python. Other strings are still refused, named."""
    cfg = load_model_config("tiny_falcon_mamba", ["hidden_size=96", "time_step_rank=auto"])
    assert cfg.time_step_rank == 6 and "time_step_rank" in cfg.derived
    (tmp_path / "auto.yaml").write_text("base: tiny_falcon_mamba\nmodel:\n  hidden_size: 96\n  time_step_rank: auto\n")
    assert load_config(tmp_path / "auto.yaml").model == cfg
    assert cfg == load_model_config("tiny_falcon_mamba", ["hidden_size=96", "time_step_rank=null"])
    assert FalconMambaConfig(hidden_size=96, time_step_rank="auto").time_step_rank == 6
    assert model_config_from_hf({"model_type": "falcon_mamba", "hidden_size": 96, "time_step_rank": "auto"}) == \
        model_config_from_hf({"model_type": "falcon_mamba", "hidden_size": 96, "time_step_rank": None})
    with pytest.raises(ConfigError, match=r"^config field 'model.time_step_rank': expected an integer, 'auto' or "
                                          r"null, got 'Auto'$"):
        load_config("tiny_falcon_mamba", ["model.time_step_rank=Auto"])
    with pytest.raises(ConfigError, match=r"^config field 'time_step_rank': expected a positive integer, 'auto' or "
                                          r"null \(ceil\(hidden_size / 16\)\), got 'x'$"):
        FalconMambaConfig(time_step_rank="x")
    with pytest.raises(ConfigError, match=r"'model.intermediate_size': expected an integer or null, got 'auto'"):
        load_config("tiny_falcon_mamba", ["model.intermediate_size=auto"])


def test_override_value_may_contain_an_equals_sign():
    """Only the first '=' separates key and value: a run directory such as runs/lr=0.1 is a common value."""
    run = load_config("tiny_falcon_mamba", ["output_dir=runs/lr=0.1,wd=0"])
    assert run.output_dir == "runs/lr=0.1,wd=0"


def test_derived_fields_and_boundaries():
    """new_decoder_architecture without num_ln_in_parallel_attn has ln_attn and ln_mlp (transformers' default 2);
    an ALiBi model needs no even head_dim (no RoPE); the limits are inclusive where the message says so."""
    from configs.schema import DataConfig, FalconConfig, MeshConfig, OptimConfig, RunConfig

    nda = FalconConfig(hidden_size=48, num_attention_heads=6, num_kv_heads=2, new_decoder_architecture=True)
    assert nda.num_ln_in_parallel_attn == 2 and nda.block_layout == "parallel_2ln"
    assert FalconConfig(hidden_size=60, num_attention_heads=4, alibi=True).head_dim == 15
    with pytest.raises(ConfigError, match=r"even head_dim"):
        FalconConfig(hidden_size=60, num_attention_heads=4)
    assert FalconMambaConfig(state_size=256).state_size == 256
    # the decay may span every step after warm-up; the curriculum must leave at least one step at seq_len
    assert RunConfig(steps=10, optim=OptimConfig(warmup_steps=2, decay_steps=8)).optim.decay_steps == 8
    assert RunConfig(steps=10, data=DataConfig(length_curriculum=((8, 9),))).steps == 10
    with pytest.raises(ConfigError, match=r"'data.length_curriculum': expected stages totalling fewer than steps"):
        RunConfig(steps=10, data=DataConfig(length_curriculum=((8, 10),)))
    with pytest.raises(ConfigError, match=r"'fsdp': expected at most one mesh axis of size -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"'tensor': expected at most one mesh axis of size -1"):  # was 'data'
        MeshConfig(data=2, fsdp=-1, tensor=-1)
    # a config built in Python may give the optimizer's numbers as ints; a bool is not a number here
    assert OptimConfig(weight_decay=0, clip_norm=0, end_lr_ratio=0, b1=0, learning_rate=1) == OptimConfig(
        weight_decay=0.0, clip_norm=0.0, end_lr_ratio=0.0, b1=0.0, learning_rate=1.0)
    for name in ("weight_decay", "b2", "learning_rate"):
        with pytest.raises(ConfigError, match=rf"'{name}': expected .*number.*, got False"):
            OptimConfig(**{name: False})


@pytest.mark.parametrize("value,named", [(5, r"'length_curriculum': expected a list of \[seq_len, steps\] stages, "
                                              r"got 5"),
                                         ((5,), r"'length_curriculum\[0\]': expected \[seq_len, steps\], two "
                                                r"positive integers, got 5"),
                                         ([[8, 3], (4,)], r"'length_curriculum\[1\]': .* got \[4\]")])
def test_a_length_curriculum_built_in_python_is_checked_and_kept_as_tuples(value, named):
    """DataConfig(length_curriculum=5) was a bare TypeError ('int' object is not iterable); lists are kept as
    tuples (as the loader gives them), and a RunConfig's sections must be configs, not dicts."""
    from configs.schema import DataConfig, RunConfig

    with pytest.raises(ConfigError, match=named):
        DataConfig(length_curriculum=value)
    assert DataConfig(length_curriculum=[[8, 3]]).length_curriculum == ((8, 3),)
    with pytest.raises(ConfigError, match=r"'data': expected a DataConfig, got \{'task': 'copy'\}"):
        RunConfig(data={"task": "copy"})


def test_a_key_repeated_in_a_yaml_mapping_is_refused(tmp_path):
    """yaml.safe_load keeps the last of two equal keys: a second model: section silently replaced the first whole
    (hidden_size 128 became the base's 64). A << merge's keys may still be overridden."""
    path = tmp_path / "twice.yaml"
    path.write_text("base: tiny_falcon\nmodel:\n  hidden_size: 128\nseed: 3\nmodel:\n  num_hidden_layers: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml': expected each key once in a mapping, got 'model' at line 2 "
                                          r"and again at line 5$"):
        load_config(str(path))
    path.write_text("base: tiny_falcon\nmesh:\n  rules:\n    d_inner: tensor\n    d_inner: null\n")
    with pytest.raises(ConfigError, match=r"got 'd_inner' at line 4 and again at line 5$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^override 'model=\{hidden_size: 8, hidden_size: 16\}': expected each "
                                          r"key once in a mapping, got 'hidden_size' at line 1 and again at line 1$"):
        load_config("tiny_falcon", ["model={hidden_size: 8, hidden_size: 16}"])
    path.write_text("base: tiny_falcon\nmodel:\n  <<: {hidden_size: 128, num_hidden_layers: 3}\n  hidden_size: 96\n")
    assert (load_config(str(path)).model.hidden_size, load_config(str(path)).model.num_hidden_layers) == (96, 3)


def test_a_mapping_override_merges_into_earlier_overrides():
    """model={...} merges over the preset's model section; it replaced what earlier overrides had set there."""
    run = load_config("tiny_falcon", ["model.hidden_size=128", "model={num_hidden_layers: 2}", "mesh.data=1",
                                      "mesh={fsdp: 1}"])
    assert (run.model.hidden_size, run.model.num_hidden_layers, run.mesh.data) == (128, 2, 1)
    assert load_config("tiny_falcon", ["seed=1", "seed=2"]).seed == 2  # a later value still wins


def test_mamba_ssm_ssm_cfg_keys_are_mapped_or_refused():
    """mamba_ssm's Mamba(**ssm_cfg) refuses unknown keys: a misspelt d_state was read as the default 16. Its dt_*
    initialisation keys fell back to the defaults unseen; they are transformers' time_step_* fields."""
    base = {"d_model": 64, "n_layer": 2}
    with pytest.raises(ConfigError, match=r"^config.json ssm_cfg: expected keys among \['bias', .*\] \(mamba_ssm's "
                                          r"Mamba arguments\), got \['d_stat'\]$"):
        model_config_from_hf({**base, "ssm_cfg": {"d_stat": 8}})
    cfg = model_config_from_hf({**base, "ssm_cfg": {"d_state": 8, "dt_min": 0.01, "dt_max": 0.2, "dt_init": "constant",
                                                    "dt_scale": 2.0, "dt_init_floor": 1e-3, "use_fast_path": False}})
    assert (cfg.state_size, cfg.time_step_min, cfg.time_step_max, cfg.time_step_init_scheme, cfg.time_step_scale,
            cfg.time_step_floor) == (8, 0.01, 0.2, "constant", 2.0, 1e-3)
    with pytest.raises(ConfigError, match=r"config.json:time_step_init_scheme': expected one of \['random', "
                                          r"'constant'\], got 'xavier'"):
        model_config_from_hf({**base, "ssm_cfg": {"dt_init": "xavier"}})


def test_hf_null_intermediate_size_derives_from_expand():
    """intermediate_size null fell to our 2 x hidden_size, whatever expand said (transformers derives expand x
    hidden_size when the key is absent)."""
    hf = {"model_type": "falcon_mamba", "hidden_size": 64, "expand": 4, "intermediate_size": None}
    assert model_config_from_hf(hf).intermediate_size == 256


@pytest.mark.parametrize("item", ["model..hidden_size=1", ".seed=1", "seed.=1"])
def test_a_dotted_key_with_an_empty_name_is_refused_as_such(item):
    """An empty name in a dotted key was reported as an unknown key 'model.' or '', or (seed.=1) as a mapping
    where an integer goes."""
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"override {item!r}: expected a dotted key of non-empty names "
                                                    f"(model.hidden_size), got {key!r}")):
        load_config("tiny_falcon_mamba", [item])
