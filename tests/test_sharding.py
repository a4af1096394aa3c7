"""Meshes from the config, the logical-axis rules, and the shardings parameters and optimizer state get."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

import ssm.sharding
import transformer.sharding
from configs import MeshConfig, load_config
from configs.schema import ConfigError, DEFAULT_SHARDING_RULES
from experiments.mesh import MeshError, logical_axes, mesh_shape, spec_for
from tests.train_helpers import ROOT, cli_env, run_train

MESH_2X2X2 = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_mesh_shape_resolves_the_rest_and_names_mismatches():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(MeshError, match=r"data=2 x fsdp=2 x tensor=4 needs 16 devices, but 8 are available"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=4), 8)
    with pytest.raises(MeshError, match=r"mesh.data=-1: the other axes .* use 3 devices, which does not divide "
                                        r"the 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    from experiments.mesh import build_mesh

    with pytest.raises(MeshError, match=r"devices: expected at least one device, got none"):  # an IndexError
        build_mesh(MeshConfig(), devices=[])


def test_rules_are_config_data_with_checked_values():
    run = load_config("tiny_falcon", ["mesh.rules.embed=tensor", "mesh.rules.mlp=[fsdp, tensor]",
                                      "mesh.rules.vocab=null"])
    assert run.mesh.rules["embed"] == ("tensor",) and run.mesh.rules["mlp"] == ("fsdp", "tensor")
    assert run.mesh.rules["vocab"] == () and run.mesh.rules["batch"] == DEFAULT_SHARDING_RULES["batch"]
    with pytest.raises(ConfigError, match=r"'mesh.rules.embed': expected null, one of \['data', 'fsdp', "
                                          r"'tensor'\] or a list of distinct ones, got \('model',\)"):
        load_config("tiny_falcon", ["mesh.rules.embed=model"])
    with pytest.raises(ConfigError, match=r"'mesh.rules.head': expected a logical axis, one of \['batch', .*got "
                                          r"'head'; did you mean 'heads'\?"):  # a rule nothing would read
        load_config("tiny_falcon", ["mesh.rules.head=tensor"])


def test_family_tables_map_parameters_to_mesh_axes():
    rules = DEFAULT_SHARDING_RULES
    spec = lambda table, path, shape: spec_for(path, shape, logical_axes(table, path), MESH_2X2X2, rules)  # noqa
    assert spec(ssm.sharding.PARAM_AXES, "layers.0.mixer.in_proj.kernel", (64, 2, 128)) == \
        PartitionSpec("fsdp", None, "tensor")
    assert spec(ssm.sharding.PARAM_AXES, "layers.3.mixer.A_log", (128, 16)) == PartitionSpec("tensor", None)
    assert spec(ssm.sharding.PARAM_AXES, "embeddings.embedding", (256, 64)) == PartitionSpec("tensor", "fsdp")
    assert spec(transformer.sharding.PARAM_AXES, "h.1.mlp.dense_4h_to_h.kernel", (256, 64)) == \
        PartitionSpec("tensor", "fsdp")
    assert spec(transformer.sharding.PARAM_AXES, "h.0.ln_attn.weight", (64,)) == PartitionSpec(None)
    with pytest.raises(MeshError, match=r"parameter 'h.0.mystery': no entry"):
        logical_axes(transformer.sharding.PARAM_AXES, "h.0.mystery")


def test_dimension_not_divisible_names_parameter_axis_and_size():
    with pytest.raises(MeshError, match=r"layers.0.mixer.in_proj.kernel: dimension 2 \('d_inner'\) has size 255, "
                                        r"which is not divisible by mesh axes tensor=2"):
        spec_for("layers.0.mixer.in_proj.kernel", (64, 2, 255), ("embed", "xz", "d_inner"), MESH_2X2X2,
                 DEFAULT_SHARDING_RULES)


def test_a_callers_mesh_may_lack_axes_but_not_rename_them():
    """A mesh built by the caller (from_pretrained(mesh=...)) with only some of data/fsdp/tensor: the axes it lacks
    split nothing (a KeyError before); an axis of size > 1 under another name is refused, naming it."""
    from runtime.hf_weights import resolve_shardings

    tensor_only = AbstractMesh((4,), ("tensor",), axis_types=(AxisType.Auto,))
    assert spec_for("lm_head.kernel", (64, 256), ("embed", "vocab"), tensor_only, DEFAULT_SHARDING_RULES) == \
        PartitionSpec(None, "tensor")
    renamed = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(MeshError, match=r"mesh: axes \{'model': 4\} are not mesh axes the sharding rules use; "
                                        r"expected names among \['data', 'fsdp', 'tensor'\]"):
        resolve_shardings(mesh=renamed, table=ssm.sharding.PARAM_AXES)


def test_inference_rows_split_over_the_batch_axes_that_divide_them():
    """Inference splits a batch's rows over data and fsdp where their sizes divide the rows, else over the leading
    axes that do (a batch of 2 on data=2 x fsdp=2 was left whole on all 4 devices)."""
    from runtime.partitioning import batch_axes

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    assert [batch_axes(mesh, rows) for rows in (8, 4, 2, 6, 1, 3)] == [("data", "fsdp"), ("data", "fsdp"), ("data",),
                                                                       ("data",), (), ()]
    fsdp_only = AbstractMesh((1, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    assert [batch_axes(fsdp_only, rows) for rows in (4, 2)] == [("fsdp",), ()]


def test_a_callers_explicit_mesh_places_parameters_on_auto_axes(tmp_path):
    """jax.make_mesh's default axes are Explicit: parameters placed there carry their shardings in their types, and
    on two or more devices the models' first gather from a split embedding failed (ShardingTypeError).
    from_pretrained places them on the same devices with Auto axes, as experiments.mesh builds meshes."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from configs import load_model_config
    from experiments.models import build_model

    saved = build_model(load_model_config("tiny_falcon_mamba", ["num_hidden_layers=1"]))
    ssm.save_pretrained(saved, tmp_path)
    explicit = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(saved, nnx.Param))]
    for placement in ({"mesh": explicit}, {"shardings": {path: NamedSharding(explicit, PartitionSpec())
                                                         for path in paths}}):
        model = ssm.from_pretrained(tmp_path, **placement)
        for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
            assert leaf.sharding.mesh.axis_types == (AxisType.Auto,) * 3, placement
            assert leaf.sharding.mesh.devices.tolist() == explicit.devices.tolist()


