"""common/blend.py and --corpus_weights end to end: instance shares as weighted, random next segments inside their
corpus, the epoch plan (repeats and samples), the header's per-corpus counts, and the flags' checks."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from common.blend import blend_epoch_order, corpus_index, plan_blend
from common.config import CorpusConfig, GenerationConfig
from common.corpus import CorpusError
from common.index import CorpusIndex
from common.instances import iter_batches, sample_random_documents, worker_documents, worker_rng
from common.wire import Header, WireError, decode, encode
from conftest import REPO, source_documents
from test_instances import STRUCTURED_SENTENCE_COUNTS, synthetic_vocab
from test_producer import collect, finish, pull  # noqa: F401 (pull is a fixture)

VOCAB = synthetic_vocab(size=150_000)  # int32 ids: every token of the corpora below has its own id
CONFIG = GenerationConfig(max_seq_len=128)


def unique_token_corpora(sizes: tuple[int, ...], mean_sentences: tuple[float, ...], seed: int) -> CorpusIndex:
    """Corpora back to back in one index, every token id used once (an id says where in the corpus it is).

    Corpus c has sizes[c] documents of about mean_sentences[c] sentences of 3-40 tokens."""
    rng = np.random.default_rng(seed)
    documents, next_id = [], 5  # ids 0-4 are the specials
    for size, mean in zip(sizes, mean_sentences):
        for _ in range(size):
            count = max(1, int(rng.poisson(mean)))
            document = []
            for _ in range(count):
                length = int(rng.integers(3, 41))
                document.append(list(range(next_id, next_id + length)))
                next_id += length
            documents.append(document)
    index = CorpusIndex.from_arrays(documents, dtype=np.int32)
    return replace(index, source_offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def blend_config(weights) -> CorpusConfig:
    return CorpusConfig(tuple(f"corpus{c}.txt" for c in range(len(weights))), "model", True, "cache",
                        corpus_weights=tuple(weights))


def corpus_of_tokens(index: CorpusIndex, ids: np.ndarray) -> np.ndarray:
    """The corpus each (unmasked) token id comes from."""
    position = ids.astype(np.int64) - 5
    sentence = np.searchsorted(index.sentence_offsets, position, side="right") - 1
    document = np.searchsorted(index.document_offsets, sentence, side="right") - 1
    return np.searchsorted(index.source_offsets, document, side="right") - 1


def epoch_rows(index: CorpusIndex, blend, seed: int, epoch: int, num_workers: int = 3):
    """Per instance of one epoch (all workers): the corpus of A, of B, whether B is random, the header's corpus."""
    rows = []
    for worker in range(num_workers):
        documents = worker_documents(index.num_documents, seed, epoch, worker, num_workers, blend=blend)
        for batch in iter_batches(index, documents, CONFIG, VOCAB, worker_rng(seed, worker, epoch), 64):
            ids = batch.input_ids.astype(np.int64)
            used = batch.masked_labels != -100
            for row in range(batch.size):  # undo the masking: every position then holds its corpus token
                ids[row, batch.masked_positions[row][used[row]]] = batch.masked_labels[row][used[row]]
            a_len = batch.lengths.astype(np.int64) - batch.token_type_ids.sum(axis=1, dtype=np.int64) - 2
            a_corpus = corpus_of_tokens(index, ids[:, 1])
            b_corpus = corpus_of_tokens(index, ids[np.arange(batch.size), a_len + 2])
            rows += zip(a_corpus, b_corpus, batch.next_sentence_labels, batch.corpus)
    return np.array(rows, dtype=np.int64)


