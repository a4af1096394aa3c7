"""experiments.tokenize_corpus: text files -> the .npy of token ids that data.task=tokens reads, with a tokenizer
built here by the tokenizers package (nothing is downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import DataConfig
from experiments.data import batch_at
from experiments.tokenize_corpus import main

WORDS = ["[UNK]", "<eos>", "the", "state", "is", "carried", "across", "chunks", "tokens"]


@pytest.fixture
def hf_dir(tmp_path):
    """A directory like a Hugging Face model's: tokenizer.json, and config.json naming two eos ids."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "model"
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({"model_type": "falcon_mamba", "eos_token_id": [1, 0]}))
    return path


def test_files_in_name_order_each_followed_by_eos(tmp_path, hf_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("tokens carried across chunks")
    (corpus / "a.txt").write_text("the state is\ncarried unknown")
    (corpus / "skipped.md").write_text("the the the")
    out = tmp_path / "tokens.npy"
    assert main([str(hf_dir), "--text-dir", str(corpus), "--out", str(out)]) == 0
    ids = np.load(out)
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, [2, 3, 4, 5, 0, 1, 8, 5, 6, 7, 1])  # a.txt, eos 1, b.txt, eos 1
    assert f"wrote 11 tokens of 2 files to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "model", "tokens.npy"]  # no temporary left
    # what the trainer reads: windows of the stream
    batch = batch_at(DataConfig(task="tokens", token_file=str(out), seq_len=4, batch_size=2), len(WORDS), 0, 0)
    np.testing.assert_array_equal(batch["inputs"][0], [ids[:4], ids[4:8]])

    assert main([str(hf_dir / "tokenizer.json"), "--text-dir", str(corpus), "--glob", "*.md", "--eos", "7",
                 "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), [2, 2, 2, 7])


def test_bad_arguments_are_named(tmp_path, hf_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the state")

    def fails(argv, message):
        assert main(argv) == 1
        assert capsys.readouterr().err.startswith(f"error: {message}")

    out = ["--out", str(tmp_path / "t.npy")]
    fails([str(hf_dir), "--text-dir", str(corpus), "--out", str(tmp_path / "t.bin")],
          f"--out: expected a path ending in .npy, got '{tmp_path / 't.bin'}'")
    fails([str(hf_dir), "--text-dir", str(tmp_path / "none"), *out],
          f"--text-dir: expected a directory with files matching '*.txt' (--glob), got '{tmp_path / 'none'}'")
    fails([str(hf_dir), "--text-dir", str(corpus), "--glob", "", *out],
          "--glob: expected a non-empty glob pattern relative to --text-dir, got ''")  # named 'data.text_glob'
    fails([str(tmp_path), "--text-dir", str(corpus), *out],
          f"tokenizer: expected a tokenizer.json or a directory holding one, got '{tmp_path}'")
    fails([str(hf_dir / "config.json"), "--text-dir", str(corpus), *out],
          "tokenizer: expected a tokenizer.json of the tokenizers package, got")
    fails([str(hf_dir / "tokenizer.json"), "--text-dir", str(corpus), *out],
          "--eos: expected an id in [0, 9) (the tokenizer's vocabulary; or TOKENIZER's config.json eos_token_id), "
          "got None")
    for eos in ("-1", "9", str(2**32)):  # 2**32 overflowed uint32 with a traceback, 9 wrote an id past the vocabulary
        fails([str(hf_dir), "--text-dir", str(corpus), "--eos", eos, *out], f"--eos: expected an id in [0, 9) (the "
              f"tokenizer's vocabulary; or TOKENIZER's config.json eos_token_id), got {eos}")
    (corpus / "b.txt").write_bytes(b"the \xff state")
    fails([str(hf_dir), "--text-dir", str(corpus), *out], f"--text-dir: expected UTF-8 text, got '{corpus / 'b.txt'}'")
    # the offset in the file: the decoder's error counted from the block it was decoding (902848, not 3000000)
    (corpus / "b.txt").write_bytes(b"the " * 750_000 + b"\xff")
    fails([str(hf_dir), "--text-dir", str(corpus), *out], f"--text-dir: expected UTF-8 text, got '{corpus / 'b.txt'}' "
          f"(byte 0xff at offset 3000000: invalid start byte)")
    assert not (tmp_path / "t.npy").exists() and not list(tmp_path.glob("t.npy*"))


def test_ids_past_the_count_of_a_vocabulary_with_gaps_are_written(tmp_path):
    """A vocabulary of 3 tokens numbered up to 70000: the file's dtype (uint16 for 3 tokens) and the --eos range
    ([0, 3)) came from the token count, so its id 70000 stopped the run with an OverflowError traceback."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "a": 70000}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("a a")
    out = tmp_path / "t.npy"
    assert main([str(tmp_path / "tokenizer.json"), "--text-dir", str(tmp_path), "--eos", "1", "--out", str(out)]) == 0
    ids = np.load(out)
    assert ids.dtype == np.uint32 and ids.tolist() == [70000, 70000, 1]


def test_line_ends_are_the_files(tmp_path):
    """The ids are those of the file's text as it is: read in text mode, "\r\n" and a lone "\r" became "\n"."""
    from tokenizers import Regex

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "a": 2, "\r": 3, "\n": 4}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), "isolated")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_bytes(b"a\r\na\ra\n")
    out = tmp_path / "t.npy"
    assert main([str(tmp_path / "tokenizer.json"), "--text-dir", str(tmp_path), "--eos", "1", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), [2, 3, 4, 2, 3, 2, 4, 1])
    # a byte order mark at the file's start is the encoding's, not text (it was tokenized); one inside is kept
    (tmp_path / "a.txt").write_bytes("\ufeffa\n\ufeffa".encode())
    assert main([str(tmp_path / "tokenizer.json"), "--text-dir", str(tmp_path), "--eos", "1", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out), [2, 4, 0, 1])


