"""Disk-dump mode (`--output_dir`): the seed's epoch files, read back the way its trainer reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import seedformat
from common.config import CorpusConfig, GenerationConfig
from common.index import build_or_load_index
from common.vocab import Vocabulary, load_tokenizer
from conftest import REPO
from producer.worker import iter_shard

TIMEOUT_S = 120  # a guard against hangs, never a speed assertion


def dump(model: Path, corpus: Path, out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
         "--do_lower_case", "--cache_dir", str(cache), "--output_dir", str(out), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    return result


def convert_example_to_features(example: dict, tokenizer, max_seq_length: int) -> dict:
    """finetune_on_pregenerated.py's conversion, step for step (its np.int is int64 today)."""
    tokens = example["tokens"]
    segment_ids = example["segment_ids"]
    is_random_next = example["is_random_next"]
    masked_lm_positions = example["masked_lm_positions"]
    masked_lm_labels = example["masked_lm_labels"]

    assert len(tokens) == len(segment_ids) <= max_seq_length  # The preprocessed data should be already truncated
    input_ids = tokenizer.convert_tokens_to_ids(tokens)
    masked_label_ids = tokenizer.convert_tokens_to_ids(masked_lm_labels)

    input_array = np.zeros(max_seq_length, dtype=np.int64)
    input_array[: len(input_ids)] = input_ids
    mask_array = np.zeros(max_seq_length, dtype=bool)
    mask_array[: len(input_ids)] = 1
    segment_array = np.zeros(max_seq_length, dtype=bool)
    segment_array[: len(segment_ids)] = segment_ids
    lm_label_array = np.full(max_seq_length, dtype=np.int64, fill_value=-1)
    lm_label_array[masked_lm_positions] = masked_label_ids
    return {"input_ids": input_array, "input_mask": mask_array, "segment_ids": segment_array,
            "lm_label_ids": lm_label_array, "is_next": is_random_next}


def read_epoch_like_the_seed(output_dir: Path, epoch: int, tokenizer) -> list[dict]:
    """PregeneratedDataset's reading: metrics first, then one feature per line, and the count must match."""
    metrics = json.loads((output_dir / f"epoch_{epoch}_metrics.json").read_text())
    num_samples, seq_len = metrics["num_training_examples"], metrics["max_seq_len"]
    features = []
    with open(output_dir / f"epoch_{epoch}.json") as f:
        for i, line in enumerate(f):
            line = line.strip()
            example = json.loads(line)
            features.append((example, convert_example_to_features(example, tokenizer, seq_len)))
    assert i == num_samples - 1  # the seed's own check
    return features


def test_dump_reads_back_like_the_seed_trainer(tiny_model_dir, tiny_corpus, tmp_path):
    from transformers import BertTokenizer

    out = tmp_path / "out"
    result = dump(tiny_model_dir, tiny_corpus, out, tmp_path / "cache", "--num_workers", "2",
                  "--epochs_to_generate", "2", "--max_seq_len", "48", "--do_whole_word_mask", "--reduce_memory")
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_0.json", "epoch_0_metrics.json", "epoch_1.json", "epoch_1_metrics.json"]
    assert "wrote" in result.stderr and "Traceback" not in result.stderr

    tokenizer = BertTokenizer.from_pretrained(tiny_model_dir, do_lower_case=True)
    vocabulary = set(tokenizer.get_vocab())
    for epoch in (0, 1):
        metrics = json.loads((out / f"epoch_{epoch}_metrics.json").read_text())
        assert metrics["max_seq_len"] == 48
        features = read_epoch_like_the_seed(out, epoch, tokenizer)
        assert len(features) == metrics["num_training_examples"] > 40  # at least one instance per document
        for example, feature in features:
            tokens = example["tokens"]
            assert set(tokens) <= vocabulary, set(tokens) - vocabulary
            assert set(example["masked_lm_labels"]) <= vocabulary
            assert len(tokens) == len(example["segment_ids"]) <= 48
            # A masked position may hold any vocabulary token, [SEP] included (the 10% random replacements draw
            # from the whole vocabulary, as the seed's): check the structure on the original tokens.
            original = list(tokens)
            for p, label in zip(example["masked_lm_positions"], example["masked_lm_labels"]):
                original[p] = label
            assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
            assert original.count("[CLS]") == 1 and original.count("[SEP]") == 2
            assert len(example["masked_lm_positions"]) == len(example["masked_lm_labels"]) >= 1
            assert all(0 < p < len(tokens) - 1 and original[p] not in ("[CLS]", "[SEP]")
                       for p in example["masked_lm_positions"])
            assert (feature["lm_label_ids"] != -1).sum() == len(example["masked_lm_positions"])
    assert (out / "epoch_0.json").read_bytes() != (out / "epoch_1.json").read_bytes()  # fresh maskings per epoch