def test_a_blend_gives_its_weights_as_shares_of_instances_and_nsp_stays_in_each_corpus():
    """0.8/0.2 of a small corpus of long documents and a large one of short documents: corpus 0 must repeat
    (it is smaller than its share), corpus 1 is sampled, and documents give different numbers of instances.

    Tolerance: an epoch has about n = 2,260 instances. Were they independent draws, the share's standard
    error would be sqrt(0.8 * 0.2 / n) = 0.0084. They are not (the documents are drawn per epoch, and a
    document's instance count varies with the chunk loop's draws), so the spread was measured: over 10 seeds x
    2 epochs the share's standard deviation was 0.0047 (mean 0.798, range 0.786-0.806), below the binomial
    figure. Each epoch's share must be within 4 binomial standard errors (0.034), and the mean of the 8
    epochs here within 4 of the standard errors of all their instances together (0.012).
    """
    shares = []
    for seed in range(4):
        index = unique_token_corpora((60, 1500), (12.0, 2.0), seed)
        blend = plan_blend(index, blend_config((0.8, 0.2)), CONFIG, seed)
        assert blend.epoch_documents[0] > 60  # the small corpus repeats...
        assert blend.epoch_documents[1] < 1500  # ...and the large one is sampled
        blended = corpus_index(index, blend)
        for epoch in range(2):
            rows = epoch_rows(blended, blend, seed, epoch)
            a_corpus, b_corpus, random_next, labelled = rows.T
            np.testing.assert_array_equal(labelled, a_corpus)  # the batch's corpus labels are right
            assert np.all(b_corpus == a_corpus), "a next segment crossed corpora"
            assert 0.4 < random_next[a_corpus == 1].mean()  # random next segments were drawn in both corpora
            assert 0.4 < random_next[a_corpus == 0].mean()
            share = float(np.mean(a_corpus == 0))
            se = np.sqrt(0.8 * 0.2 / len(rows))
            assert abs(share - 0.8) < 4 * se, (seed, epoch, share, len(rows))
            shares.append((share, len(rows)))
    share, total = sum(s * n for s, n in shares) / sum(n for _, n in shares), sum(n for _, n in shares)
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / total), shares


def test_without_a_blend_random_next_segments_come_from_the_whole_index():
    index = unique_token_corpora((30, 30), (5.0, 5.0), seed=1)
    rng = np.random.default_rng(0)
    current = np.repeat(np.arange(60), 200)
    other = sample_random_documents(index, current, rng)
    assert np.all(other != current)
    crossed = (other >= 30) != (current >= 30)
    assert 0.3 < crossed.mean() < 0.7  # the same draws as before blends existed: across the two halves
    blended = replace(index, corpus_offsets=index.source_offsets)
    other = sample_random_documents(blended, current, np.random.default_rng(0))
    assert np.all(other != current) and not np.any((other >= 30) != (current >= 30))


def test_the_epoch_plan_repeats_a_small_corpus_samples_a_large_one_and_is_the_same_in_every_worker():
    index = unique_token_corpora((20, 400), (8.0, 8.0), seed=2)
    blend = plan_blend(index, blend_config((1, 1)), CONFIG, seed=3)
    assert blend.weights == (0.5, 0.5)
    small, large = blend.epoch_documents
    assert small > 20 and large < 400 and abs(small - large) < 0.2 * large  # same document sizes: ~equal counts
    order = blend_epoch_order(blend, seed=3, epoch=0)
    counts = np.bincount(order, minlength=420)
    assert counts[:20].min() >= small // 20 and counts[:20].max() <= small // 20 + 1  # whole passes, then a sample
    assert counts[20:].max() == 1 and counts[20:].sum() == large  # a sample without replacement
    np.testing.assert_array_equal(order, blend_epoch_order(blend, seed=3, epoch=0))
    assert not np.array_equal(order, blend_epoch_order(blend, seed=3, epoch=1))
    assert not np.array_equal(np.sort(order[order >= 20]), np.sort(blend_epoch_order(blend, 3, 1)[order >= 20]))
    shares = [worker_documents(420, 3, 0, w, 4, blend=blend) for w in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(order))


