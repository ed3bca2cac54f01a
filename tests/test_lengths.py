"""Length-aware batches (issue 13): on short documents at max_seq_len 512 a streamed micro-batch is nearly all
real tokens, and the lengths trained on follow the stream's own from the first step to the last.

A real producer process streams one epoch over tcp into a real `StreamSource` (micro-batches of 32, the default
mixing pool and widths); the rows it sends are regenerated here from the same seed, so the test knows exactly
what was sent. Widths and pools are also checked on their own, without processes.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from common.config import CorpusConfig, GenerationConfig
from common.index import build_or_load_index
from common.instances import IGNORE_INDEX, Batch
from common.lengths import Widths, compile_widths, fit_width, multiple_widths, stream_widths, trim
from common.shuffle import DEFAULT_MIX_ROWS, RowPool, similar_rows
from common.vocab import Vocabulary, load_tokenizer
from conftest import free_tcp_endpoint, write_corpus
from producer.worker import iter_worker_batches
from test_producer import start_producer
from trainer.source import StreamSource

SEQ = 512
ROWS = 32
WORKERS = 2
MAX_PAD_FRAC = 0.10  # the bound for short documents at seq 512


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> Vocabulary:
    return Vocabulary.from_tokenizer(load_tokenizer(tiny_model_dir, True), True)


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    """Notes, tickets, abstracts: 12,000 documents of 2 or 3 sentences, 20 to 60 tokens each."""
    return write_corpus(tmp_path_factory.mktemp("short") / "short.txt", num_documents=12000, sentences_per_document=3)


@pytest.fixture(scope="module")
def sent(tiny_model_dir, short_corpus, vocab, tmp_path_factory) -> list[Batch]:
    """The epoch the producer below sends (its stream is a function of the seed, workers and batch size)."""
    config = CorpusConfig((str(short_corpus),), str(tiny_model_dir), True, str(tmp_path_factory.mktemp("cache")))
    index = build_or_load_index(config, vocab, 1)
    return [batch for w in range(WORKERS) for _, batch in
            iter_worker_batches(index, GenerationConfig(max_seq_len=SEQ), vocab, 42, w, WORKERS, ROWS, epochs=1)]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, short_corpus, vocab, sent, tmp_path_factory) -> list:
    """Every whole micro-batch the trainer's source hands the loop for that epoch, in order."""
    tmp_path = tmp_path_factory.mktemp("stream")
    # tcp, not ipc: over ipc libzmq drops what a finished producer left unread in the socket when the trainer's
    # queue is full at that moment (its engine treats the peer's hang-up as an error: docs/faults-and-security.md).
    endpoint = free_tcp_endpoint()
    source = StreamSource(endpoint, vocab.fingerprint(SEQ), SEQ, ROWS, pin_memory=False, prefetch_batches=4,
                          max_message_bytes=64 << 20, data_timeout_s=120.0, stop=threading.Event(),
                          mix_rows=DEFAULT_MIX_ROWS, mix_seed=(42, 0))
    process, log = start_producer(tiny_model_dir, short_corpus, tmp_path, "--connect", endpoint, "--max_seq_len",
                                  str(SEQ), "--num_workers", str(WORKERS), "--epochs", "1", "--batch_size",
                                  str(ROWS), "--seed", "42")
    try:
        source.start()  # 120 s: a guard against a hang, never a speed assertion
        # The pool hands out what it holds once the stream falls silent: every whole micro-batch of the epoch.
        batches = [source.next_batch() for _ in range(sum(b.size for b in sent) // ROWS)]
    finally:
        process.wait(timeout=60)
        source.close()
    assert process.returncode == 0, log.read_text()
    assert source.widths.allowed == multiple_widths(SEQ)
    return batches


def pad_frac(tokens: int, positions: int) -> float:
    return 1.0 - tokens / positions


def test_streamed_micro_batches_of_short_documents_are_nearly_all_real_tokens(sent, trained):
    as_sent = pad_frac(sum(int(b.lengths.sum()) for b in sent), sum(b.size * SEQ for b in sent))
    assert as_sent > 0.7, as_sent  # the corpus is what the issue measured: padded to 512, mostly padding
    got = pad_frac(sum(b.tokens for b in trained), sum(b.size * b.width for b in trained))
    assert got <= MAX_PAD_FRAC, f"{got:.3f} of the positions computed on are padding (at most {MAX_PAD_FRAC})"
    for batch in trained:  # each is as wide as its longest row, rounded up to 8, and its rows are whole
        lengths = batch.lengths.long()
        assert batch.width == -(-int(lengths.max()) // 8) * 8 and batch.tokens == int(lengths.sum())
        assert batch.size == ROWS


def test_every_row_sent_is_trained_once(sent, trained):
    """Over the run the lengths trained on are the stream's exactly: every row but the last partial micro-batch
    (fewer than 32 rows) is trained, none twice. So the length distribution cannot drift away over a run."""
    sent_rows = Counter(row_key(b, i) for b in sent for i in range(b.size))
    trained_rows = Counter(row_key(t, i) for t in trained for i in range(t.size))
    assert not trained_rows - sent_rows, "a row was trained that was not sent, or trained twice"
    assert sum((sent_rows - trained_rows).values()) < ROWS


def row_key(batch, i: int) -> tuple:
    """A row by its real tokens, segments and labels (what the model trains on; padding left out)."""
    n = int(batch.lengths[i])
    return (bytes(np.asarray(batch.input_ids[i, :n], dtype=np.int64)),
            bytes(np.asarray(batch.token_type_ids[i, :n], dtype=np.int64)),
            bytes(np.asarray(batch.masked_labels[i], dtype=np.int64)), int(batch.next_sentence_labels[i]))


def drifted_quarters(means: np.ndarray, overall: float, tolerance_se: float = 4.0) -> list[int]:
    """The quarters of a run whose mean micro-batch length is more than `tolerance_se` standard errors from the
    overall mean row length.

    Why this test: a micro-batch's rows share a width by design, so its mean length, not a row's, is the unit
    that varies; the pool draws each micro-batch's width at random (an anchor row), so the micro-batch means are
    close to independent draws, and a quarter's average of its n of them has standard error sd / sqrt(n). Four
    standard errors leave a 6e-5 chance per quarter (normal tails) of flagging an unbiased stream, while an order
    that drifts (the short rows first) sits tens of standard errors out: the self-check below shows it.
    """
    se = means.std(ddof=1) / np.sqrt(len(means) // 4)
    quarters = np.array_split(means, 4)
    return [q for q, part in enumerate(quarters) if abs(part.mean() - overall) > tolerance_se * se]


def test_the_lengths_trained_on_do_not_drift_over_the_run(sent, trained):
    means = np.array([float(b.lengths.double().mean()) for b in trained])
    overall = float(np.mean([length for b in sent for length in b.lengths.tolist()]))
    assert len(means) >= 400  # the pool (4096 rows) is a fraction of the run: the steady state is measured
    assert drifted_quarters(means, overall) == [], (overall, [q.mean() for q in np.array_split(means, 4)])
    # The statistic has the power to see drift: the same micro-batches shortest first fail it at both ends.
    assert {0, 3} <= set(drifted_quarters(np.sort(means), overall))


# --- widths and the pool on their own ---------------------------------------------------------------------


def test_widths_are_the_longest_row_rounded_up():
    widths = stream_widths(128)
    assert widths.allowed == multiple_widths(128) == tuple(range(8, 129, 8))
    assert [widths.of(n) for n in (5, 8, 9, 120, 121, 128)] == [8, 8, 16, 120, 128, 128]
    assert stream_widths(130).of(129) == 130  # max_seq_len itself need not be a multiple of 8
    assert stream_widths(128, multiple=128).allowed == stream_widths(128, multiple=4096).allowed == (128,)
    assert stream_widths(512, compiled=True).allowed == compile_widths(512)
    with pytest.raises(ValueError, match="longer than max_seq_len 128"):
        widths.of(129)


@pytest.mark.parametrize("max_seq_len", [64, 128, 256, 512, 1024])
def test_the_compile_ladder_is_short_and_wastes_little(max_seq_len):
    ladder = compile_widths(max_seq_len)
    assert ladder[-1] == max_seq_len and len(ladder) <= 16
    assert all(w % 8 == 0 for w in ladder[:-1])
    assert all(b / a <= 1.3 or b - a == 8 for a, b in zip(ladder, ladder[1:]))  # a row wastes under a quarter


def test_fit_width_cuts_padding_and_pads_with_the_pad_id():
    batch = Batch(np.arange(24, dtype=np.uint16).reshape(2, 12), np.ones((2, 12), np.uint8),
                  np.array([6, 9], np.uint16), np.ones((2, 2), np.uint16), np.full((2, 2), IGNORE_INDEX, np.int16),
                  np.zeros(2, np.uint8))
    cut = trim(batch, Widths((4, 8, 10, 12)), pad_id=0)
    assert cut.input_ids.shape == (2, 10) and (cut.input_ids == batch.input_ids[:, :10]).all()
    wide = fit_width(cut, 16, pad_id=7)
    assert wide.input_ids.shape == wide.token_type_ids.shape == (2, 16)
    assert (wide.input_ids[:, 10:] == 7).all() and not wide.token_type_ids[:, 10:].any()


def test_similar_rows_take_the_anchor_width_then_the_widths_below():
    widths = (8, 16, 24, 32)
    lengths = np.array([5] * 10 + [12] * 3 + [20] * 40 + [30] * 4)  # widths 8, 16, 24 and 32
    rng = np.random.default_rng(0)
    for _ in range(200):
        chosen = similar_rows(lengths, 6, widths, rng)
        got = sorted(lengths[chosen].tolist())
        assert len(set(chosen.tolist())) == 6
        # Anchored on a width: all six from it, or its rows topped up from the nearest width below (never above
        # while a lower one has rows).
        assert got in ([5] * 6, [5, 5, 5, 12, 12, 12], [20] * 6, [20, 20, 30, 30, 30, 30]), got


def test_the_pool_draws_widths_in_proportion_to_what_it_holds():
    """Anchored on a uniform row, a width's share of micro-batches is its share of rows: no length waits."""
    rng = np.random.default_rng(1)
    lengths = rng.choice([10, 50, 120], size=200_000, p=[0.6, 0.3, 0.1]).astype(np.uint16)
    batch = Batch(np.zeros((len(lengths), 128), np.uint16), np.zeros((len(lengths), 128), np.uint8), lengths,
                  np.ones((len(lengths), 2), np.uint16), np.full((len(lengths), 2), IGNORE_INDEX, np.int16),
                  np.zeros(len(lengths), np.uint8))
    pool = RowPool(1024, 32, np.random.default_rng(2), max_seq_len=128, group=stream_widths(128))
    out = [micro for start in range(0, len(lengths), 1000) for micro in pool.push(batch.rows(start, start + 1000))]
    homogeneous = [m for m in out if len(set(m.lengths.tolist())) == 1]
    assert len(homogeneous) >= 0.97 * len(out)  # a width per micro-batch, bar a few top-ups
    shares = Counter(int(m.lengths[0]) for m in homogeneous)
    n = len(homogeneous)
    for length, p in ((10, 0.6), (50, 0.3), (120, 0.1)):  # within 4 binomial standard errors
        assert abs(shares[length] / n - p) <= 4 * np.sqrt(p * (1 - p) / n), (length, shares[length] / n)
