"""Reading and writing safetensors files with NumPy memory maps (bf16 through ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. Reading maps the file and returns views, so a tensor is paged in only when used and
host memory never has to hold a whole checkpoint. Nothing in a file is executed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a misshapen one, or is not a valid safetensors file."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{str(path)!r}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise CheckpointError(f"{str(path)!r}: not a safetensors file (header of {size} bytes)")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def open_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped array for every tensor of one safetensors file."""
    header, start = read_header(path)
    if not header:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has {end - begin} bytes, its shape {shape} "
                                  f"and dtype {info['dtype']} need {expected}")
        tensors[name] = mapped[start + begin:start + end].view(dtype).reshape(shape)
    return tensors


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors (streamed one at a time) to ``path`` atomically (temporary file, then rename)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, array in items:
        dtype = np.dtype(array.dtype)
        if dtype not in NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * ((-len(encoded)) % 8)  # keep the data section 8-byte aligned
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for _, array in items:
            fh.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)


def iter_checkpoint_files(directory: str | Path) -> Iterator[Path]:
    """The safetensors files of a HF directory: model.safetensors, or the shards its index lists."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        with open(index) as fh:
            weight_map = json.load(fh).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{str(index)!r} lists shard {shard!r}, which is missing")
            yield directory / shard
    elif single.is_file():
        yield single
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        if found:
            yield from (directory / name for name in found)
        else:
            raise CheckpointError(f"{str(directory)!r}: no model.safetensors, index or *.safetensors file")


def open_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped array over every file of a HF checkpoint directory."""
    tensors: dict[str, np.ndarray] = {}
    for path in iter_checkpoint_files(directory):
        tensors.update(open_tensors(path))
    return tensors


def write_checkpoint(directory: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes model.safetensors, or shards plus model.safetensors.index.json past ``max_shard_bytes``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, array in tensors:
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, array))
        size += array.nbytes
    if len(shards) == 1:
        write_file(directory / "model.safetensors", shards[0])
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(directory / file_name, shard)
        for name, array in shard:
            weight_map[name] = file_name
            total += array.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = directory / "model.safetensors.index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory / "model.safetensors.index.json")
    (directory / "model.safetensors").unlink(missing_ok=True)