def expected_epoch(model: Path, corpus: Path, cache: Path, seed: int, num_workers: int, epoch: int) -> str:
    """The epoch file's content, generated in this process: the workers' shards in worker order."""
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model, True), True)
    index = build_or_load_index(CorpusConfig((str(corpus),), str(model), True, str(cache)), vocab, 1)
    return "".join(seedformat.record_line(instance, vocab)
                   for worker in range(num_workers)
                   for instance in iter_shard(index, GenerationConfig(), vocab, seed, worker, num_workers, epoch))


def test_dump_is_reproducible_from_seed_and_worker_count(tiny_model_dir, tiny_corpus, tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for name, seed in (("a", "42"), ("b", "42"), ("c", "7")):
        dump(tiny_model_dir, tiny_corpus, tmp_path / name, cache, "--num_workers", "3", "--epochs_to_generate", "2",
             "--seed", seed)
        runs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
    assert runs["a"] == runs["b"]
    assert runs["a"]["epoch_0.json"] != runs["c"]["epoch_0.json"]
    for epoch in (0, 1):
        assert runs["a"][f"epoch_{epoch}.json"].decode() == expected_epoch(tiny_model_dir, tiny_corpus, cache, 42, 3,
                                                                           epoch)


def test_leftovers_of_an_interrupted_dump_are_not_mistaken_for_parts(tiny_model_dir, tiny_corpus, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / ".epoch_0.part0").write_text('{"tokens": ["junk"]}\n')  # a finished part of another run
    (out / ".epoch_0.json.x1y2.tmp").write_text("half an epoch")
    (out / "notes.txt").write_text("not ours")
    dump(tiny_model_dir, tiny_corpus, out, cache, "--num_workers", "2", "--epochs_to_generate", "1", "--seed", "42")
    assert sorted(p.name for p in out.iterdir()) == ["epoch_0.json", "epoch_0_metrics.json", "notes.txt"]
    assert (out / "epoch_0.json").read_text() == expected_epoch(tiny_model_dir, tiny_corpus, cache, 42, 2, 0)


def test_atomic_output_appears_only_when_complete(tmp_path):
    target = tmp_path / "epoch_0.json"
    with pytest.raises(RuntimeError):
        with seedformat.atomic_output(target) as out:
            out.write("partial\n")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with seedformat.atomic_output(target) as out:
        out.write("whole\n")
    assert target.read_text() == "whole\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    metrics = seedformat.write_metrics(tmp_path, 0, 12, 128)
    assert json.loads(metrics.read_text()) == {"num_training_examples": 12, "max_seq_len": 128}
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["epoch_0.json", "epoch_0_metrics.json"]


def test_killed_dump_worker_is_restarted_and_the_files_are_unchanged(tiny_model_dir, tmp_path):
    import re
    import signal
    import time

    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", num_documents=2000)
    # One --seed for both runs: without it each would draw its own, and the files would differ for that alone.
    cache, flags = tmp_path / "cache", ("--num_workers", "2", "--epochs_to_generate", "12", "--seed", "42")
    dump(tiny_model_dir, corpus, tmp_path / "clean", cache, *flags)

    log_path = tmp_path / "killed.log"
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(tiny_model_dir),
               "--do_lower_case", "--cache_dir", str(cache), "--output_dir", str(tmp_path / "killed"), *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while not re.search(r"wrote \S*epoch_1\.json", log_path.read_text()) and process.poll() is None:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.01)
    pid = int(re.search(r"worker 0 started: pid (\d+)", log_path.read_text())[1])
    if process.poll() is not None:
        pytest.skip("the dump finished before its worker could be killed (a machine too fast for this corpus)")
    os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=TIMEOUT_S) == 0, log_path.read_text()
    text = log_path.read_text()
    assert f"worker 0 (pid {pid}) killed by signal SIGKILL" in text
    assert re.search(r"worker 0 started: pid \d+, resuming at epoch [1-9]", text), text
    clean = {p.name: p.read_bytes() for p in sorted((tmp_path / "clean").iterdir())}
    killed = {p.name: p.read_bytes() for p in sorted((tmp_path / "killed").iterdir())}
    assert killed.keys() == clean.keys() and len(clean) == 24
    assert [name for name in clean if killed[name] != clean[name]] == []
