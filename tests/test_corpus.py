"""common/corpus.py, and the corpus edge cases as the whole pipeline (index, generator) meets them."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from common.config import CorpusConfig, GenerationConfig
from common.corpus import NSP_NEEDS_DOCUMENTS, CorpusError, CorpusStats, check_paths, iter_documents
from common.index import build_or_load_index
from common.instances import iter_instances, worker_rng
from common.vocab import Vocabulary, load_tokenizer
from conftest import WORDS, tiny_vocab


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    """The tiny vocabulary alone (vocab.txt): enough for the tokenizer, no model weights needed."""
    directory = tmp_path_factory.mktemp("tiny_vocab")
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return directory


def build_index(tmp_path: Path, paths, vocab_dir: Path):
    vocab = Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True)
    config = CorpusConfig(tuple(str(p) for p in paths), str(vocab_dir), True, str(tmp_path / "cache"))
    return build_or_load_index(config, vocab, num_procs=1), vocab


def read(paths) -> tuple[list[tuple[str, ...]], CorpusStats]:
    stats = CorpusStats()
    return [d.sentences for d in iter_documents([str(p) for p in paths], stats)], stats


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- reading --------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=rf"{missing}: corpus file not found"):
        read([missing])
    with pytest.raises(CorpusError, match="no corpus file given"):
        check_paths([])


def test_directory_is_refused(tmp_path):
    with pytest.raises(CorpusError, match=rf"{tmp_path}: is a directory"):
        read([tmp_path])


def test_non_utf8_bytes_name_file_line_and_byte(tmp_path):
    path = write_bytes(tmp_path / "latin1.txt", "one\ntwo\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError) as caught:
        read([path])
    message = str(caught.value)
    assert f"{path}:3:" in message and "0xe9" in message and "column 4" in message and "iconv" in message


def test_crlf_and_whitespace_only_lines_break_documents(tmp_path):
    path = write_bytes(tmp_path / "dos.txt", b"one two\r\nthree\r\n\r\nfour\r\n \t \r\nfive\r\n\x0c\r\nsix")
    documents, stats = read([path])
    assert documents == [("one two", "three"), ("four",), ("five",), ("six",)]
    assert stats.documents == 4 and stats.sentences == 5 and stats.empty_documents == 0


def test_blank_line_runs_are_empty_documents_skipped_and_counted(tmp_path):
    path = write_bytes(tmp_path / "gaps.txt", b"\n\none\n\n\n\ntwo\nthree\n\n  \nfour\n")
    documents, stats = read([path])
    assert documents == [("one",), ("two", "three"), ("four",)]
    # Blank lines 2, 5, 6 and 10 each follow another blank line: four empty documents.
    assert stats.empty_documents == 4 and stats.documents == 3 and stats.lines == 11


def test_several_files_each_end_their_document(tmp_path):
    first = write_bytes(tmp_path / "a.txt", b"a1\na2")  # no blank line at the end
    second = write_bytes(tmp_path / "b.txt", b"b1\n\nb2\n")
    documents, stats = read([first, second])
    assert documents == [("a1", "a2"), ("b1",), ("b2",)]
    assert stats.files == 2 and stats.per_file_bytes == {str(first): 5, str(second): 7} and stats.bytes == 12


def test_gzip_files_read_like_plain_ones(tmp_path):
    text = "one\ntwo\n\nthree\n"
    plain = write_bytes(tmp_path / "plain.txt", text.encode())
    packed = write_bytes(tmp_path / "packed.txt.gz", gzip.compress(text.encode()))
    unnamed = write_bytes(tmp_path / "packed_without_suffix", gzip.compress(text.encode()))
    assert read([plain])[0] == read([packed])[0] == read([unnamed])[0] == [("one", "two"), ("three",)]


def test_corrupt_gzip_is_named(tmp_path):
    data = gzip.compress(("some text\n" * 2000).encode())
    path = write_bytes(tmp_path / "broken.gz", data[: len(data) // 2])
    with pytest.raises(CorpusError, match=rf"{path}: cannot read"):
        read([path])


def test_byte_order_mark_is_not_text(tmp_path):
    path = write_bytes(tmp_path / "bom.txt", "\ufeffFirst line\nsecond\n\n\ufeffnot a BOM here\n".encode("utf-8"))
    documents, _ = read([path])
    assert documents[0] == ("First line", "second")
    assert documents[1][0].startswith("\ufeff")  # only a file's first character is a byte-order mark
    bom_only = write_bytes(tmp_path / "bom_only.txt", "\ufeff\nalpha\n\nbravo\n".encode("utf-8"))
    assert read([bom_only])[0] == [("alpha",), ("bravo",)]


def test_empty_file_has_no_documents(tmp_path):
    empty = write_bytes(tmp_path / "empty.txt", b"")
    documents, stats = read([empty])
    assert documents == [] and stats.files == 1 and stats.lines == 0
    other = write_bytes(tmp_path / "other.txt", b"one\n\ntwo\n")
    assert read([empty, other, empty])[0] == [("one",), ("two",)]


# --- the pipeline on edge-case corpora --------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n\n\n", b"one sentence\nand another\n", b"only\n\n\n\n"])
def test_fewer_than_two_documents_explains_nsp(tmp_path, vocab_dir, content):
    path = write_bytes(tmp_path / "one_doc.txt", content)
    with pytest.raises(CorpusError) as caught:
        build_index(tmp_path, [path], vocab_dir)
    message = str(caught.value)
    assert str(path) in message and NSP_NEEDS_DOCUMENTS in message
    assert "next-sentence prediction" in message and "blank line" in message
    assert not list((tmp_path / "cache").glob("index-*")), "a refused corpus must leave no index behind"


def test_documents_of_one_sentence_are_always_random_next(tmp_path, vocab_dir):
    path = tmp_path / "singles.txt"
    path.write_text("\n\n".join(f"document {d} {' '.join(WORDS[d : d + 8])}" for d in range(12)) + "\n")
    index, vocab = build_index(tmp_path, [path], vocab_dir)
    assert index.num_documents == 12 and index.num_sentences == 12
    config = GenerationConfig(max_seq_len=32)
    instances = list(iter_instances(index, range(12), config, vocab, worker_rng(0, 0, 0)))
    assert len(instances) == 12 and all(inst.is_random_next for inst in instances)


def test_sentence_longer_than_max_seq_len_is_truncated(tmp_path, vocab_dir):
    long_sentence = " ".join(WORDS[i % 60] for i in range(300))
    path = tmp_path / "long.txt"
    path.write_text(f"{long_sentence}\nshort one\n\nalpha bravo\ncharlie\n\n{long_sentence}\n")
    index, vocab = build_index(tmp_path, [path], vocab_dir)
    for whole_word_mask in (False, True):
        config = GenerationConfig(max_seq_len=16, whole_word_mask=whole_word_mask, max_predictions_per_seq=3)
        for epoch in range(5):
            instances = list(iter_instances(index, range(3), config, vocab, worker_rng(0, 0, epoch)))
            assert instances
            for inst in instances:
                assert len(inst.input_ids) <= 16 and inst.a_len >= 1 and len(inst.input_ids) - inst.a_len - 3 >= 1


def test_ten_megabyte_single_line(tmp_path, vocab_dir):
    """One 10 MB sentence: reading streams it, tokenizing is one call, truncation does not walk it."""
    rng = np.random.default_rng(0)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), 2_000_000)]
    line = " ".join(words.tolist())
    while len(line) < 10_000_000:
        line += " " + line[: 10_000_000 - len(line)]
    path = tmp_path / "huge.txt"
    path.write_text(f"{line}\n\nalpha bravo charlie\ndelta echo\n")
    assert path.stat().st_size > 10_000_000
    index, vocab = build_index(tmp_path, [path], vocab_dir)
    assert index.num_documents == 2 and index.num_sentences == 3 and index.num_tokens > 1_500_000
    config = GenerationConfig(max_seq_len=128, whole_word_mask=True)
    instances = list(iter_instances(index, [0, 1], config, vocab, worker_rng(0, 0, 0)))
    assert instances[0].is_random_next and len(instances[0].input_ids) <= 128
    assert all(len(inst.input_ids) <= 128 for inst in instances)
