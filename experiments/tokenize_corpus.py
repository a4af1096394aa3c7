"""Tokenizes local text files into the .npy of token ids that data.task=tokens trains on.

    python -m experiments.tokenize_corpus TOKENIZER --text-dir DIR [--glob "*.txt"] --out tokens.npy [--eos ID]
    python -m experiments.tokenize_corpus path/to/falcon-mamba-7b --text-dir my_corpus --out runs/tokens.npy

TOKENIZER is a tokenizer.json (the `tokenizers` package) or a Hugging Face directory holding one. The files
matching --glob under --text-dir are read as UTF-8 in name order, line ends as they are ("\r\n" is not made
"\n"), less a byte order mark at a file's start; each becomes its text's ids (without the tokenizer's own
special tokens, such as a post-processor's BOS: Falcon's adds none; nor padded or truncated, whatever the
tokenizer.json sets) followed by the end-of-sequence id: --eos, or by default the directory's config.json
eos_token_id (the first of several). The ids go to --out as a 1-D uint16 array where the vocabulary fits 16 bits
(uint32 otherwise), streamed through a temporary file and renamed into place when complete.

Memory stays bounded for files of any size: a file is read and encoded in pieces of about PIECE_CHARS characters
(one piece per CPU at a time, by the tokenizer's threads), cut at the start of a line that begins with a non-space
character, and only where encoding the text around the cut in one go (CUT_CHECK_CHARS each side, all of them
read) gives the same ids as encoding its two sides apart (true of byte-level BPE tokenizers such as Falcon's).
Where the last CUT_TRIES line starts of a piece all fail that check, the piece grows by another PIECE_CHARS and
is tried again: a tokenizer whose ids change at every line start gets each file encoded whole.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from configs.schema import ConfigError, is_int
from experiments.cli import check_output_file

BLOCK = 1 << 24  # tokens copied at a time from the temporary file into the .npy
PIECE_CHARS = 1 << 20  # characters read and encoded at a time
CUT_CHECK_CHARS = 1 << 12  # characters each side of a cut encoded together to check the cut changes no id
CUT_TRIES = 8  # line starts tried, from a piece's end backwards, before the piece grows


def load_tokenizer(path: Path):
    """(Tokenizer, config.json's first eos_token_id or None) of a tokenizer.json or a directory holding one; its
    padding and truncation, if the file sets any, turned off."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"tokenizer: expected a tokenizer.json or a directory holding one, got {str(path)!r}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - the tokenizers package raises a bare Exception for a bad file
        raise ValueError(f"tokenizer: expected a tokenizer.json of the tokenizers package, got {str(file)!r}: "
                         f"{err}") from None
    # a tokenizer.json may carry padding and truncation settings (made for model inputs): a corpus is encoded
    # whole, so a piece is neither padded to the longest of its batch (encode_batch) nor cut at max_length
    tokenizer.no_padding()
    tokenizer.no_truncation()
    eos = None
    if path.is_dir() and (path / "config.json").is_file():
        from configs.hf import read_json

        eos = read_json(path).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
    return tokenizer, eos


def id_bound(tokenizer) -> int:
    """One more than the largest id the tokenizer gives: its vocabulary size, or more where its ids leave gaps (a
    tokenizer.json may number its tokens, added ones too, with holes; get_vocab_size counts them)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def find_cut(tokenizer, text: str) -> int | None:
    """The last of the last CUT_TRIES positions in ``text`` where a line begins with a non-space character at which
    the ids of the text around it are the same encoded in one go as apart; None where there is none."""
    # a cut needs CUT_CHECK_CHARS read after it: a check cut short by the end of the text read so far can pass where
    # the rest of the line, not read yet, would merge across the cut
    end = max(len(text) - CUT_CHECK_CHARS, 0)
    for _ in range(CUT_TRIES):
        while (newline := text.rfind("\n", 0, end)) >= 0 and not text[newline + 1:newline + 2].strip():
            # a line that begins with a space (or an empty one) does not start a piece, nor does a newline that
            # ends the text (what follows it is not read yet): the line starts before it are tried
            end = newline
        if newline < 0:
            return None
        cut, end = newline + 1, newline
        left, right = text[max(cut - CUT_CHECK_CHARS, 0):cut], text[cut:cut + CUT_CHECK_CHARS]
        if encode(tokenizer, left + right) == encode(tokenizer, left) + encode(tokenizer, right):
            return cut
    return None


def encode_pieces(tokenizer, file: Path, piece_chars: int = PIECE_CHARS,
                  parallel: int | None = None) -> Iterator[list[int]]:
    """The ids of ``file``'s text, piece by piece (see the module docstring): their concatenation is the ids of
    the whole text, encoded without special tokens. ``parallel`` pieces (default: one per CPU) are encoded at a
    time, by the tokenizer's threads."""
    parallel = parallel or os.cpu_count() or 1
    pieces, text = [], ""

    def encoded():
        yield from (encoding.ids for encoding in tokenizer.encode_batch(pieces, add_special_tokens=False))
        pieces.clear()

    try:
        # the text as it is ("\r\n" and "\r" kept), less a UTF-8 byte order mark at the file's start (utf-8-sig):
        # an encoding's marker, not text (it became the ids of U+FEFF)
        with open(file, encoding="utf-8-sig", newline="") as stream:
            while chunk := stream.read(piece_chars):
                text += chunk
                cut = find_cut(tokenizer, text)
                if cut is not None:  # otherwise the piece grows by another chunk
                    pieces.append(text[:cut])
                    text = text[cut:]
                if len(pieces) == parallel:
                    yield from encoded()
    except UnicodeDecodeError:
        # the error's own position counts from the start of the block the text stream decoded, not of the file
        raise ValueError(f"--text-dir: expected UTF-8 text, got {str(file)!r} ({first_utf8_error(file)})") from None
    except OSError as err:  # unreadable (permissions, an I/O error): was a PermissionError traceback
        raise ValueError(f"--text-dir: expected readable files, got {str(file)!r} ({err.strerror or err})") from None
    if text:
        pieces.append(text)
    yield from encoded()


def first_utf8_error(file: Path) -> str:
    """Where the first byte that is not UTF-8 is in ``file``, and why: "byte 0xff at offset 3000000: invalid
    start byte"."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(file, "rb") as stream:
        for block in itertools.chain(iter(lambda: stream.read(1 << 20), b""), [None]):
            pending = decoder.getstate()[0]  # the start of a character cut by the previous block
            try:
                decoder.decode(block or b"", final=block is None)
            except UnicodeDecodeError as err:
                return f"byte 0x{err.object[err.start]:02x} at offset {offset - len(pending) + err.start}: {err.reason}"
            offset += len(block or b"")
    return "no byte that is not UTF-8 now"  # the file was rewritten since


def tokenize(tokenizer, files: list[Path], eos: int, out: Path) -> int:
    """Writes the ids of ``files`` (each followed by ``eos``) to the .npy ``out``; returns how many."""
    dtype = np.uint16 if id_bound(tokenizer) <= 1 << 16 else np.uint32
    raw, partial = out.with_name(out.name + ".ids.tmp"), out.with_name(out.name + ".tmp.npy")
    count = 0
    try:
        with open(raw, "wb") as sink:
            for file in files:
                for ids in itertools.chain(encode_pieces(tokenizer, file), [[eos]]):
                    sink.write(np.asarray(ids, dtype).tobytes())
                    count += len(ids)
        source = np.memmap(raw, dtype=dtype, mode="r", shape=(count,))
        target = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(count,))
        for start in range(0, count, BLOCK):
            target[start:start + BLOCK] = source[start:start + BLOCK]
        target.flush()
        del source, target
        os.replace(partial, out)
    finally:
        for leftover in (raw, partial):
            leftover.unlink(missing_ok=True)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", type=Path, help="tokenizer.json, or a Hugging Face directory holding one")
    parser.add_argument("--text-dir", type=Path, required=True)
    parser.add_argument("--glob", default="*.txt", help="files under --text-dir to read (default: *.txt)")
    parser.add_argument("--out", type=Path, required=True, help="the .npy to write")
    parser.add_argument("--eos", type=int, default=None,
                        help="the id after each file (default: TOKENIZER's config.json eos_token_id)")
    args = parser.parse_args(argv)
    try:
        check_output_file("--out", str(args.out))
        if args.out.suffix != ".npy":
            raise ValueError(f"--out: expected a path ending in .npy, got {str(args.out)!r}")
        from experiments.data import corpus_files

        try:
            files = corpus_files(str(args.text_dir), args.glob) if args.text_dir.is_dir() else []
        except ConfigError as err:  # it names the trainer's fields; here they are flags
            raise ValueError(str(err).replace("config field 'data.text_glob'", "--glob")
                             .replace("data.text_dir", "--text-dir")) from None
        if not files:
            raise ValueError(f"--text-dir: expected a directory with files matching {args.glob!r} (--glob), got "
                             f"{str(args.text_dir)!r}")
        tokenizer, config_eos = load_tokenizer(args.tokenizer)
        eos = config_eos if args.eos is None else args.eos
        vocab = id_bound(tokenizer)
        if not (is_int(eos) and 0 <= eos < vocab):  # past the vocabulary: a uint32 file or an overflow traceback
            raise ValueError(f"--eos: expected an id in [0, {vocab}) (the tokenizer's vocabulary; or TOKENIZER's "
                             f"config.json eos_token_id), got {eos!r}")
        count = tokenize(tokenizer, files, eos, args.out)
    except (ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} tokens of {len(files)} file{'' if len(files) == 1 else 's'} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
