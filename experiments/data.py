"""Training data: deterministic batches addressed by (seed, step), so the iterator position is the step.

``batch_at(config, vocab_size, seed, step)`` returns numpy arrays of shape (grad_accum, batch_size /
grad_accum, seq_len): "inputs" (int32), "targets" (int32, the next tokens) and "mask" (float32, where the
loss counts). TASKS maps a task name (``data.task``) to a function (config, vocab_size, rng, position) -> those
three arrays with a leading batch dimension of batch_size, where rng is seeded by (seed, step) and position is
how many tokens each row has read before the step (the bytes stream's place: with a length curriculum, not
step * seq_len); add a task by adding an entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from configs.schema import ConfigError, DataConfig

Batch = dict[str, np.ndarray]

# Token ids the synthetic tasks reserve; content tokens are drawn from [FIRST_CONTENT_TOKEN, vocab_size).
NOISE_TOKEN = 0        # the filler of selective_copying and mqar (Zoology pads with 0 too)
TRIGGER_TOKEN = 1      # induction heads' special token
SEPARATOR_TOKEN = 2    # the delimiter after which selective_copying's tokens are copied
FIRST_CONTENT_TOKEN = 3


def _shifted(seq: np.ndarray, mask: np.ndarray) -> Batch:
    """Sequences of seq_len + 1 tokens -> inputs, next-token targets and the mask over target positions."""
    return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
            "mask": mask[:, 1:].astype(np.float32)}


def induction_task(config: DataConfig, vocab_size: int, rng: np.random.Generator, position: int) -> Batch:
    """Induction heads as in the Mamba paper (section 4.1.2): seq_len random content tokens, except that the
    special token TRIGGER_TOKEN appears once at a uniformly random position p in [0, seq_len - 3] and again as
    the last input; the answer is the token that followed it at p + 1. The loss is only on that answer
    (the target of the last input position). The trigger never occurs elsewhere in the sequence."""
    if config.seq_len < 3:
        raise ConfigError(f"config field 'data.seq_len': expected >= 3 for data.task 'induction', "
                          f"got {config.seq_len}")
    batch, length = config.batch_size, config.seq_len + 1
    seq = rng.integers(FIRST_CONTENT_TOKEN, vocab_size, size=(batch, length))
    where = rng.integers(0, config.seq_len - 2, size=batch)   # p + 1 <= seq_len - 2 < the final trigger
    rows = np.arange(batch)
    seq[rows, where] = TRIGGER_TOKEN
    seq[:, -2] = TRIGGER_TOKEN
    seq[:, -1] = seq[rows, where + 1]
    mask = np.zeros((batch, length), np.float32)
    mask[:, -1] = 1.0
    return _shifted(seq, mask)


def copy_task(config: DataConfig, vocab_size: int, rng: np.random.Generator, position: int) -> Batch:
    """Plain copying (the Mamba paper's "Copying", Figure 2 left): a random first half, a separator, then the
    first half again; the loss is on the copy. seq_len 1 would leave no token to copy (an empty loss mask)."""
    if config.seq_len < 2:
        raise ConfigError(f"config field 'data.seq_len': expected >= 2 for data.task 'copy' (a token, the separator "
                          f"and its copy), got {config.seq_len}")
    batch, length = config.batch_size, config.seq_len + 1
    half = (length - 1) // 2
    seq = np.full((batch, length), SEPARATOR_TOKEN, np.int64)
    seq[:, :half] = rng.integers(FIRST_CONTENT_TOKEN, vocab_size, size=(batch, half))
    seq[:, half + 1:2 * half + 1] = seq[:, :half]
    mask = np.zeros((batch, length), np.float32)
    mask[:, half + 1:2 * half + 1] = 1.0
    return _shifted(seq, mask)


def selective_copying_task(config: DataConfig, vocab_size: int, rng: np.random.Generator,
                           position: int) -> Batch:
    """Selective copying (Mamba paper, Table 1): num_items content tokens scattered at random positions, in
    order, among NOISE_TOKEN fillers over the first seq_len - num_items positions; then SEPARATOR_TOKEN and the
    content tokens again in order. The loss is on the num_items copied tokens."""
    n = config.num_items
    region = config.seq_len - n  # noise + content; then the separator and the n copied tokens
    if region < n:
        raise ConfigError(f"config field 'data.seq_len': expected >= {2 * n} (2 * data.num_items) for data.task "
                          f"'selective_copying', got {config.seq_len}")
    batch, length = config.batch_size, config.seq_len + 1
    seq = np.full((batch, length), NOISE_TOKEN, np.int64)
    content = rng.integers(FIRST_CONTENT_TOKEN, vocab_size, size=(batch, n))
    positions = np.sort(rng.random((batch, region)).argsort(axis=1)[:, :n], axis=1)
    rows = np.arange(batch)[:, None]
    seq[rows, positions] = content
    seq[:, region] = SEPARATOR_TOKEN
    seq[:, region + 1:] = content
    mask = np.zeros((batch, length), np.float32)
    mask[:, region + 1:] = 1.0
    return _shifted(seq, mask)


def mqar_task(config: DataConfig, vocab_size: int, rng: np.random.Generator, position: int) -> Batch:
    """Multi-query associative recall (Zoology, Arora et al. 2023): num_items key-value pairs k1 v1 k2 v2 ...
    (distinct keys from the lower half of the content tokens, values from the upper half), then every key is
    queried once, in random order, at random positions among NOISE_TOKEN fillers; a query is the key followed by
    its value, and the loss is on the values after the queries."""
    n = config.num_items
    content = vocab_size - FIRST_CONTENT_TOKEN
    n_keys = content // 2
    if n_keys < n:
        raise ConfigError(f"config field 'model.vocab_size': expected >= {FIRST_CONTENT_TOKEN + 2 * n} for "
                          f"data.task 'mqar' with data.num_items {n} (distinct keys), got {vocab_size}")
    batch, length = config.batch_size, config.seq_len + 1
    slots = (length - 2 * n) // 2  # the query region, in (key, value) slots of two tokens
    if slots < n:  # 2n tokens of pairs, then n queries of two tokens: 4n tokens, the last one a target only
        raise ConfigError(f"config field 'data.seq_len': expected >= {4 * n - 1} (4 * data.num_items - 1) for "
                          f"data.task 'mqar', got {config.seq_len}")
    keys = rng.random((batch, n_keys)).argsort(axis=1)[:, :n] + FIRST_CONTENT_TOKEN
    values = rng.integers(FIRST_CONTENT_TOKEN + n_keys, vocab_size, size=(batch, n))
    seq = np.full((batch, length), NOISE_TOKEN, np.int64)
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, values
    rows = np.arange(batch)[:, None]
    order = rng.random((batch, n)).argsort(axis=1)          # which pair each query asks for
    query_slots = np.sort(rng.random((batch, slots)).argsort(axis=1)[:, :n], axis=1)
    at = 2 * n + 2 * query_slots
    seq[rows, at] = keys[rows, order]
    seq[rows, at + 1] = values[rows, order]
    mask = np.zeros((batch, length), np.float32)
    mask[rows, at + 1] = 1.0
    return _shifted(seq, mask)


def _corpus_root(text_dir: str) -> Path:
    """The bytes task's corpus directory: ``text_dir``, or Python's standard library directory where it is empty."""
    return Path(text_dir) if text_dir else Path(os.__file__).parent


def corpus_files(text_dir: str, text_glob: str) -> list[Path]:
    """The files of the bytes task's corpus: those matching ``text_glob`` under _corpus_root(text_dir), sorted by
    name."""
    try:
        return sorted(p for p in _corpus_root(text_dir).glob(text_glob) if p.is_file())
    except (ValueError, NotImplementedError) as err:  # '' or '**x' (ValueError), '/abs/*.py' (NotImplementedError)
        raise ConfigError(f"config field 'data.text_glob': expected a non-empty glob pattern relative to "
                          f"data.text_dir, got {text_glob!r} ({err})") from None


def load_corpus(text_dir: str, text_glob: str) -> np.ndarray:
    """The bytes of corpus_files(text_dir, text_glob), one newline between files, as uint8; remembered for the
    directory and glob (a step does not list the files again): check_data, at the start of a run, reads a corpus
    rewritten since (the files' versions) again."""
    return _load_corpus(text_dir, text_glob)[0]


def _corpus_versions(files: list[Path]) -> tuple:
    return tuple((str(p), _file_version(str(p))) for p in files)


@functools.lru_cache(maxsize=4)
def _load_corpus(text_dir: str, text_glob: str) -> tuple[np.ndarray, tuple]:
    files = corpus_files(text_dir, text_glob)
    if not files:
        raise ConfigError(f"config field 'data.text_dir': expected a directory with files matching "
                          f"{text_glob!r} (data.text_glob), got {str(_corpus_root(text_dir))!r} with none")
    versions = _corpus_versions(files)  # before the files are read: a rewrite while they are is seen next time
    return np.frombuffer(b"\n".join(_read_corpus_file(p) for p in files), np.uint8), versions


def _read_corpus_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:  # unreadable (permissions, an I/O error): was a PermissionError traceback
        raise ConfigError(f"config field 'data.text_dir': expected readable files, got {str(path)!r} "
                          f"({err.strerror or err})") from None


def _reload_rewritten_corpus(text_dir: str, text_glob: str) -> None:
    """Forgets the remembered corpus of text_dir / text_glob where its files changed since it was read (files
    rewritten, added or removed in this process's lifetime: a notebook's second run trained on the old text,
    and a resume compared the old text's size and SHA-256)."""
    if _load_corpus(text_dir, text_glob)[1] != _corpus_versions(corpus_files(text_dir, text_glob)):
        _load_corpus.cache_clear()


def _stream(corpus: np.ndarray, config: DataConfig, position: int, unit: str) -> Batch:
    """Windows of a corpus read sequentially: a step whose rows have each read ``position`` tokens before it
    starts at batch * position, row i at i * seq_len after that, each row one contiguous window; starts wrap around
    modulo the corpus's corpus.size - seq_len window starts, so the last window ends at its last token. A length
    curriculum's shorter steps leave no gap. A corpus of seq_len + 1 tokens is one window, which every row reads.
    The loss counts every token."""
    window = config.seq_len + 1
    if corpus.size < window:
        raise ConfigError(f"config field 'data.seq_len': expected < the corpus size ({corpus.size} {unit}), "
                          f"got {config.seq_len}")
    starts = ((config.batch_size * position + np.arange(config.batch_size) * config.seq_len)
              % (corpus.size - window + 1))
    seq = corpus[starts[:, None] + np.arange(window)[None, :]]
    return _shifted(seq, np.ones(seq.shape, np.float32))


def corpus_size(config: DataConfig) -> int | None:
    """The bytes or tokens task's corpus size (bytes, tokens): where its stream wraps around, and what a resume
    checks (a corpus rewritten under the same name is another stream). None for the synthetic tasks."""
    if config.task == "bytes":
        return int(load_corpus(config.text_dir, config.text_glob).size)
    if config.task == "tokens":
        return int(load_tokens(config.token_file)[0].size)
    return None


def corpus_sha256(config: DataConfig) -> str | None:
    """The SHA-256 of the bytes or tokens task's corpus (the bytes; the token file's ids as stored), what a resume
    checks besides the size (a rewrite of the same size is another stream too). None for the synthetic tasks."""
    if config.task == "bytes":
        return hashlib.sha256(load_corpus(config.text_dir, config.text_glob)).hexdigest()
    if config.task == "tokens":
        load_tokens(config.token_file)  # the file checked (a missing one named) before it is hashed
        return _token_sha256(config.token_file, _file_version(config.token_file))
    return None


def corpus_identity(config: DataConfig) -> dict:
    """What a checkpoint records of the bytes or tokens task's corpus: {"corpus_size", "corpus_sha256"}; {} for
    the synthetic tasks."""
    size = corpus_size(config)
    return {} if size is None else {"corpus_size": size, "corpus_sha256": corpus_sha256(config)}


@functools.lru_cache(maxsize=4)
def _token_sha256(token_file: str, version: tuple[int, int] | None) -> str:
    del version  # in the cache's key only, as for _load_tokens
    tokens, digest, block = load_tokens(token_file)[0], hashlib.sha256(), 1 << 24
    for i in range(0, tokens.size, block):  # blockwise: the memory map is never read whole into memory
        digest.update(np.ascontiguousarray(tokens[i:i + block]))
    return digest.hexdigest()


def stream_windows(config: DataConfig) -> int | None:
    """How many rows the bytes or tokens stream (``_stream``) reads before a window starts again at text an
    earlier row read: the number of held-out sequences its corpus holds. None for the synthetic tasks."""
    size = corpus_size(config)
    if size is None:
        return None
    return -(-(size - config.seq_len) // config.seq_len)  # the starts n * seq_len below the wrap, size - seq_len


def bytes_task(config: DataConfig, vocab_size: int, rng: np.random.Generator, position: int) -> Batch:
    """A byte-level LM stream over the corpus of data.text_dir / data.text_glob (``_stream``)."""
    if vocab_size < 256:
        raise ConfigError(f"config field 'model.vocab_size': expected >= 256 for data.task 'bytes', "
                          f"got {vocab_size}")
    return _stream(load_corpus(config.text_dir, config.text_glob), config, position, "bytes")


def load_tokens(token_file: str) -> tuple[np.ndarray, int, int]:
    """The tokens task's corpus, memory-mapped (pages are read as windows use them), and its smallest and largest
    id (one pass over the file, blockwise; remembered for the file until it is rewritten)."""
    return _load_tokens(token_file, _file_version(token_file))


def _file_version(path: str) -> tuple[int, int] | None:
    """(modification time, size) of a file, what the caches of its contents are keyed by (a rewritten file is read
    again); None where it cannot be read (named by _load_tokens)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _load_tokens(token_file: str, version: tuple[int, int] | None) -> tuple[np.ndarray, int, int]:
    del version  # in the cache's key only: a rewritten file is read again
    if not token_file:
        raise ConfigError("config field 'data.token_file': expected a .npy file of token ids for data.task "
                          "'tokens' (python -m experiments.tokenize_corpus writes one), got ''")
    try:
        tokens = np.load(token_file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"config field 'data.token_file': expected a .npy file of token ids, got "
                          f"{token_file!r} ({err})") from None
    if not isinstance(tokens, np.ndarray):  # an .npz archive loads as an NpzFile of arrays
        tokens.close()
        raise ConfigError(f"config field 'data.token_file': expected a .npy file of token ids, got {token_file!r} "
                          f"(an .npz archive)")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ConfigError(f"config field 'data.token_file': expected a non-empty 1-D array of integer token ids, "
                          f"got {token_file!r} with shape {tokens.shape} and dtype {tokens.dtype}")
    block, low, high = 1 << 24, None, None
    for i in range(0, tokens.size, block):  # each block read once, for its min and its max
        part = np.asarray(tokens[i:i + block])
        low = int(part.min()) if low is None else min(low, int(part.min()))
        high = int(part.max()) if high is None else max(high, int(part.max()))
    return tokens, low, high


def tokens_task(config: DataConfig, vocab_size: int, rng: np.random.Generator, position: int) -> Batch:
    """An LM stream over data.token_file's pre-tokenized ids (``_stream``), every id checked to be in the
    model's vocabulary."""
    return _stream(load_vocab_tokens(config.token_file, vocab_size), config, position, "tokens")


def load_vocab_tokens(token_file: str, vocab_size: int) -> np.ndarray:
    """``load_tokens``' memory-mapped ids, checked to be in a model's vocabulary [0, vocab_size)."""
    tokens, low, high = load_tokens(token_file)
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"config field 'data.token_file': expected token ids in [0, {vocab_size}) "
                          f"(model.vocab_size), got ids from {low} to {high} in {token_file!r}")
    return tokens


TASKS: dict[str, Callable[[DataConfig, int, np.random.Generator, int], Batch]] = {
    "induction": induction_task,
    "copy": copy_task,
    "selective_copying": selective_copying_task,
    "mqar": mqar_task,
    "bytes": bytes_task,
    "tokens": tokens_task,
}


def check_data(config: DataConfig, vocab_size: int) -> None:
    """Every sequence length the run reads (data.seq_len, each length_curriculum stage) makes a batch of its
    task: a task's limits are met before step 0, not at the step a curriculum stage starts; a stage that fails is
    named. One row per microbatch is generated at each length. A bytes corpus rewritten since this process read
    it is read again."""
    if config.task == "bytes":
        with contextlib.suppress(ConfigError):  # no such files, a bad glob: named by batch_at, after the vocabulary
            _reload_rewritten_corpus(config.text_dir, config.text_glob)
    one_row = dataclasses.replace(config, batch_size=config.grad_accum, length_curriculum=())
    batch_at(one_row, vocab_size, 0, 0)
    for i, (length, _) in enumerate(config.length_curriculum):
        try:
            batch_at(dataclasses.replace(one_row, seq_len=length), vocab_size, 0, 0)
        except ConfigError as err:
            raise ConfigError(f"config field 'data.length_curriculum[{i}]': stage length {length} fails the "
                              f"task's check: {err}") from None


def batch_at(config: DataConfig, vocab_size: int, seed: int, step: int) -> Batch:
    """The batch of training step ``step`` (0-based), shaped (grad_accum, batch_size / grad_accum, length) with
    length = config.seq_len_at(step) (data.seq_len unless a length_curriculum stage covers the step)."""
    if config.task not in TASKS:
        raise ConfigError(f"config field 'data.task': expected one of {sorted(TASKS)}, got {config.task!r}")
    if vocab_size <= FIRST_CONTENT_TOKEN:
        raise ConfigError(f"config field 'model.vocab_size': expected > {FIRST_CONTENT_TOKEN} for training "
                          f"data, got {vocab_size}")
    length = config.seq_len_at(step)
    config_at_step = config
    if length != config.seq_len:
        config_at_step = dataclasses.replace(config, seq_len=length, length_curriculum=())
    rng = np.random.default_rng([seed, step])
    position = config.positions_before(step)
    batch = TASKS[config.task](config_at_step, vocab_size, rng, position)
    micro = config.batch_size // config.grad_accum
    return {name: array.reshape(config.grad_accum, micro, length) for name, array in batch.items()}
