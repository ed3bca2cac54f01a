"""common/readers.py and common/sentences.py: every source format gives the index the seed's text format gives,
bad records are refused by file and record, a missing extra is named, and --split_sentences on one-line
documents gives the seed's statistics."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import seed_reference
from common.config import CorpusConfig, GenerationConfig
from common.corpus import CorpusError
from common.index import build_or_load_index, index_key
from common.instances import iter_instances, to_seed_record, worker_rng
from common.readers import iter_source_documents, SourceOptions
from common.vocab import Vocabulary, load_tokenizer
from conftest import PRODUCER_WITHOUT_TORCH, REPO, WORDS, tiny_vocab, write_corpus
from test_instances import STATISTICS_EPOCHS, epoch_means

pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is in the test extras")
pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (pyarrow) is in the test extras")


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_vocab")
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def vocab(vocab_dir) -> Vocabulary:
    return Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True)


def config_for(vocab_dir: Path, sources, cache: Path, **flags) -> CorpusConfig:
    return CorpusConfig(tuple(str(s) for s in sources), str(vocab_dir), True, str(cache), **flags)


def documents_of(text_corpus: Path) -> list[list[str]]:
    return [list(d.sentences) for _, d in iter_source_documents([str(text_corpus)], SourceOptions())]


def arrays(index):
    return [np.array(a) for a in (index.tokens, index.sentence_offsets, index.document_offsets, index.source_offsets)]


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, column: dict) -> Path:
    pq.write_table(pa.table(column), path, row_group_size=7)  # several row groups: the reader streams them
    return path


def write_dataset(path: Path, column: dict) -> Path:
    datasets = pytest.importorskip("datasets", reason="the datasets extra is in the test extras")
    datasets.Dataset.from_dict(column).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "dataset"])
def test_each_format_gives_the_index_of_the_same_documents_as_text(kind, vocab_dir, vocab, tmp_path):
    text = write_corpus(tmp_path / "corpus.txt", num_documents=30)
    documents = documents_of(text)
    texts = ["\n".join(d) for d in documents]
    # Records carry other fields, and a record's text may have blank and padded lines: both are ignored.
    texts[3] = "\n\n  " + texts[3].replace("\n", "\n\n") + "  \n"
    if kind.startswith("jsonl"):
        source = write_jsonl(tmp_path / f"corpus.{kind}", [{"id": i, "body": t} for i, t in enumerate(texts)],
                             compress=kind.endswith("gz"))
    elif kind == "parquet":
        source = write_parquet(tmp_path / "corpus.parquet", {"id": list(range(len(texts))), "body": texts})
    else:
        source = write_dataset(tmp_path / "corpus_dataset", {"id": list(range(len(texts))), "body": texts})
    expected = build_or_load_index(config_for(vocab_dir, [text], tmp_path / "cache"), vocab, num_procs=1)
    got = build_or_load_index(config_for(vocab_dir, [source], tmp_path / "cache", text_field="body"), vocab,
                              num_procs=2)
    assert got.path != expected.path  # a separate index, not the text's found in the cache
    for left, right in zip(arrays(got), arrays(expected)):
        np.testing.assert_array_equal(left, right)


def test_sources_of_several_formats_are_one_corpus_with_their_boundaries_kept(vocab_dir, vocab, tmp_path):
    text = write_corpus(tmp_path / "corpus.txt", num_documents=12)
    documents = documents_of(text)
    jsonl = write_jsonl(tmp_path / "more.jsonl", [{"text": "\n".join(d)} for d in documents[:5]])
    index = build_or_load_index(config_for(vocab_dir, [text, jsonl], tmp_path / "cache"), vocab, num_procs=1)
    assert index.num_documents == 17
    assert index.source_offsets.tolist() == [0, 12, 17]


def test_index_key_covers_the_reading_flags_and_the_content(vocab_dir, vocab, tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b.", "body": "c d."}] * 3)
    key = index_key(config_for(vocab_dir, [jsonl], tmp_path), vocab)
    assert index_key(config_for(vocab_dir, [jsonl], tmp_path, text_field="body"), vocab) != key
    assert index_key(config_for(vocab_dir, [jsonl], tmp_path, split_sentences=True), vocab) != key
    assert index_key(config_for(vocab_dir, [jsonl], tmp_path, corpus_weights=None), vocab) == key
    write_jsonl(jsonl, [{"text": "a b.", "body": "c d."}] * 4)
    assert index_key(config_for(vocab_dir, [jsonl], tmp_path), vocab) != key
    dataset = write_dataset(tmp_path / "ds", {"text": ["a b.", "c d."]})
    key = index_key(config_for(vocab_dir, [dataset], tmp_path), vocab)
    write_dataset(tmp_path / "ds", {"text": ["a b.", "c e."]})
    assert index_key(config_for(vocab_dir, [dataset], tmp_path), vocab) != key


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ('{"title": "x"}', "record 3 (line 4): no field 'text' (fields: title); choose the text's field with --text_field"),
    ('{"text": 7}', "record 3 (line 4): field 'text' is int, expected a string"),
    ('{"text": null}', "record 3 (line 4): field 'text' is null, expected a string"),
    ('["text"]', "record 3 (line 4): expected a JSON object, got list"),
    ('{"text": "unterminated', "record 3 (line 4): not valid JSON (Unterminated string"),
])
def test_a_bad_jsonl_record_is_refused_by_file_and_record(bad, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a."}\n{"text": "b."}\n\n' + bad + '\n{"text": "c."}\n', encoding="utf-8")
    with pytest.raises(CorpusError) as error:
        list(iter_source_documents([str(path)], SourceOptions()))
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_bad_parquet_record_or_column_is_refused_by_file_and_record(tmp_path):
    path = write_parquet(tmp_path / "nulls.parquet", {"text": ["a."] * 9 + [None] + ["b."]})
    with pytest.raises(CorpusError, match=f"^{path}: record 10: field 'text' is null, expected a string$"):
        list(iter_source_documents([str(path)], SourceOptions()))
    path = write_parquet(tmp_path / "ints.parquet", {"text": [1, 2], "body": ["a.", "b."]})
    with pytest.raises(CorpusError, match=f"^{path}: column 'text' is int64, expected strings$"):
        list(iter_source_documents([str(path)], SourceOptions()))
    with pytest.raises(CorpusError, match=r"no column 'txt' \(columns: text, body\); choose the text's column"):
        list(iter_source_documents([str(path)], SourceOptions(text_field="txt")))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=f"^{garbage}: not a readable Parquet file"):
        list(iter_source_documents([str(garbage)], SourceOptions()))


def test_a_bad_dataset_is_refused_with_what_it_has(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets extra is in the test extras")
    path = write_dataset(tmp_path / "ds", {"body": ["a.", "b."]})
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        list(iter_source_documents([str(path)], SourceOptions()))
    splits = tmp_path / "dict"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a.", "b."]})}).save_to_disk(str(splits))
    with pytest.raises(CorpusError, match=r"no split 'train' \(splits: validation\); choose one with --dataset_split"):
        list(iter_source_documents([str(splits)], SourceOptions()))
    got = [d.sentences for _, d in iter_source_documents([str(splits)], SourceOptions(dataset_split="validation"))]
    assert got == [("a.",), ("b.",)]
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    with pytest.raises(CorpusError, match="is a directory but not a saved Hugging Face dataset"):
        list(iter_source_documents([str(folder)], SourceOptions()))


def test_a_hub_dataset_that_cannot_be_loaded_is_named(tmp_path, monkeypatch):
    pytest.importorskip("datasets", reason="the datasets extra is in the test extras")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    with pytest.raises(CorpusError, match=r"^hf:bertstream-test/none: cannot load split 'train' from the Hugging Face"):
        list(iter_source_documents(["hf:bertstream-test/none"], SourceOptions()))


# A module of that name first on the path, that fails to import as a missing package would.
_MISSING = 'raise ImportError("No module named {name!r} (simulated)")\n'


@pytest.mark.parametrize("module, source, flags, extra", [
    ("pyarrow", "corpus.parquet", [], "parquet"),
    ("datasets", "corpus_dataset", [], "datasets"),
    ("blingfire", "corpus.txt", ["--split_sentences"], "split"),
])
def test_a_missing_extra_is_named_with_the_install_command(module, source, flags, extra, tiny_model_dir, tmp_path):
    text = write_corpus(tmp_path / "corpus.txt", num_documents=6)
    texts = ["\n".join(d) for d in documents_of(text)]
    if source.endswith(".parquet"):
        write_parquet(tmp_path / source, {"text": texts})
    elif source.endswith("dataset"):
        write_dataset(tmp_path / source, {"text": texts})
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{module}.py").write_text(_MISSING.format(name=module))
    result = subprocess.run(
        [sys.executable, "-m", "producer", "--train_corpus", str(tmp_path / source), "--bert_model",
         str(tiny_model_dir), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
         "--num_workers", "1", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**_env(), "PYTHONPATH": f"{shadow}:{REPO}"},
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"pip install 'bertstream[{extra}]'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- --split_sentences -----------------------------------------------------------------------------------------


def prose_documents(seed: int, num_documents: int = 100) -> list[list[str]]:
    """Documents of 1 (rarely) to 21 sentences of 3-30 words, each capitalised and ending in . ! or ?"""
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    documents = []
    for _ in range(num_documents):
        count = rng.choices([1, 2, 3, 5, 8, 13, 21], [0.04, 0.16, 0.16, 0.16, 0.16, 0.16, 0.16])[0]
        documents.append([" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))).capitalize()
                          + rng.choice(".!?.") for _ in range(count)])
    return documents


def test_split_sentences_on_one_line_documents_gives_the_seeds_statistics(vocab_dir, vocab, tmp_path):
    """One-line documents, split: the same sentences as the one-sentence-a-line text, and then the seed's
    statistics, compared with the seed's reference as tests/test_instances.py compares them (per-epoch means
    over 80 epochs, within 5 standard errors of the difference)."""
    pytest.importorskip("blingfire", reason="the split extra (blingfire) is in the test extras")
    documents = prose_documents(seed=5)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    one_line = write_jsonl(tmp_path / "one_line.jsonl", [{"text": " ".join(d)} for d in documents])
    seed_text = build_or_load_index(config_for(vocab_dir, [lines], tmp_path / "cache"), vocab, num_procs=1)
    unsplit = build_or_load_index(config_for(vocab_dir, [one_line], tmp_path / "cache"), vocab, num_procs=1)
    split = build_or_load_index(config_for(vocab_dir, [one_line], tmp_path / "cache", split_sentences=True),
                                vocab, num_procs=2)
    assert unsplit.num_sentences == len(documents)  # without the flag a line is a sentence, as before
    # The splitter finds nearly every boundary: it keeps 4 of these 863 sentences joined to the next, at a word
    # it takes for an abbreviation or a name ("... in. Mike made ...", "... no. Green ..."). Tokens and
    # documents are exactly the text's.
    assert split.num_documents == seed_text.num_documents and split.num_tokens == seed_text.num_tokens
    np.testing.assert_array_equal(np.array(split.tokens), np.array(seed_text.tokens))
    assert split.num_sentences >= 0.99 * seed_text.num_sentences

    # The seed's reference runs on the true sentences (the one-sentence-a-line text), ours on the split.
    config = GenerationConfig(max_seq_len=128, short_seq_prob=0.1)
    ours = [[to_seed_record(inst, vocab) for inst in iter_instances(split, range(split.num_documents), config, vocab,
                                                                    worker_rng(11, 0, epoch))]
            for epoch in range(STATISTICS_EPOCHS)]
    as_strings = [[[vocab.tokens[i] for i in s] for s in seed_text.sentences_of(d)]
                  for d in range(seed_text.num_documents)]
    rng = random.Random(11)
    reference = [seed_reference.generate_epoch(as_strings, list(vocab.tokens), rng, max_seq_len=128, short_seq_prob=0.1)
                 for _ in range(STATISTICS_EPOCHS)]
    ours_means, seed_means = epoch_means(ours), epoch_means(reference)
    for name in ("random_next", "length", "masked", "instances"):
        x, y = ours_means[name], seed_means[name]
        se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        assert abs(x.mean() - y.mean()) < 5 * se, (name, x.mean(), y.mean(), se)
    # Unsplit, every document is one sentence, so every pair is a random next: the statistics show it.
    unsplit_records = [to_seed_record(i, vocab) for i in iter_instances(unsplit, range(unsplit.num_documents), config,
                                                                       vocab, worker_rng(11, 0, 0))]
    assert all(r["is_random_next"] for r in unsplit_records)
    assert 0.5 < ours_means["random_next"].mean() < 0.75


def test_one_huge_line_without_split_sentences_warns_and_suggests_it(vocab_dir, vocab, tmp_path):
    import logging

    documents = prose_documents(seed=1, num_documents=6)
    long_line = " ".join(" ".join(d) for d in documents * 4)  # far more than 512 tokens on one line
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": long_line}, {"text": "A short one."}])
    # One long sentence among many short lines is a sentence-a-line corpus's normal: no warning for it.
    normal = write_jsonl(tmp_path / "normal.jsonl", [{"text": "\n".join(["A short one."] * 200 + [long_line])},
                                                     {"text": "Another."}])
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logger, handler = logging.getLogger("bertstream"), Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        build_or_load_index(config_for(vocab_dir, [normal], tmp_path / "cache"), vocab, num_procs=1)
        assert warnings == []
        build_or_load_index(config_for(vocab_dir, [path], tmp_path / "cache"), vocab, num_procs=1)
        assert len(warnings) == 1 and "1 documents are one line of more than 512 tokens" in warnings[0]
        assert "pass --split_sentences" in warnings[0]
        pytest.importorskip("blingfire", reason="the split extra (blingfire) is in the test extras")
        build_or_load_index(config_for(vocab_dir, [path], tmp_path / "cache", split_sentences=True), vocab,
                            num_procs=1)
        assert len(warnings) == 1  # split, no warning
    finally:
        logger.removeHandler(handler)


def test_the_producer_reads_every_format_without_importing_torch(tiny_model_dir, tmp_path):
    """`datasets` imports torch's integrations only on demand; the producer must never pay for torch."""
    pytest.importorskip("datasets", reason="the datasets extra is in the test extras")
    text = write_corpus(tmp_path / "corpus.txt", num_documents=8)
    texts = ["\n".join(d) for d in documents_of(text)]
    sources = [write_jsonl(tmp_path / "c.jsonl.gz", [{"text": t} for t in texts], compress=True),
               write_parquet(tmp_path / "c.parquet", {"text": texts}), write_dataset(tmp_path / "ds", {"text": texts})]
    check = PRODUCER_WITHOUT_TORCH
    result = subprocess.run(
        [sys.executable, "-c", check, "--train_corpus", *map(str, sources), "--corpus_weights", "1", "1", "1",
         "--split_sentences", "--bert_model", str(tiny_model_dir), "--cache_dir", str(tmp_path / "cache"),
         "--output_dir", str(tmp_path / "out"), "--epochs_to_generate", "1", "--num_workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=_env(),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "epoch_0.json").stat().st_size > 0


def test_the_trainer_reads_its_eval_corpus_in_any_format(tiny_model_dir, tmp_path):
    from trainer.cli import parse_args
    from trainer.evaluate import load_eval_index

    text = write_corpus(tmp_path / "heldout.txt", num_documents=10)
    jsonl = write_jsonl(tmp_path / "heldout.jsonl", [{"body": "\n".join(d)} for d in documents_of(text)])
    config = parse_args(["--bert_model", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                         "--eval_corpus", str(jsonl), "--text_field", "body", "--cache_dir", str(tmp_path / "cache")])
    assert (config.eval.text_field, config.eval.dataset_split, config.eval.split_sentences) == ("body", "train", False)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(tiny_model_dir, True), True)
    got = load_eval_index(config.eval.eval_corpus, str(tiny_model_dir), True, config.eval.cache_dir, vocab,
                          text_field=config.eval.text_field, dataset_split=config.eval.dataset_split,
                          split_sentences=config.eval.split_sentences)
    expected = load_eval_index(str(text), str(tiny_model_dir), True, config.eval.cache_dir, vocab)
    for left, right in zip(arrays(got), arrays(expected)):
        np.testing.assert_array_equal(left, right)
