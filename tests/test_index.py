"""common/index.py: the token index is built once, reused, rebuilt when its inputs change or it is damaged,
memory-mapped, and holds exactly the tokenizer's ids."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

import common.index
from common.config import CorpusConfig
from common.corpus import iter_documents
from common.index import build_or_load_index, index_key, load_index
from common.vocab import Vocabulary, load_tokenizer
from conftest import tiny_vocab, write_corpus


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_vocab")
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return directory


@pytest.fixture
def log_lines():
    """The messages the `bertstream` logger emits during the test (it may not propagate to the root)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("bertstream")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def setup(model_dir: Path, corpus: list[Path], cache: Path, lower: bool = True):
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, lower), lower)
    return CorpusConfig(tuple(str(p) for p in corpus), str(model_dir), lower, str(cache)), vocab


def arrays(index) -> tuple[np.ndarray, ...]:
    return tuple(np.array(a) for a in (index.tokens, index.sentence_offsets, index.document_offsets))


def assert_same_index(left, right) -> None:
    for a, b in zip(arrays(left), arrays(right)):
        np.testing.assert_array_equal(a, b)


# --- building and reuse ---------------------------------------------------------------------------------


def test_index_holds_exactly_the_tokenizers_ids(tmp_path, vocab_dir):
    corpus = write_corpus(tmp_path / "corpus.txt", num_documents=30)
    config, vocab = setup(vocab_dir, [corpus], tmp_path / "cache")
    index = build_or_load_index(config, vocab, num_procs=2)
    tokenizer = load_tokenizer(vocab_dir, True)
    documents = list(iter_documents([str(corpus)]))
    assert index.num_documents == len(documents) == 30
    for d, document in enumerate(documents):
        sentences = index.sentences_of(d)
        assert len(sentences) == len(document.sentences)
        for ids, text in zip(sentences, document.sentences):
            assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    assert index.document_sentence_counts().tolist() == [len(d.sentences) for d in documents]


def test_arrays_are_memory_mapped_in_the_smallest_dtype(tmp_path, vocab_dir):
    config, vocab = setup(vocab_dir, [write_corpus(tmp_path / "c.txt")], tmp_path / "cache")
    index = build_or_load_index(config, vocab, num_procs=1)
    for name in ("tokens", "sentence_offsets", "document_offsets"):
        assert isinstance(getattr(index, name), np.memmap), name
    assert index.tokens.dtype == np.uint16 and index.sentence_offsets.dtype == np.int64
    assert index.path.parent == tmp_path / "cache" and index.path.name == f"index-{index_key(config, vocab)}"


