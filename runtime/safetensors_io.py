"""Reading and writing safetensors files with NumPy memory maps (bf16 through ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. Reading maps the file and returns views, so a tensor is paged in only when used and
host memory never has to hold a whole checkpoint. Nothing in a file is executed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from runtime.checks import check_positive_int, is_integer
from runtime.files import write_text_atomic

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
        raw = fh.read(size)
        if len(raw) != size:
            raise CheckpointError(f"{str(path)!r}: not a safetensors file (truncated: a header of {size} bytes, "
                                  f"{len(raw)} follow)")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{str(path)!r}: not a safetensors file (its header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: not a safetensors file (expected a JSON object as the header, got "
                              f"a {type(header).__name__})")
    header.pop("__metadata__", None)
    return header, 8 + size


def _entry(path, name: str, info: dict, start: int, file_size: int) -> tuple[np.dtype, int, int, tuple[int, ...]]:
    """A header entry's (dtype, begin, end, shape), checked: its fields, a known dtype, a byte count equal to the
    shape's, an end within the file (whose data section starts at ``start``)."""
    def count(value) -> bool:
        return is_integer(value) and value >= 0

    if not (isinstance(info, dict) and isinstance(info.get("shape"), list) and all(map(count, info["shape"]))
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and all(map(count, info["data_offsets"])) and info["data_offsets"][0] <= info["data_offsets"][1]):
        raise CheckpointError(f"{str(path)!r}: tensor {name!r}: expected a header entry {{dtype, shape: [sizes], "
                              f"data_offsets: [begin, end]}}, got {info!r}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None  # a list: unhashable
    if dtype is None:
        raise CheckpointError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod in int64 wrapped to 0 (or overflowed)
    if end - begin != expected:
        raise CheckpointError(f"{str(path)!r}: tensor {name!r} has {end - begin} bytes, its shape {shape} "
                              f"and dtype {info['dtype']} need {expected}")
    if start + end > file_size:
        raise CheckpointError(f"{str(path)!r}: tensor {name!r} ends at byte {start + end}, past the end of the "
                              f"file ({file_size} bytes)")
    return dtype, begin, end, shape


def _entries(path, header: dict, start: int, file_size: int) -> dict[str, tuple[np.dtype, int, int, tuple[int, ...]]]:
    """name -> (dtype, begin, end, shape) of every header entry (``_entry``), checked to tile the data section as
    the safetensors library requires: in offset order, each tensor starts where the previous one ends, the first
    at 0 and the last at the end of the file (overlapping tensors read each other's bytes silently)."""
    entries = {name: _entry(path, name, info, start, file_size) for name, info in header.items()}
    expected, previous = 0, None
    for name, (_, begin, end, _) in sorted(entries.items(), key=lambda item: item[1][1:3]):
        if begin != expected:
            after = f"right after tensor {previous!r}" if previous is not None else "the start of the data"
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} starts at data byte {begin}, expected {expected} "
                                  f"({after}: tensors tile the data section without overlap or gap)")
        expected, previous = end, name
    if start + expected != file_size:
        raise CheckpointError(f"{str(path)!r}: its tensors end at byte {start + expected}, the file has "
                              f"{file_size} bytes (a safetensors data section holds the tensors and nothing else)")
    return entries


def open_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped array for every tensor of one safetensors file."""
    header, start = read_header(path)
    entries = _entries(path, header, start, Path(path).stat().st_size)
    if not header:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: mapped[start + begin:start + end].view(dtype).reshape(shape)
            for name, (dtype, begin, end, shape) in entries.items()}


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors (streamed one at a time) to ``path`` atomically (temporary file, then rename)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, array in items:
        if name in header:
            raise CheckpointError(f"tensor {name!r}: given twice")
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
    """The safetensors files of a HF directory: model.safetensors, else the shards its index lists (transformers'
    order: its save_pretrained leaves a stale index beside a single file saved over shards)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if single.is_file():
        yield single
    elif index.is_file():
        for shard in _index_shards(index):
            if not (directory / shard).is_file():
                raise CheckpointError(f"{str(index)!r} lists shard {shard!r}, which is missing")
            yield directory / shard
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        if found:
            yield from (directory / name for name in found)
        else:
            raise CheckpointError(f"{str(directory)!r}: no model.safetensors, index or *.safetensors file")


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index's weight_map lists: plain names of files beside the index."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{str(index)!r}: expected a JSON object with a weight_map, got unreadable "
                              f"JSON or another value ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{str(index)!r}: expected weight_map to map tensor names to shard file names, got "
                              f"{type(weight_map).__name__}")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
    if outside:  # a shard elsewhere (../other/model.safetensors) would be read from outside the directory
        raise CheckpointError(f"{str(index)!r}: expected shard file names in its directory, got {outside}")
    return shards


def _from_every_file(directory: str | Path, read) -> dict:
    """name -> read(path)[name] over every file of a HF checkpoint directory; a name in two files is refused
    (one would silently replace the other)."""
    tensors: dict = {}
    where: dict[str, Path] = {}
    for path in iter_checkpoint_files(directory):
        found = read(path)
        for name in found:
            if name in where:
                raise CheckpointError(f"{str(directory)!r}: tensor {name!r} is in both {where[name].name!r} and "
                                      f"{path.name!r}")
            where[name] = path
        tensors.update(found)
    return tensors