def test_cli_reports_bad_mesh_and_indivisible_dims(tmp_path):
    bad_mesh = run_train("tiny_falcon_mamba", tmp_path / "a", "mesh.data=3", devices=8, cache_dir=tmp_path,
                         expect_ok=False)
    assert bad_mesh.returncode == 1 and "data=3 x fsdp=1 x tensor=1 needs 3 devices, but 8 are available" \
        in bad_mesh.stderr, bad_mesh.stderr[-2000:]


SHARDING_CHECK = textwrap.dedent("""
    import jax
    from jax.sharding import PartitionSpec as P
    from configs import load_config
    from experiments.train import prepare

    for preset, checks in {
        "tiny_falcon_mamba": {"layers.0.mixer.in_proj.kernel": P("fsdp", None, "tensor"),
                              "layers.0.mixer.conv_kernel": P(None, "tensor"),
                              "layers.0.mixer.out_proj.kernel": P("tensor", "fsdp"),
                              "embeddings.embedding": P("tensor", "fsdp"), "norm_f.weight": P(None)},
        # multi-query: attention weights replicated over tensor (no even head split), the MLP split
        "tiny_falcon": {"h.0.self_attention.query_key_value.kernel": P("fsdp", None),
                        "h.0.self_attention.dense.kernel": P(None, "fsdp"),
                        "h.0.mlp.dense_h_to_4h.kernel": P("fsdp", "tensor"),
                        "word_embeddings.embedding": P("tensor", "fsdp")},
    }.items():
        run = load_config(preset, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
        setup = prepare(run)
        state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
        adam = state["opt_state"][1][0]
        for path, spec in checks.items():
            for name, array in (("param", state["params"][path]), ("mu", adam.mu[path]), ("nu", adam.nu[path])):
                assert array.sharding.spec == spec, (preset, path, name, array.sharding.spec, spec)
                assert array.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
                assert len(array.addressable_shards) == 8
        for path, array in state["params"].items():
            assert array.sharding == setup.state_shardings["params"][path], path
        assert state["step"].sharding.spec == P()
        assert setup.batch_sharding.spec == P(None, ("data", "fsdp"), None)
    bad = load_config("tiny_falcon_mamba", ["mesh.data=1", "mesh.tensor=8", "model.intermediate_size=132"])
    try:
        prepare(bad)
    except ValueError as err:
        print("ERROR:", err)
    idle = load_config("tiny_falcon_mamba", ["mesh.data=4", "mesh.tensor=2", "mesh.rules.d_inner=null",
                                             "mesh.rules.vocab=null"])
    try:
        prepare(idle)
    except ValueError as err:
        print("IDLE:", err)
    print("OK")
""")