def test_an_unreadable_file_is_named(tmp_path, hf_dir, capsys, monkeypatch):
    """A text file that cannot be read stopped tokenize_corpus and a bytes-task run with a PermissionError traceback
    (tests run as root, for whom a chmod does not stop a read: the read is made to fail)."""
    import builtins
    from pathlib import Path

    from configs import ConfigError

    (tmp_path / "a.txt").write_text("the state")
    real_open, real_read = builtins.open, Path.read_bytes

    def deny(file):
        if str(file).endswith("a.txt"):
            raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(builtins, "open", lambda file, *args, **kwargs: deny(file) or real_open(file, *args, **kwargs))
    assert main([str(hf_dir), "--text-dir", str(tmp_path), "--out", str(tmp_path / "t.npy")]) == 1
    assert capsys.readouterr().err == (f"error: --text-dir: expected readable files, got '{tmp_path / 'a.txt'}' "
                                       f"(Permission denied)\n")
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(Path, "read_bytes", lambda path: deny(path) or real_read(path))
    config = DataConfig(task="bytes", text_dir=str(tmp_path), text_glob="*.txt", batch_size=1, seq_len=4)
    with pytest.raises(ConfigError, match="config field 'data.text_dir': expected readable files, got "
                                          f"'{tmp_path / 'a.txt'}' \\(Permission denied\\)"):
        batch_at(config, 256, 0, 0)


def test_large_files_are_encoded_in_pieces_that_change_no_id(tmp_path, monkeypatch):
    """A file is read and encoded a piece at a time (memory bounded by the piece, not the file), cut only at line
    starts where the ids around the cut do not change; the pieces' ids are the ids of the file encoded whole."""
    from tokenizers import decoders, trainers

    from experiments import tokenize_corpus

    rng = np.random.default_rng(0)
    words = ["state", "scan", "chunk", "  indented", "'s", "1234", "Zürich", "naïve", "def", "(x)", "\t", ""]
    lines = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(400)]
    text = "\n".join(lines) + "\n\n  trailing\n"
    byte_level = Tokenizer(models.BPE())  # Falcon's kind: byte-level BPE
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # no pre-tokenizer and a merge across the newline: "\na" is one token, "\nb" two
    across = Tokenizer(models.BPE({"a": 0, "b": 1, "\n": 2, "\na": 3}, [("\n", "a")]))
    across_text = "a\na\nb\na\nb" * 50
    monkeypatch.setattr(tokenize_corpus, "CUT_CHECK_CHARS", 40)
    for tokenizer, body in ((byte_level, text), (across, across_text)):
        file = tmp_path / "corpus.txt"
        file.write_text(body)
        whole = tokenizer.encode(body).ids
        pieces = list(tokenize_corpus.encode_pieces(tokenizer, file, piece_chars=97))
        assert len(pieces) > len(body) // 200  # pieces of about piece_chars, not the whole file
        assert sum(pieces, []) == whole
        if tokenizer is across:  # every cut falls before a "b": a cut before an "a" would split "\na"
            cuts = np.cumsum([sum(len(tokenizer.id_to_token(i)) for i in piece) for piece in pieces])[:-1]
            assert all(body[cut] == "b" for cut in cuts)