def open_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped array over every file of a HF checkpoint directory."""
    return _from_every_file(directory, open_tensors)


class LazyTensor:
    """One tensor of a safetensors file, not yet mapped: its name, dtype, shape and byte range.

    ``open()`` memory-maps this tensor alone (np.memmap with an offset); dropping the returned array unmaps it,
    so a loader that handles one tensor at a time keeps at most that tensor's pages resident."""

    __slots__ = ("path", "name", "dtype", "shape", "offset")

    def __init__(self, path: Path, name: str, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.path, self.name, self.dtype, self.shape, self.offset = path, name, dtype, shape, offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def open(self) -> np.ndarray:
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)

    def __array__(self, dtype=None, copy=None):
        array = np.array(self.open(), copy=True)
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, {self.dtype}, {self.shape}, {str(self.path)!r})"


def lazy_tensors(path: str | Path) -> dict[str, LazyTensor]:
    """name -> LazyTensor for every tensor of one safetensors file (only the header is read)."""
    path = Path(path)
    header, start = read_header(path)
    return {name: LazyTensor(path, name, dtype, shape, start + begin)
            for name, (dtype, begin, _, shape) in _entries(path, header, start, path.stat().st_size).items()}


def open_checkpoint_lazy(directory: str | Path) -> dict[str, LazyTensor]:
    """name -> LazyTensor over every file of a HF checkpoint directory (headers only; nothing is mapped)."""
    return _from_every_file(directory, lazy_tensors)


class _ShardWriter:
    """Appends tensors' bytes to a data file as they come; ``finish`` writes header + data to ``path``.

    Host memory holds one tensor at a time; the data section is copied once, in 64 MiB blocks."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = Path(f"{path}.data-{os.getpid()}")
        self.fh = open(self.data_path, "wb")
        self.header: dict = {"__metadata__": {"format": "pt"}}
        self.size = 0
        self.names: list[tuple[str, int]] = []

    def add(self, name: str, array: np.ndarray) -> None:
        dtype = np.dtype(array.dtype)
        if dtype not in NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
        array = np.ascontiguousarray(array)
        self.header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape),
                             "data_offsets": [self.size, self.size + array.nbytes]}
        self.fh.write(memoryview(array.reshape(-1).view(np.uint8)) if array.size else b"")
        self.size += array.nbytes
        self.names.append((name, array.nbytes))

    def finish(self) -> None:
        self.fh.close()
        encoded = json.dumps(self.header, separators=(",", ":")).encode()
        encoded += b" " * ((-len(encoded)) % 8)  # keep the data section 8-byte aligned
        tmp = Path(f"{self.path}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as out, open(self.data_path, "rb") as data:
                out.write(struct.pack("<Q", len(encoded)))
                out.write(encoded)
                while block := data.read(64 * 2**20):
                    out.write(block)
            os.replace(tmp, self.path)
        finally:
            self.data_path.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)


def write_checkpoint(directory: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes model.safetensors, or shards plus model.safetensors.index.json past ``max_shard_bytes``.

    Streams: each tensor is written to disk as it comes from the iterator and then dropped, so host memory
    holds one tensor at a time whatever the checkpoint size. Shards are written under temporary names and
    renamed once their count is known; every file is replaced atomically."""
    check_positive_int("max_shard_bytes", max_shard_bytes)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    done: list[_ShardWriter] = []
    current: _ShardWriter | None = None
    names: set[str] = set()
    try:
        for name, array in tensors:
            if name in names:  # the index would map it to one shard, the other copy unreachable
                raise CheckpointError(f"tensor {name!r}: given twice")
            names.add(name)
            if current is not None and current.size and current.size + array.nbytes > max_shard_bytes:
                current.finish()
                done.append(current)
                current = None
            if current is None:
                current = _ShardWriter(directory / f"shard-{len(done) + 1:05d}.safetensors.part-{pid}")
            current.add(name, array)
            del array
        if current is None:
            current = _ShardWriter(directory / f"shard-00001.safetensors.part-{pid}")
        current.finish()
        done.append(current)
    except BaseException:
        for writer in done + ([current] if current is not None else []):
            if not writer.fh.closed:
                writer.fh.close()
            writer.data_path.unlink(missing_ok=True)
            writer.path.unlink(missing_ok=True)
        raise
    if len(done) == 1:
        os.replace(done[0].path, directory / "model.safetensors")
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
        _remove_stale_shards(directory, set())
        return
    weight_map, total = {}, 0
    for i, writer in enumerate(done):
        file_name = f"model-{i + 1:05d}-of-{len(done):05d}.safetensors"
        os.replace(writer.path, directory / file_name)
        for name, nbytes in writer.names:
            weight_map[name] = file_name
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
    (directory / "model.safetensors").unlink(missing_ok=True)
    _remove_stale_shards(directory, set(weight_map.values()))


def _remove_stale_shards(directory: Path, kept: set[str]) -> None:
    """Deletes the shards (model-NNNNN-of-NNNNN.safetensors) of an earlier save that this one did not write: a
    save into a directory that held more shards left the old ones beside the new index."""
    for shard in directory.glob("model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"):
        if shard.name not in kept:
            shard.unlink(missing_ok=True)