def test_params_and_optimizer_state_follow_the_rules_on_8_devices(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SHARDING_CHECK], env=cli_env(8, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert ("ERROR: parameter 'layers.0.mixer.A_log': dimension 0 ('d_inner') has size 132, which is not "
            "divisible by mesh axes tensor=8") in proc.stdout or \
        "dimension 1 ('d_inner') has size 264" in proc.stdout, proc.stdout
    # rules mapping nothing to a mesh axis of size 2: each pair of devices repeated the same work
    assert ("IDLE: mesh.rules: expected every mesh axis of size > 1 to shard a parameter or the batch, got "
            "mesh.tensor=2 that no rule maps a dimension to") in proc.stdout, proc.stdout


COLLECTIVES_CHECK = textwrap.dedent("""
    from configs import load_config
    from experiments.bench.collectives import collectives, compiled_step_hlo

    def permutes(*overrides):
        run = load_config("tiny_falcon", ["model.num_hidden_layers=1", "data.seq_len=32", "data.batch_size=8",
                                          "mesh.data=4", "mesh.tensor=2", *overrides])
        return collectives(compiled_step_hlo(run)).get("collective-permute", (0, 0))[0]

    grouped = ["model.multi_query=false", "model.new_decoder_architecture=true", "model.num_kv_heads=2"]
    print("multi_query", permutes())
    print("multi_query_fsdp", permutes("mesh.data=2", "mesh.fsdp=2"))  # kernels split over "embed" only
    print("multi_query_forced", permutes("mesh.rules.multi_query_heads=tensor"))
    print("grouped", permutes(*grouped))
    try:
        permutes(*grouped, "mesh.data=2", "mesh.tensor=4")
    except ValueError as err:
        print("ERROR:", err)
""")


def test_falcon_heads_split_without_reshuffling_q_k_v(tmp_path):
    """The compiled train step on data 4 x tensor 2: a tensor split of the fused query_key_value that cuts heads
    makes GSPMD permute q, k and v between shards; the layout-aware tables (transformer.sharding.param_axes)
    leave none, and a mesh that would cut a kv group fails before compiling, naming the config field."""
    proc = subprocess.run([sys.executable, "-c", COLLECTIVES_CHECK], env=cli_env(8, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(line.split() for line in proc.stdout.splitlines() if not line.startswith("ERROR"))
    assert counts["multi_query"] == counts["multi_query_fsdp"] == counts["grouped"] == "0", proc.stdout
    assert int(counts["multi_query_forced"]) > 0, proc.stdout  # the check can see a reshuffle when there is one
    assert ("ERROR: model.num_kv_heads: 2 grouped head groups of query_key_value are not divisible by mesh axes "
            "tensor=4") in proc.stdout, proc.stdout


REMAT_CHECK = textwrap.dedent("""
    import os, sys
    import runtime.layers
    from configs import load_config
    from experiments.bench.collectives import compiled_step_hlo

    def compile_step(preset, tensor=2):
        compiled_step_hlo(load_config(preset, ["model.num_hidden_layers=1", "data.seq_len=8", "data.batch_size=8",
                                               "mesh.data=2", f"mesh.fsdp={8 // 2 // tensor}",
                                               f"mesh.tensor={tensor}"]))
        os.write(2, f"=== compiled {preset}\\n".encode())  # after XLA's own stderr lines of this compile

    compile_step("tiny_falcon_mamba")
    compile_step("tiny_falcon")
    compile_step("tiny_falcon_mamba", tensor=1)  # the table split over fsdp only
    runtime.layers.constrain = lambda x, logical: x  # the table gathered from as it is stored (FSDP-split)
    compile_step("tiny_falcon_mamba")
""")


def test_embedding_lookup_compiles_without_replicating_activations(tmp_path):
    """On a data x fsdp x tensor mesh the embedding table's features are FSDP-split; gathered from it as stored,
    the rows (and their gradient) come out feature-split and XLA can bring them to the batch-split activations
    only by replicating them ("Involuntary full rematerialization"). Embed gathers from the table all-gathered
    along features (runtime.partitioning.constrain under the trainer's mesh): no such warning for either family,
    also on a mesh without a tensor axis, and the check sees the warning when that constraint is taken out."""
    proc = subprocess.run([sys.executable, "-c", REMAT_CHECK], env=cli_env(8, tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mamba, falcon, fsdp_only, unconstrained, _ = proc.stderr.split("=== compiled ")
    assert "Involuntary full rematerialization" not in mamba + falcon + fsdp_only, proc.stderr[-3000:]
    assert "Involuntary full rematerialization" in unconstrained, proc.stderr[-3000:]


def test_traced_axes_follow_the_traced_mesh_and_the_runs_rules():
    """What a model's trace reads of its mesh (runtime.partitioning): nothing without a mesh or with Explicit
    axes; under the trainer's Auto mesh the default rules, or the run's mesh.rules where the trainer sets them."""
    import jax
    import jax.numpy as jnp

    from configs.schema import merged_rules
    from runtime.partitioning import constrain, traced_axes, use_rules

    x = jnp.ones((8, 4))
    assert traced_axes("batch") == ((), 1) and constrain(x, ("batch", None)) is x
    with jax.sharding.use_abstract_mesh(MESH_2X2X2):
        # constrained even where nothing splits (whole on every device), left to XLA where a size does not divide
        assert "sharding_constraint" in str(jax.make_jaxpr(lambda x: constrain(x, (None, None)))(x))
        odd = jnp.ones((8, 3))  # 3 rows do not divide over data x fsdp
        assert "unconstrained_dims=frozenset({1})" in str(jax.make_jaxpr(lambda x: constrain(x, (None, "batch")))(odd))
        assert traced_axes("batch") == (("data", "fsdp"), 4) and traced_axes("d_inner") == (("tensor",), 2)
        assert traced_axes("d_state") == ((), 1)
        with use_rules(merged_rules({"batch": "data", "d_inner": None})):
            assert traced_axes("batch") == (("data",), 2) and traced_axes("d_inner") == ((), 1)
        assert traced_axes("batch") == (("data", "fsdp"), 4)  # the rules end with their block
    explicit = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
    with jax.sharding.use_abstract_mesh(explicit):
        assert traced_axes("batch") == ((), 1)


def test_collectives_cli_help_and_bad_preset(capsys):
    """--help prints the usage (it was read as a preset name: a traceback); a bad preset is one named line."""
    from experiments.bench.collectives import main

    assert main(["--help"]) == 0 and "python -m experiments.bench.collectives" in capsys.readouterr().out
    assert main(["tiny_falcn"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'tiny_falcn'" in err and err.count("\n") == 1, err


def test_collectives_counts_a_combined_all_reduce_of_more_than_five_arrays():
    """XLA prints a tuple of more than five with /*index=5*/ comments; their "=" made the count skip the op (the
    combined all-reduces of tiny_falcon_mamba's step on data 2 x fsdp 2 x tensor 2: 5 of 27, a sixth of the bytes)."""
    from experiments.bench.collectives import collectives

    hlo = ("  %all-reduce.191 = (f32[64]{0}, f32[64]{0}, f32[36,64]{1,0}, f32[64,4]{1,0}, f32[64]{0}, /*index=5*/"
           "f32[64]{0}) all-reduce(%a, %b, %c, %d, %e, /*index=5*/%f), channel_id=1, replica_groups=[4,2]<=[8]\n"
           "  %all-gather.3 = bf16[8,16]{1,0} all-gather(%g), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}")
    assert collectives(hlo) == {"all-reduce": (1, 4 * (4 * 64 + 36 * 64 + 64 * 4)), "all-gather": (1, 2 * 8 * 16)}


def test_one_mesh_axis_never_splits_two_dimensions():
    """Rules mapping two logical axes of one array to the same mesh axis are refused, naming both."""
    rules = {**DEFAULT_SHARDING_RULES, "embed": ("tensor",)}  # vocab is on tensor too
    with pytest.raises(MeshError, match=r"embeddings.embedding: mesh axes \['tensor'\] would split two dimensions"):
        spec_for("embeddings.embedding", (256, 64), ("vocab", "embed"), MESH_2X2X2, rules)


@pytest.mark.parametrize("family", ["falcon_mamba", "falcon"])
def test_param_axes_name_every_dimension_by_what_it_is(family):
    """Each parameter dimension's logical axis is the one its size says (sizes all distinct here): a table entry
    with two axes swapped still shards evenly and trains the same, only with extra communication, so nothing
    else would notice."""
    import jax
    from flax import nnx

    from configs import load_model_config
    from experiments.mesh import flatten_params
    from experiments.models import family_of

    if family == "falcon_mamba":
        cfg = load_model_config("tiny_falcon_mamba", ["vocab_size=96", "hidden_size=40", "intermediate_size=88",
                                                      "state_size=6", "time_step_rank=5", "conv_kernel=3",
                                                      "use_bias=true"])
        names = {96: "vocab", 40: "embed", 88: "d_inner", 6: "d_state", 5: "dt_rank", 3: "conv", 2: "xz",
                 5 + 2 * 6: "ssm_proj"}
    else:
        cfg = load_model_config("tiny_falcon", ["vocab_size=96", "hidden_size=40", "num_attention_heads=4",
                                                "multi_query=false", "new_decoder_architecture=true",
                                                "num_kv_heads=2", "ffn_hidden_size=88", "bias=true"])
        names = {96: "vocab", 40: ("embed", "heads", "norm"), 88: "mlp", (4 + 2 * 2) * 10: "heads"}
    family = family_of(cfg)
    params, _ = flatten_params(nnx.state(nnx.eval_shape(lambda: family.lm(cfg)), nnx.Param))
    table = family.param_axes(cfg)
    for path, leaf in params.items():
        for size, axis in zip(leaf.shape, logical_axes(table, path)):
            want = names[size]
            assert axis in (want if isinstance(want, tuple) else (want,)) or axis == "norm", (path, leaf.shape, axis)