def test_special_tokens_of_the_tokenizer_are_left_out(tmp_path, hf_dir):
    """A post-processor's BOS would otherwise land at the start of every piece of a file; the ids are the text's,
    then --eos."""
    from tokenizers import processors

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="[UNK] $A", special_tokens=[("[UNK]", 0)])
    assert tokenizer.encode("the state").ids == [0, 2, 3]
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the state\r\nis")  # "\r\n" kept, which Whitespace splits on
    assert main([str(hf_dir), "--text-dir", str(corpus), "--out", str(tmp_path / "t.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), [2, 3, 4, 1])


def test_padding_and_truncation_of_the_tokenizer_json_are_turned_off(tmp_path, hf_dir, monkeypatch):
    """A tokenizer.json saved with padding (to the longest of a batch) and truncation (max_length 4): every piece
    was cut to 4 ids, and pieces encoded together by encode_batch were padded to the longest of them. The corpus
    is the text's ids, then --eos."""
    from experiments import tokenize_corpus

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[UNK]")
    tokenizer.enable_truncation(max_length=4)
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    body = "the state is carried across chunks\n" * 6 + "tokens\n" * 8
    (corpus / "a.txt").write_text(body)
    ids = [WORDS.index(word) for word in body.split()]
    assert main([str(hf_dir), "--text-dir", str(corpus), "--out", str(tmp_path / "t.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), ids + [1])
    monkeypatch.setattr(tokenize_corpus, "CUT_CHECK_CHARS", 20)
    loaded, _ = tokenize_corpus.load_tokenizer(hf_dir)
    pieces = list(tokenize_corpus.encode_pieces(loaded, corpus / "a.txt", piece_chars=40, parallel=4))
    assert len(pieces) > 4 and sum(pieces, []) == ids


def test_a_piece_that_ends_at_a_newline_is_still_cut(tmp_path, monkeypatch):
    """Lines whose length divides the piece size end every piece read with a newline: the line starts before it
    are tried (only the final one, whose line is not read yet, was, and failing it the file was encoded whole)."""
    from experiments import tokenize_corpus

    monkeypatch.setattr(tokenize_corpus, "CUT_CHECK_CHARS", 26)
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    file = tmp_path / "fixed_width.txt"
    body = "the state is\n" * 400  # 13 characters a line, pieces of 130
    file.write_text(body)
    pieces = list(tokenize_corpus.encode_pieces(tokenizer, file, piece_chars=130))
    assert len(pieces) > 40 and max(map(len, pieces)) <= 30
    assert sum(pieces, []) == tokenizer.encode(body).ids


def test_a_cut_is_checked_on_text_read_after_it(tmp_path, monkeypatch):
    """A cut near the end of the text read so far was checked on the part of its line read yet: "\na" showed no
    merge across the newline where "\nab" has one (no pre-tokenizer; "ab" merges first, then "\n" + "ab")."""
    from experiments import tokenize_corpus

    monkeypatch.setattr(tokenize_corpus, "CUT_CHECK_CHARS", 40)
    tokenizer = Tokenizer(models.BPE({"a": 0, "b": 1, "\n": 2, "ab": 3, "\nab": 4, "c": 5},
                                     [("a", "b"), ("\n", "ab")]))
    file = tmp_path / "corpus.txt"
    body = "cc\nab" * 200 + "\ncc\n" + "cc\nc" * 200  # cuts only in the second half, before a "c"
    file.write_text(body)
    for piece_chars in (97, 98, 99):  # pieces read up to a line's "a" (its "b" unread), or not
        pieces = list(tokenize_corpus.encode_pieces(tokenizer, file, piece_chars=piece_chars))
        assert len(pieces) > 5 and sum(pieces, []) == tokenizer.encode(body).ids