def test_a_vocabulary_beyond_uint16_gets_int32_ids(tmp_path):
    big = tmp_path / "big_vocab"
    big.mkdir()
    tokens = tiny_vocab() + [f"extra{i}" for i in range(70_000)]
    (big / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha extra69999 bravo\nextra65536\n\nextra1 extra2\n")
    config, vocab = setup(big, [corpus], tmp_path / "cache")
    index = build_or_load_index(config, vocab, num_procs=1)
    assert index.tokens.dtype == np.int32
    assert vocab.tokens[int(index.tokens[1])] == "extra69999" and vocab.tokens[int(index.tokens[3])] == "extra65536"


def test_long_sentences_are_neither_padded_nor_truncated_with_a_sentence_transformers_tokenizer(
        tmp_path, real_model_dir):
    """all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128; the index must hold bare, whole sentences."""
    long_sentence = " ".join(["the river ran over the stones"] * 60)  # 360 tokens
    corpus = tmp_path / "c.txt"
    corpus.write_text(f"{long_sentence}\nShort.\n\nAnother document.\n")
    config, vocab = setup(real_model_dir, [corpus], tmp_path / "cache")
    index = build_or_load_index(config, vocab, num_procs=1)
    lengths = np.diff(index.sentence_offsets).tolist()
    assert lengths == [360, 2, 3]
    assert vocab.pad_id not in set(index.tokens.tolist()) and vocab.cls_id not in set(index.tokens.tolist())


def test_parallel_chunks_keep_corpus_order(tmp_path, vocab_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt", num_documents=200)
    config, vocab = setup(vocab_dir, [corpus], tmp_path / "one")
    serial = build_or_load_index(config, vocab, num_procs=1)
    monkeypatch.setattr(common.index, "_CHUNK_CHARS", 300)  # many small tasks in flight, finishing out of order
    config, vocab = setup(vocab_dir, [corpus], tmp_path / "two")
    parallel = build_or_load_index(config, vocab, num_procs=2)
    assert_same_index(serial, parallel)


def test_second_call_reuses_the_index_without_tokenizing(tmp_path, vocab_dir, log_lines):
    config, vocab = setup(vocab_dir, [write_corpus(tmp_path / "c.txt")], tmp_path / "cache")
    first = build_or_load_index(config, vocab, num_procs=1)
    stat = (first.path / "tokens.npy").stat()
    assert any(line.startswith("tokenized") for line in log_lines)
    log_lines.clear()
    # The model directory is not even looked at on a cache hit: the key is the vocabulary's hash.
    elsewhere = CorpusConfig(config.train_corpus, str(tmp_path / "no_such_model"), True, config.cache_dir)
    second = build_or_load_index(elsewhere, vocab, num_procs=1)
    assert second.path == first.path
    again = (second.path / "tokens.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert not any(line.startswith("tokeniz") for line in log_lines)
    assert any("cached" in line for line in log_lines), log_lines
    assert_same_index(first, second)


def test_changed_corpus_lower_casing_or_vocabulary_get_another_index(tmp_path, vocab_dir):
    corpus = write_corpus(tmp_path / "c.txt")
    config, vocab = setup(vocab_dir, [corpus], tmp_path / "cache")
    original = build_or_load_index(config, vocab, num_procs=1)

    cased_config, cased_vocab = setup(vocab_dir, [corpus], tmp_path / "cache", lower=False)
    cased = build_or_load_index(cased_config, cased_vocab, num_procs=1)

    other_vocab_dir = tmp_path / "other_vocab"
    other_vocab_dir.mkdir()
    (other_vocab_dir / "vocab.txt").write_text("\n".join(tiny_vocab() + ["rivers"]) + "\n", encoding="utf-8")
    other_config, other_vocab = setup(other_vocab_dir, [corpus], tmp_path / "cache")
    other = build_or_load_index(other_config, other_vocab, num_procs=1)

    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\none more document.\n")
    grown = build_or_load_index(config, vocab, num_procs=1)

    paths = {original.path, cased.path, other.path, grown.path}
    assert len(paths) == 4, paths
    assert grown.num_documents == original.num_documents + 1
    # write_corpus's text is lower case already, so the ids agree: the flag alone chose another index.
    assert_same_index(original, cased)


def test_corpus_path_with_a_tilde(tmp_path, vocab_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_corpus(tmp_path / "c.txt")
    config, vocab = setup(vocab_dir, [Path("~/c.txt")], tmp_path / "cache")
    assert build_or_load_index(config, vocab, num_procs=1).num_documents == 40


def test_summary_line_reports_throughput_and_skipped_input(tmp_path, vocab_dir, log_lines):
    corpus = tmp_path / "c.txt"
    # A run of blank lines (one empty document), a control-character line (no tokens), and a document made of
    # nothing else (no tokens at all).
    corpus.write_text("alpha bravo\n\x01\x02\n\n\n\x03\n\ncharlie\n\ndelta echo\n")
    config, vocab = setup(vocab_dir, [corpus], tmp_path / "cache")
    index = build_or_load_index(config, vocab, num_procs=1)
    assert index.num_documents == 3 and index.num_sentences == 3
    summary = [line for line in log_lines if line.startswith("tokenized")]
    assert len(summary) == 1, log_lines
    assert "MB/s" in summary[0] and "3 documents" in summary[0]
    assert "skipped 1 empty documents" in summary[0]
    assert "2 sentences with no tokens" in summary[0] and "1 documents left without tokens" in summary[0]
    meta = json.loads((index.path / "meta.json").read_text())
    assert meta["skipped_empty_documents"] == 1 and meta["skipped_empty_sentences"] == 2
    assert meta["skipped_tokenless_documents"] == 1 and meta["documents"] == 3


# --- damaged caches -------------------------------------------------------------------------------------


def break_tokens_truncated(path: Path) -> None:
    data = (path / "tokens.npy").read_bytes()
    (path / "tokens.npy").write_bytes(data[: len(data) - 10])


def break_tokens_empty(path: Path) -> None:
    (path / "tokens.npy").write_bytes(b"")  # what a power cut after an unsynced rename can leave


def break_header(path: Path) -> None:
    (path / "document_offsets.npy").write_bytes(b"\x93NUMPY\x01\x00")


def break_missing(path: Path) -> None:
    (path / "sentence_offsets.npy").unlink()


def break_offsets(path: Path) -> None:
    offsets = np.load(path / "sentence_offsets.npy")
    np.save(path / "sentence_offsets.npy", offsets[:-1])  # a valid file that disagrees with the tokens


@pytest.mark.parametrize("damage", [break_tokens_truncated, break_tokens_empty, break_header, break_missing,
                                    break_offsets])
def test_damaged_index_is_detected_and_rebuilt(tmp_path, vocab_dir, log_lines, damage):
    config, vocab = setup(vocab_dir, [write_corpus(tmp_path / "c.txt")], tmp_path / "cache")
    good = arrays(build_or_load_index(config, vocab, num_procs=1))
    path = tmp_path / "cache" / f"index-{index_key(config, vocab)}"
    damage(path)
    log_lines.clear()
    rebuilt = build_or_load_index(config, vocab, num_procs=1)
    assert any("damaged" in line and "rebuilding" in line for line in log_lines), log_lines
    assert any(line.startswith("tokenized") for line in log_lines)
    for a, b in zip(good, arrays(rebuilt)):
        np.testing.assert_array_equal(a, b)
    load_index(path)  # and it is whole again for the next reader


def test_leftover_temporary_folders_of_crashed_builds(tmp_path, vocab_dir):
    config, vocab = setup(vocab_dir, [write_corpus(tmp_path / "c.txt")], tmp_path / "cache")
    key = index_key(config, vocab)
    cache = tmp_path / "cache"
    stale, fresh = cache / f"index-{key}.tmp-crashed", cache / f"index-{key}.tmp-running"
    for leftover in (stale, fresh):
        leftover.mkdir(parents=True)
        (leftover / "tokens.raw").write_bytes(b"\x00" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    index = build_or_load_index(config, vocab, num_procs=1)
    assert index.num_documents == 40
    assert not stale.exists(), "a crashed build's folder older than an hour is removed"
    assert fresh.exists(), "a recent folder may be a build still running beside us: left alone"
    assert {p.name for p in cache.iterdir()} == {f"index-{key}", fresh.name}


def _build_in_child(config, vocab, queue) -> None:
    index = build_or_load_index(config, vocab, num_procs=1)
    queue.put((str(index.path), int(index.num_tokens)))


def test_two_processes_building_the_same_index_both_succeed(tmp_path, vocab_dir):
    config, vocab = setup(vocab_dir, [write_corpus(tmp_path / "c.txt", num_documents=300)], tmp_path / "cache")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(config, vocab, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert results[0] == results[1]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(results[0][0]).name]
