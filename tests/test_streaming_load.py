"""Streaming sharded load: a multi-shard checkpoint goes tensor by tensor from memory maps into sharded
device arrays on an 8-device mesh, with peak host memory well under twice the checkpoint size; checkpoints
that do not fit the config or the mesh fail naming the tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV8 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")

# ~240 MB fp32 Falcon (vocab 16384, hidden 1024, 4 layers): 59.3M parameters.
# Grouped kv heads (the falcon-40b layout): its attention splits over tensor (multi-query attention would stay
# replicated there, transformer/sharding.py).
BIG = ["model.vocab_size=16384", "model.hidden_size=1024", "model.num_hidden_layers=4",
       "model.num_attention_heads=16", "model.multi_query=false", "model.new_decoder_architecture=true",
       "model.num_kv_heads=4"]

WRITE = r'''
import sys
from configs import load_config
from experiments.models import build_model
import transformer
run = load_config("tiny_falcon", sys.argv[2:])
transformer.save_pretrained(build_model(run.model, seed=0), sys.argv[1], max_shard_bytes=64 * 2**20)
'''

# Measures the growth of this process's peak RSS across the load (ru_maxrss: the high-water mark, which
# counts mapped checkpoint pages while they are resident, and the CPU "device" buffers, which live in host
# memory here). fsdp=4 x tensor=2 splits every matrix over all 8 devices, so the loaded model itself holds
# ~1x the checkpoint; the loader must add little on top.
LOAD = r'''
import json, resource, sys
import jax, numpy as np
from flax import nnx
from configs import MeshConfig
from experiments.mesh import build_mesh
import transformer
mesh_config = MeshConfig(data=1, fsdp=4, tensor=2)
mesh = build_mesh(mesh_config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = transformer.from_pretrained(sys.argv[1], mesh=mesh, rules=mesh_config.rules)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
device_bytes = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
spec = str(model.h[0].mlp.dense_h_to_4h.kernel.get_value().sharding.spec)
print("RESULT " + json.dumps({"before": before, "growth": after - before, "device_bytes": device_bytes,
                              "spec": spec, "n_devices": len(jax.devices())}))
# after the measurement: each device read its own slice (the values of a load onto one device)
plain = transformer.from_pretrained(sys.argv[1])
for (path, sharded), whole in zip(jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0],
                                  jax.tree.leaves(nnx.state(plain, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole), err_msg=jax.tree_util.keystr(path))
print("VALUES EQUAL")
'''


def _python(code: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env or ENV8, capture_output=True,
                          text=True, timeout=300)


def test_streamed_sharded_load_peak_memory(tmp_path):
    path = tmp_path / "big"
    proc = _python(WRITE, str(path), *BIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) >= 4 and (path / "model.safetensors.index.json").is_file()
    size = sum(p.stat().st_size for p in shards)
    assert size > 200 * 2**20
    proc = _python(LOAD, str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    print(f"checkpoint {size / 2**20:.0f} MiB, peak RSS growth {result['growth'] / 2**20:.0f} MiB "
          f"({result['growth'] / size:.2f}x), device arrays {result['device_bytes'] / 2**20:.0f} MiB")
    assert result["n_devices"] == 8 and result["spec"] == "P('fsdp', 'tensor')" and "VALUES EQUAL" in proc.stdout
    assert result["device_bytes"] < 1.01 * size            # every matrix split over the 8 devices
    assert result["growth"] < 1.35 * size, (result, size)   # the model (~1x) plus little: well under 2x


CHECKS = r'''
import json, sys
import jax, numpy as np
from flax import nnx
from configs import MeshConfig
from experiments.mesh import build_mesh
from runtime.safetensors_io import CheckpointError
import ssm
out = {}
mesh_config = MeshConfig(data=1, fsdp=1, tensor=8)
try:
    ssm.from_pretrained(sys.argv[1], mesh=build_mesh(mesh_config), rules=mesh_config.rules)
except CheckpointError as err:
    out["mesh"] = str(err)
# shardings of a higher rank than a parameter (an IndexError inside JAX before)
too_long = jax.sharding.NamedSharding(build_mesh(mesh_config), jax.sharding.PartitionSpec(None, None, "tensor"))
try:
    ssm.from_pretrained(sys.argv[1], shardings=lambda path: too_long)
except CheckpointError as err:
    out["rank"] = str(err)
# a mesh it fits: each device reads its own slice (in_proj's x and z halves too), the values of a plain load
mesh_config = MeshConfig(data=1, fsdp=4, tensor=2)
sharded = ssm.from_pretrained(sys.argv[1], mesh=build_mesh(mesh_config), rules=mesh_config.rules)
whole = jax.tree.leaves(nnx.state(ssm.from_pretrained(sys.argv[1]), nnx.Param))
out["differ"] = [jax.tree_util.keystr(path) for (path, value), want
                 in zip(jax.tree_util.tree_flatten_with_path(nnx.state(sharded, nnx.Param))[0], whole)
                 if not np.array_equal(np.asarray(value), np.asarray(want))]
print("RESULT " + json.dumps(out))
'''


def _tiny_mamba(tmp_path, overrides=()):
    import ssm
    from configs import load_config
    from experiments.models import build_model
    config = load_config("tiny_falcon_mamba", list(overrides)).model
    path = tmp_path / "ck"
    ssm.save_pretrained(build_model(config, seed=0), path, max_shard_bytes=40_000)
    return path


def test_sharded_load_reads_each_slice_and_a_misfit_mesh_names_tensor(tmp_path):
    path = _tiny_mamba(tmp_path, ["model.vocab_size=260"])   # 260 rows do not split over tensor=8
    proc = _python(CHECKS, str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert "'backbone.embeddings.weight'" in result["mesh"] and "tensor=8" in result["mesh"], result
    assert "does not fit the mesh sharding" in result["rank"], result
    assert result["differ"] == []


def test_checkpoint_not_fitting_config_names_tensor(tmp_path):
    import ssm
    from runtime.safetensors_io import CheckpointError
    path = _tiny_mamba(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'backbone\.layers\.0\.mixer\.in_proj\.weight' has shape \(256, 64\)"):
        ssm.from_pretrained(path)


def test_streaming_round_trip_single_device_and_shardings(tmp_path):
    """Default placement, explicit shardings, and the export stream give back the same tensors."""
    import jax
    from flax import nnx

    import ssm
    from experiments.mesh import build_mesh, flatten_params, param_shardings
    from runtime.safetensors_io import open_checkpoint
    from configs import MeshConfig
    path = _tiny_mamba(tmp_path)
    assert len(list(path.glob("*.safetensors"))) > 2
    model = ssm.from_pretrained(path)
    flat, _ = flatten_params(nnx.state(model, nnx.Param))
    mesh = build_mesh(MeshConfig())
    again = ssm.from_pretrained(path, shardings=param_shardings(flat, ssm.sharding.PARAM_AXES, mesh,
                                                                  MeshConfig().rules))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ssm.save_pretrained(again, tmp_path / "out", max_shard_bytes=40_000)
    original, written = open_checkpoint(path), open_checkpoint(tmp_path / "out")
    assert sorted(original) == sorted(written)
    for name in original:
        np.testing.assert_array_equal(original[name], written[name])


def _safetensors_bytes(header) -> bytes:
    if isinstance(header, int):  # a header length alone, the header itself missing
        return header.to_bytes(8, "little")
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded


@pytest.mark.parametrize("header, message", [
    (b"{not json", "its header is not JSON"),                        # a JSONDecodeError before
    (["a", "list"], "expected a JSON object as the header, got a list"),  # a TypeError in dict.pop
    ({"w": {"dtype": "F32", "shape": [2]}}, r"tensor 'w': expected a header entry"),  # KeyError 'data_offsets'
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, r"tensor 'w': expected a header entry"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, r"tensor 'w' ends at byte \d+, past the end"),
    ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, r"tensor 'w' has unsupported dtype \['F32'\]"),
    ({"w": {"dtype": "F32", "shape": [2**32, 2**32, 4], "data_offsets": [0, 0]}}, r"tensor 'w' has 0 bytes, its "
     r"shape \(4294967296, 4294967296, 4\) and dtype F32 need 295147905179352825856"),  # int64 product wrapped to 0
    (100, r"truncated: a header of 100 bytes, 8 follow"),  # read as "its header is not JSON"
    # offsets the safetensors library refuses were read: tensors sharing bytes, a gap, bytes past the last tensor
    ({"v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {"dtype": "F32", "shape": [2],
                                                                          "data_offsets": [0, 8]}},
     r"tensor 'w' starts at data byte 0, expected 8 \(right after tensor 'v'"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, r"tensor 'w' starts at data byte 4, expected 0"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, r"its tensors end at byte \d+, the file has"),
])
def test_malformed_safetensors_files_are_named(tmp_path, header, message):
    """Both readers (memory-mapped and lazy) raise CheckpointError naming the file (and the tensor)."""
    from runtime.safetensors_io import CheckpointError, lazy_tensors, open_tensors

    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header) + bytes(8))
    for read in (open_tensors, lazy_tensors):
        with pytest.raises(CheckpointError, match=rf"^'{path}': .*{message}"):
            read(path)


def test_write_checkpoint_keeps_every_shard_under_the_limit_and_indexes_it(tmp_path):
    """Shards hold at most max_shard_bytes of tensor data (a tensor larger than that alone); the index maps every
    tensor to its file and records the total size."""
    from runtime.safetensors_io import open_checkpoint, open_tensors, write_checkpoint

    arrays = {f"t{i}": np.full((n,), i, np.float32) for i, n in enumerate([10, 10, 10, 30, 5, 5])}  # 40-120 bytes
    write_checkpoint(tmp_path, iter(arrays.items()), max_shard_bytes=80)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == 4
    for name in files:
        tensors = open_tensors(tmp_path / name)
        assert sum(t.nbytes for t in tensors.values()) <= 80 or len(tensors) == 1, (name, list(tensors))
        assert all(index["weight_map"][t] == name for t in tensors)
    loaded = open_checkpoint(tmp_path)
    assert sorted(loaded) == sorted(arrays) and all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    # saved again with fewer shards, then whole: no shard of an earlier save is left beside the new files
    write_checkpoint(tmp_path, iter(arrays.items()), max_shard_bytes=200)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"model-0000{i}-of-00002.safetensors"
                                                                      for i in (1, 2)]
    write_checkpoint(tmp_path, iter(arrays.items()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_load_converts_to_the_parameter_dtype(tmp_path):
    """Tensors are stored in the checkpoint's dtype and loaded in the config's param_dtype, both ways (a bf16
    checkpoint such as falcon-mamba-7b's loads as fp32 master weights by default)."""
    import jax
    from flax import nnx

    import ssm
    path = _tiny_mamba(tmp_path)
    for dtype, expected in (("bfloat16", "bfloat16"), ("float32", "float32")):
        model = ssm.from_pretrained(path, param_dtype=dtype)
        assert {str(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {expected}, dtype
    bf16 = tmp_path / "bf16"
    ssm.save_pretrained(ssm.from_pretrained(path, param_dtype="bfloat16"), bf16)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(nnx.state(ssm.from_pretrained(bf16), nnx.Param))} == \
        {"float32"}


def test_checkpoints_that_would_load_silently_wrong_are_refused(tmp_path):
    """An integer tensor (loaded as a float of its integers), a tensor in two files (the last one replaced the
    other), an index naming a shard outside its directory, or an index that is not a weight_map: each named."""
    import ssm
    from runtime.safetensors_io import CheckpointError, open_checkpoint, write_file

    path = _tiny_mamba(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "backbone.layers.0.mixer.D"
    shard = path / index["weight_map"][name]
    tensors = dict(open_checkpoint(path))
    original = {k: np.array(v) for k, v in tensors.items() if index["weight_map"][k] == shard.name}
    write_file(shard, {**original, name: original[name].astype(np.int32)})
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype int32, expected a floating point dtype"):
        ssm.from_pretrained(path)
    write_file(shard, original)
    ssm.from_pretrained(path)  # restored: loads

    dup = tmp_path / "dup"
    ssm.save_pretrained(ssm.from_pretrained(path), dup)  # one model.safetensors: no index
    write_file(dup / "extra.safetensors", {name: np.full_like(original[name], 123.0)})
    (dup / "model.safetensors").rename(dup / "a.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is in both 'a.safetensors' and 'extra.safetensors'"):
        ssm.from_pretrained(dup)

    index_path = path / "model.safetensors.index.json"
    for weight_map, message in (({name: "../dup/extra.safetensors"}, r"expected shard file names in its directory"),
                                ([1, 2], r"expected weight_map to map tensor names to shard file names, got list")):
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            ssm.from_pretrained(path)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index.json': expected a JSON object with a weight_map"):
        ssm.from_pretrained(path)


def test_writers_refuse_duplicate_names_and_bad_shard_sizes(tmp_path):
    from runtime.safetensors_io import CheckpointError, write_checkpoint, write_file

    pair = [("w", np.zeros(2, np.float32)), ("w", np.ones(2, np.float32))]
    with pytest.raises(CheckpointError, match="tensor 'w': given twice"):
        write_checkpoint(tmp_path / "a", iter(pair))
    with pytest.raises(CheckpointError, match="tensor 'w': given twice"):
        write_file(tmp_path / "b.safetensors", pair)
    for bad in (0, -1, "x", 2.5):
        with pytest.raises(ValueError, match=rf"max_shard_bytes: expected a positive integer, got {bad!r}"):
            write_checkpoint(tmp_path / "c", iter(pair[:1]), max_shard_bytes=bad)
    assert not list((tmp_path / "a").glob("*")), "a refused write leaves no file behind"


def test_placement_arguments_are_checked(tmp_path):
    """from_pretrained's mesh / shardings: a non-mesh, both at once (mesh was ignored), a callable returning no
    Sharding: each named instead of an AttributeError from inside JAX."""
    from jax.sharding import NamedSharding, PartitionSpec

    import ssm
    from configs import MeshConfig
    from experiments.mesh import build_mesh
    from runtime.partitioning import MeshError
    from runtime.safetensors_io import CheckpointError

    path = _tiny_mamba(tmp_path)
    mesh = build_mesh(MeshConfig())
    with pytest.raises(MeshError, match=r"mesh: expected a jax.sharding.Mesh, got 'tensor'"):
        ssm.from_pretrained(path, mesh="tensor")
    with pytest.raises(CheckpointError, match=r"mesh, shardings: expected at most one of them"):
        ssm.from_pretrained(path, mesh=mesh, shardings=lambda p: None)
    with pytest.raises(CheckpointError, match=r"expected a jax.sharding.Sharding from shardings, got 'x'"):
        ssm.from_pretrained(path, shardings=lambda p: "x")
    ssm.from_pretrained(path, shardings=lambda p: NamedSharding(mesh, PartitionSpec()))
