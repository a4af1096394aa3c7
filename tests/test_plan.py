"""The planner (experiments.plan) against the bytes of arrays actually created, on 1 and 8 fake devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs.schema import ConfigError
from experiments import plan as plan_lib
from experiments.tpu_topology import libtpu_path
from runtime.partitioning import MeshError

ROOT = Path(__file__).resolve().parents[1]

# Runs in a process of its own with 8 fake CPU devices (or 1): the planner's per-device bytes vs the device-0
# bytes of the arrays the trainer's init and the streaming loader really create on the same mesh.
SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import load_config
from experiments import plan as plan_lib
from experiments.mesh import build_mesh, flatten_params
from experiments.models import family_of
from experiments.train import prepare
import ssm, transformer

out_dir = sys.argv[1]
mesh_args = sys.argv[2:] + ["model.num_hidden_layers=2"]   # 2 layers: quicker to compile
dev0 = jax.devices()[0]

def device0_bytes(tree):
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == dev0)

import runtime.layers, runtime.partitioning
traced, constrain = [], runtime.layers.constrain
runtime.layers.constrain = lambda x, axes: traced.append(runtime.partitioning._traced_auto_mesh() is not None) or \
    constrain(x, axes)

results = {}
for preset, pkg in (("tiny_falcon", transformer), ("tiny_falcon_mamba", ssm)):
    # training: the trainer's own init, jitted onto its state shardings
    plan = plan_lib.plan(preset, mesh_args, mode="training", batch=8, seq_len=16)
    run = load_config(preset, mesh_args + ["data.batch_size=8", "data.seq_len=16", "data.grad_accum=1"])
    setup = prepare(run)
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    batch_bytes = 3 * 4 * setup.batch_sharding.shard_shape((1, 8, 16))[1] * 16
    results[preset + "/training"] = {
        "plan": plan["per_device_bytes"], "params": device0_bytes(state["params"]),
        "optimizer": device0_bytes(state["opt_state"]),
        "compiled_argument_bytes": plan.get("compiled_argument_bytes"), "batch_bytes": batch_bytes,
        "method": plan["activations_method"]}
    # inference: bf16 weights streamed from a checkpoint onto the mesh, and the KV / SSM cache
    model = family_of(run.model).lm(run.model, seed=0)
    path = f"{out_dir}/{preset}"
    pkg.save_pretrained(model, path, max_shard_bytes=100_000)
    traced.clear()  # whether the compiled prefill chunk's layers are traced under the mesh, as the runtime's
    plan = plan_lib.plan(preset, mesh_args, mode="inference", dtype="bfloat16", batch=8, seq_len=32)
    mesh = build_mesh(run.mesh)
    loaded = pkg.from_pretrained(path, mesh=mesh, rules=run.mesh.rules, param_dtype="bfloat16",
                                 compute_dtype="bfloat16")
    cache = loaded.init_state(8, 32)  # split as the runtime splits it on the parameters' mesh
    results[preset + "/inference"] = {"plan": plan["per_device_bytes"],
                                      "params": device0_bytes(nnx.state(loaded, nnx.Param)),
                                      "cache": device0_bytes(cache), "method": plan["activations_method"],
                                      "traced": sorted(set(traced))}
print("RESULT " + json.dumps(results))
'''


def _run(tmp_path, devices: int, mesh_args: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *mesh_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_plan_matches_allocated_bytes(tmp_path):
    """On a data x fsdp x tensor mesh of 8 devices (one device is the same arithmetic with every axis of size 1):
    the planner's parameter, optimizer and cache bytes are those of the arrays the trainer's init, the streaming
    loader and the runtime's init_state create; its prefill chunk is traced under the mesh, as the runtime's."""
    results = _run(tmp_path, 8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    for key, r in results.items():
        plan = r["plan"]
        if key.endswith("/training"):
            assert plan["params"] == r["params"] > 0, key
            assert plan["optimizer"] == r["optimizer"] > 0, key
            assert r["method"].startswith("compiled"), key
            # XLA's own count of the step's arguments: the state the planner sized plus the batch
            assert r["compiled_argument_bytes"] == plan["params"] + plan["optimizer"] + 4 + r["batch_bytes"], key
            assert plan["activations"] > 0 and plan["cache"] == 0
        else:
            assert plan["params"] == r["params"] > 0, key
            assert plan["cache"] == r["cache"] > 0, key
            assert plan["optimizer"] == 0 and plan["activations"] > 0
            assert r["method"].startswith("compiled") and r["traced"] == [True], key
        assert plan["total"] == sum(v for k, v in plan.items() if k != "total")


def test_abstract_mesh_equals_real_mesh_numbers():
    """devices=8 on this 1-device process (AbstractMesh) gives the state bytes a real 8-device mesh gives
    (checked against real arrays above): 1/8 of the fully sharded tiny Falcon Mamba matrices."""
    args = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    one = plan_lib.plan("tiny_falcon_mamba", args, devices=8, batch=8, seq_len=16)
    assert one["devices"] == 8 and one["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert one["activations_method"].startswith("estimate")
    full = plan_lib.plan("tiny_falcon_mamba", ["mesh.data=1"], devices=1, batch=8, seq_len=16, activations="estimate")
    assert one["per_device_bytes"]["params"] < full["per_device_bytes"]["params"] / 2


def test_logits_are_split_over_the_vocab_sharding():
    """The lm_head's vocabulary is sharded over "tensor" (rule 'vocab'), and so are the logits GSPMD computes:
    the head's saved residuals (logits and the cross entropy's) per device shrink with tensor, as the layers'
    d_inner ones do (they were counted whole)."""
    from configs import load_config
    from experiments.plan import tensor_split_sizes

    run = load_config("falcon_mamba_7b", [])
    mesh = type("Mesh", (), {"shape": {"data": 1, "fsdp": 1, "tensor": 8}})
    assert tensor_split_sizes(run.model, mesh, run.mesh.rules) == {65024: 8, 8192: 8, 16384: 8}
    one, eight = (plan_lib.plan("tiny_falcon_mamba", ["mesh.data=1", f"mesh.tensor={t}"], devices=t, batch=1,
                                seq_len=64, activations="estimate")["activations_method"] for t in (1, 8))
    head = [int(text.split(" B lm_head")[0].split()[-1]) for text in (one, eight)]
    assert head[0] - head[1] == 7 * (1 * 64 * 256 * 4) // 8, (one, eight)  # the fp32 logits, now 1/8 a device


def test_cli_json_and_cache_growth(capsys):
    assert plan_lib.main(["falcon_mamba_7b", "mode=inference", "dtype=bfloat16", "devices=1", "batch=1",
                          "seq_len=1048576", "--json"]) == 0
    mamba = json.loads(capsys.readouterr().out)
    assert {"params", "per_device_bytes", "devices"} <= set(mamba)
    assert set(mamba["per_device_bytes"]) >= {"params", "optimizer", "activations", "cache", "total"}
    assert mamba["params"] == 7_272_665_088
    # constant state: 64 layers x (conv 3 x 8192 bf16 + ssm 8192 x 16 fp32) + lengths
    assert mamba["per_device_bytes"]["cache"] == 64 * (3 * 8192 * 2 + 8192 * 16 * 4) + 4
    assert mamba["per_device_bytes"]["total"] < 24 * 10**9      # "runs in 24 GB at any context length"


def test_falcon_kv_cache_grows_with_context():
    small = plan_lib.plan("falcon_7b", [], mode="inference", dtype="bfloat16", devices=1, batch=1, seq_len=1024)
    # 32 layers x k and v x 1024 positions x 1 kv head x 64 dims x 2 bytes + lengths
    assert small["per_device_bytes"]["cache"] == 32 * 2 * 1024 * 64 * 2 + 4


def test_bad_options(capsys):
    with pytest.raises(ConfigError, match=r"^plan option 'mode': expected one of \['training', 'inference'\], "
                                          r"got 'serving'"):
        plan_lib.plan("tiny_falcon", mode="serving")
    with pytest.raises(MeshError, match=r"^mesh: data=3 x fsdp=1 x tensor=1 needs 3 devices, but 8 are available"):
        plan_lib.plan("tiny_falcon", ["mesh.data=3"], devices=8)
    assert plan_lib.main(["tiny_falcon", "bogus"]) == 1
    assert "argument 'bogus': expected key=value" in capsys.readouterr().err
    assert plan_lib.main(["tiny_falcon", "devices=two"]) == 1
    assert "option 'devices': expected an integer, got 'two'" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [0, -5, 2.0, True])
def test_bad_chunk_is_named(chunk):
    """chunk=-5 and chunk=0 were an IndexError in the compiled prefill, chunk=0 with activations=estimate a plan."""
    for activations in ("compiled", "estimate"):
        with pytest.raises(ConfigError, match=rf"^plan option 'chunk': expected a positive integer, got {chunk!r}$"):
            plan_lib.plan("tiny_falcon_mamba", mode="inference", devices=1, chunk=chunk, activations=activations)


def test_chunk_longer_than_the_sequence_is_the_sequence(tmp_path, capsys):
    """Prefill runs a chunk longer than the prompt as one chunk of the prompt: the plan counts that, not the chunk."""
    def planned(chunk):
        return plan_lib.plan("tiny_falcon_mamba", mode="inference", devices=1, seq_len=64, chunk=chunk,
                             activations="estimate")
    assert planned(1000) == planned(64) and "(8, 64) chunk" in planned(1000)["activations_method"]
    assert planned(32)["per_device_bytes"]["activations"] < planned(64)["per_device_bytes"]["activations"]
    assert planned(np.int64(32)) == planned(32)  # a NumPy integer, as prefill's chunk_size takes
    # a bad preset file is one error: line from the command line (yaml's errors were tracebacks)
    (tmp_path / "bad.yaml").write_text("bad: : :\n")
    assert plan_lib.main([str(tmp_path / "bad.yaml")]) == 1
    assert capsys.readouterr().err == (f"error: preset '{tmp_path / 'bad.yaml'}': expected YAML, got mapping values "
                                       "are not allowed here at line 1, column 6\n")


@pytest.mark.parametrize("preset", ["tiny_falcon_mamba", "tiny_falcon"])
def test_remat_estimate_keeps_each_layer_input_and_one_layer_residuals(preset):
    """The estimate without remat grows by one layer's saved residuals per layer; with remat=full by the layer's
    input alone (batch x seq x hidden, fp32 residual stream), plus one layer's residuals for the layer being
    recomputed whatever the depth; remat=dots keeps more than the input and less than everything."""
    from configs import load_config

    hidden = load_config(preset, []).model.hidden_size
    batch, seq = 8, 128

    def activations(remat, layers):
        plan = plan_lib.plan(preset, [f"remat={remat}", f"model.num_hidden_layers={layers}"], devices=1,
                             batch=batch, seq_len=seq, activations="estimate")
        return plan["per_device_bytes"]["activations"]

    none, full, dots = ({layers: activations(remat, layers) for layers in (2, 4)} for remat in ("none", "full", "dots"))
    layer_input = batch * seq * hidden * 4
    assert full[4] - full[2] == 2 * layer_input
    per_layer = (none[4] - none[2]) // 2
    assert per_layer > layer_input
    assert full[2] - none[2] == 2 * layer_input + per_layer - 2 * per_layer   # L inputs + 1 layer vs L layers
    assert 2 * layer_input < dots[4] - dots[2] < 2 * per_layer


# A process of its own: it loads libtpu (experiments/tpu_topology.py), which the test process must not.
TARGET_SCRIPT = r'''
import json
from experiments import plan as plan_lib
mamba = ["data.seq_len=128", "model.num_hidden_layers=3", "mesh.data=2", "mesh.tensor=2"]
def refused(overrides, **options):
    try:
        plan_lib.plan("tiny_falcon_mamba", ["model.num_hidden_layers=1"] + overrides, target="v5p:2x2x1", **options)
    except ValueError as err:
        return type(err).__name__ + ": " + str(err)
print(json.dumps({
    "none": plan_lib.plan("tiny_falcon_mamba", mamba + ["remat=none"], target="v5p:2x2x1"),
    "full": plan_lib.plan("tiny_falcon_mamba", mamba + ["remat=full"], target="v5p:2x2x1"),
    "pallas": plan_lib.plan("tiny_falcon_mamba", mamba + ["remat=none", "model.scan_impl=pallas"],
                            target="v5p:2x2x1"),
    "falcon": plan_lib.plan("tiny_falcon", [], mode="inference", batch=4, seq_len=256, target="v5p:2x2x1"),
    "cpu": plan_lib.plan("tiny_falcon_mamba", mamba + ["remat=none"], devices=4, activations="estimate"),
    "too_big": refused([], batch=4096, seq_len=65536),
    "no_kernel": refused(["model.scan_impl=pallas", "model.intermediate_size=400"]),
}))
'''


@pytest.mark.skipif(libtpu_path() is None,
                    reason="libtpu is not installed (`make test` installs it)")
def test_target_compiles_for_a_tpu_slice():
    """target=v5p:2x2x1 compiles the trainer's step (and a Falcon prefill chunk) for the slice's 4 chips with XLA's
    TPU compiler: it takes the parameters and optimizer state the planner counts (plus the batch, and tile padding),
    and remat=full shrinks the activations, which XLA:CPU's buffer assignment does not show (docs/PLANNING.md).
    scan_impl=pallas compiles the Mosaic kernels inside the step's shard_map (batch on data, d_inner on tensor),
    and they save less than the chunked scan."""
    result = subprocess.run([sys.executable, "-c", TARGET_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    plans = json.loads(result.stdout)
    for plan in plans["none"], plans["full"], plans["pallas"], plans["falcon"]:
        assert plan["device_kind"].startswith("TPU v5") and plan["devices"] == 4, plan
        assert plan["hbm_bytes"] == int(95.74 * 2**30) and plan["activations_method"].startswith("compiled")
        used = plan["per_device_bytes"]
        state = used["params"] + used["optimizer"] + used["cache"]
        # at most what XLA counts: it adds the batch and pads these tiny arrays to (8, 128) tiles (up to 2x here)
        assert state < plan["compiled_argument_bytes"] < 2.5 * state, plan
        # the compiler's peak: the arguments stay live, the temporaries are not all live at once
        assert plan["compiled_argument_bytes"] < plan["compiled_peak_bytes"] < state + used["activations"] + 2**20
    assert plans["none"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert plans["none"]["per_device_bytes"]["params"] == plans["cpu"]["per_device_bytes"]["params"]
    # a step over a chip's HBM: the compiler's figures, one line (it was a traceback)
    assert re.fullmatch(r"DoesNotFit: target v5p:2x2x1: does not fit one chip: XLA's TPU compiler: "
                        r"RESOURCE_EXHAUSTED: .*exceeds available HBM \(95.74G\)\.", plans["too_big"]), plans
    # 400 channels: not on 128 lanes, so the Pallas scan's lowering has no TPU kernel (was a NotImplementedError)
    assert plans["no_kernel"] == ("ConfigError: target v5p:2x2x1: model.scan_impl 'pallas' has no TPU kernel for "
                                  "these channels (it needs d_inner per chip a multiple of 128, or at most 128); "
                                  "use 'chunked'")
    activations = {name: plans[name]["per_device_bytes"]["activations"] for name in ("none", "full", "pallas")}
    assert activations["full"] < 0.9 * activations["none"] and activations["pallas"] < 0.5 * activations["none"]


def test_bad_target_is_named():
    with pytest.raises(ConfigError, match=r"^plan option 'target': topology: expected CHIP:AxB or CHIP:AxBxC with "
                                          r"CHIP one of \['v5e', 'v5p', 'v6e'\] \(e.g. v5p:4x4x4, v6e:2x4\), "
                                          r"got 'v9:2x2'$"):
        plan_lib.plan("tiny_falcon", target="v9:2x2")
    with pytest.raises(ConfigError, match=r"^plan option 'target': topology: expected a 3-D grid of v5p chips \(e\.g\. "
                                          r"v5p:2x2x2\), got 'v5p:4x4'$"):
        plan_lib.plan("tiny_falcon", target="v5p:4x4")
    with pytest.raises(ConfigError, match=r"^plan option 'devices': expected the 64 chips of target v5p:4x4x4 "
                                          r"\(or no devices=\), got 8$"):
        plan_lib.plan("tiny_falcon", devices=8, target="v5p:4x4x4")