def test_a_blended_stream_is_reproducible_and_a_restart_regenerates_the_same_batches():
    """Per (seed, worker, epoch), as without a blend: a restarted worker regenerates what it sent and skips it."""
    from producer.worker import iter_worker_batches

    index = unique_token_corpora((15, 200), (6.0, 2.0), seed=4)
    blend = plan_blend(index, blend_config((0.7, 0.3)), CONFIG, seed=9)
    blended = corpus_index(index, blend)

    def stream(worker):
        return list(iter_worker_batches(blended, CONFIG, VOCAB, 9, worker, 2, 32, epochs=2, blend=blend))

    first, again = stream(0), stream(0)
    assert len(first) == len(again) > 4 and {epoch for epoch, _ in first} == {0, 1}
    for (epoch_a, a), (epoch_b, b) in zip(first, again):
        assert epoch_a == epoch_b
        for name in (*a.FIELDS, "corpus"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    other = stream(1)
    assert not np.array_equal(first[0][1].input_ids, other[0][1].input_ids)


def test_a_corpus_of_one_document_cannot_be_blended():
    index = unique_token_corpora((10, 1), (3.0, 3.0), seed=0)
    with pytest.raises(CorpusError, match=r"^corpus1.txt: 1 document\(s\) with text, as a corpus of a blend"):
        plan_blend(index, blend_config((0.5, 0.5)), CONFIG, seed=0)


# --- the header -------------------------------------------------------------------------------------------


def blend_message(counts) -> bytes:
    index = unique_token_corpora((10, 10), (3.0, 3.0), seed=0)
    batch = next(iter_batches(index, range(20), CONFIG, VOCAB, np.random.default_rng(0), 8))
    return encode(Header("h:1", 0, 0, 0, 100, VOCAB.fingerprint(128), seed=0, blend=counts), batch)


def test_the_header_carries_the_blend_counts_and_refuses_bad_ones():
    assert decode(blend_message((5, 3))).header.blend == (5, 3)
    assert decode(blend_message(None)).header.blend is None
    for counts, problem in [((5, 2), "blend: counts add up to 7, the batch has 8 instances"),
                            ((8,), "blend: 1 corpora; a blend has 2 to 64"),
                            ((9, -1), "blend[1]: expected an integer in [0, 65536], got -1"),
                            ((True, 7), "blend[0]: expected an integer in [0, 65536], got True")]:
        with pytest.raises(WireError) as error:
            decode(blend_message(counts))
        assert str(error.value) == problem


# --- the producer ---------------------------------------------------------------------------------------------


def write_numbered_corpus(path, first: int, num_documents: int, sentences: int) -> None:
    """Documents numbered from `first` (conftest.source_documents reads the number back from A's tokens)."""
    rng = np.random.default_rng(first)
    lines = []
    for d in range(first, first + num_documents):
        for s in range(int(rng.integers(1, sentences + 1))):
            lines.append(f"document {d} sentence {s} the river and the stone.")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize("what, flags, message", [
    ("count", ["--corpus_weights", "0.8"], "--corpus_weights 0.8: must give one weight per --train_corpus source (2)"),
    ("sign", ["--corpus_weights", "0.8", "-1"], "--corpus_weights 0.8 -1.0: must be positive numbers"),
])
def test_bad_corpus_weights_are_usage_errors(what, flags, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "producer", "--train_corpus", "a.txt", "b.txt", "--bert_model",
                             "m", "--output_dir", str(tmp_path), *flags], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_blended_stream_shows_its_counts_in_headers_and_progress(tiny_model_dir, tmp_path, endpoint, pull):
    from common.vocab import Vocabulary, load_tokenizer

    general, domain = tmp_path / "general.txt", tmp_path / "domain.txt"
    write_numbered_corpus(general, 0, 300, 3)
    write_numbered_corpus(domain, 1000, 40, 8)
    log_path = tmp_path / "producer.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "producer", "--train_corpus", str(domain), str(general), "--corpus_weights", "0.8",
             "0.2", "--bert_model", str(tiny_model_dir), "--do_lower_case", "--cache_dir", str(tmp_path / "cache"),
             "--connect", endpoint, "--num_workers", "2", "--epochs", "2", "--batch_size", "16",
             "--max_seq_len", "256", "--progress_interval_s", "0.2"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    messages = collect(pull, process, log_path)
    assert finish(process, log_path) == 0, log_path.read_text()
    vocab = Vocabulary.from_tokenizer(load_tokenizer(tiny_model_dir, True), True)
    counts = np.zeros(2, dtype=np.int64)
    for message in messages:
        documents = np.array(source_documents(message.batch, vocab))
        from_tokens = (int(np.sum(documents >= 1000)), int(np.sum(documents < 1000)))  # domain is corpus 0
        assert message.header.blend == from_tokens
        counts += from_tokens
    share = counts[0] / counts.sum()
    # About 900 instances over the two epochs: 4 binomial standard errors are 0.053.
    assert abs(share - 0.8) < 4 * np.sqrt(0.16 / counts.sum()), (share, counts)
    text = log_path.read_text()
    assert "blend: domain.txt 80%" in text and "general.txt 20%" in text
    assert "blend sent: domain.txt" in text
