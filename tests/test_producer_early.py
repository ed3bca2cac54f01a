"""producer/early.py: a cold start streams epoch 0 from the documents already tokenized, and the workers take the
rest, so epoch 0 still sources every document exactly once.

The corpus's documents are recognisable from their tokens (document d's sentences all start "document d"), so a
received instance names its document. The build is made of many small pieces (a small `_CHUNK_CHARS`) and the
test holds it after a few pieces until the early stream has sent something, so the early stream has a head of
the epoch to send however fast the machine is.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

import common.index
from common.config import CorpusConfig, GenerationConfig
from common.index import build_or_load_index
from common.instances import worker_documents
from common.vocab import Vocabulary, load_tokenizer
from common.wire import decode
from conftest import source_documents, write_corpus
from producer.cli import StreamConfig
from producer.early import EarlyStream
from producer.worker import iter_worker_batches

TIMEOUT_S = 60  # a guard against hangs, never a speed assertion
NUM_DOCUMENTS = 120


class Receiver:
    """A PULL socket read on a thread, as a trainer would."""

    def __init__(self, endpoint: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.bind(endpoint)
        self.messages, self._stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self.socket.poll(50):
                self.messages.append(decode(self.socket.recv()))

    def close(self, drain_s: float = 1.5):
        time.sleep(drain_s)  # what the early stream's linger still delivers
        self._stop.set()
        self.thread.join()
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def setup(tiny_model_dir, tmp_path, endpoint, monkeypatch):
    monkeypatch.setattr(common.index, "_CHUNK_CHARS", 1500)  # a few documents per piece
    corpus = write_corpus(tmp_path / "corpus.txt", num_documents=NUM_DOCUMENTS, sentences_per_document=8)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(tiny_model_dir, True), True)
    config = CorpusConfig((str(corpus),), str(tiny_model_dir), True, str(tmp_path / "cache"))
    # shuffle_pairs 8: the early stream's buffer fills from the first pieces of this small build.
    stream = StreamConfig(endpoints=(endpoint,), batch_size=4, epochs=None, hwm_batches=2, linger_ms=1000,
                          trainer_gone_timeout_s=0.0, shuffle_pairs=8)
    return vocab, config, stream


def held_build(early: EarlyStream):
    """on_chunk that, from the third piece on, waits until the early stream has sent a batch."""
    seen = []

    def on_chunk(chunk):
        early.on_chunk(chunk)
        seen.append(chunk)
        deadline = time.monotonic() + TIMEOUT_S
        while len(seen) >= 3 and early.instances_sent == 0:
            assert time.monotonic() < deadline, "the early stream sent nothing"
            time.sleep(0.01)
    return on_chunk


def test_early_stream_and_workers_source_every_document_of_epoch_0_exactly_once(setup, endpoint):
    vocab, config, stream = setup
    generation = GenerationConfig(max_seq_len=256)  # room for any pair: "document d" is never truncated away
    receiver = Receiver(endpoint)
    try:
        # max_chars: it keeps only the first pieces, so the workers have a share of epoch 0 however fast it is.
        early = EarlyStream(stream, generation, vocab, seed=3, producer_id="test:1", worker=2, min_bytes=0,
                            max_chars=6000)
        index = build_or_load_index(config, vocab, 1, on_chunk=held_build(early))
        sent = early.finish()
    finally:
        receiver.close()
    assert early.error is None
    assert index.num_documents == NUM_DOCUMENTS
    assert 1 <= sent <= early.documents_held < NUM_DOCUMENTS, (sent, early.documents_held)
    # The early stream's messages: epoch 0, its own worker id, consecutive sequence numbers, the documents
    # [0, sent), each with all of its instances (its last message may be short), mixed by its shuffle buffer
    # rather than in corpus order.
    messages = receiver.messages
    assert messages and {(m.header.epoch, m.header.worker) for m in messages} == {(0, 2)}
    assert [m.header.sequence for m in messages] == list(range(len(messages)))
    assert all(m.header.epoch_instances > 0 for m in messages)
    early_documents = [d for m in messages for d in source_documents(m.batch, vocab)]
    assert early_documents != sorted(early_documents), "the early stream sent its documents in corpus order"
    assert set(early_documents) == set(range(sent))
    assert len(early_documents) == early.instances_sent

    # The workers' share of epoch 0 is every other document, once; later epochs are whole.
    shares = [worker_documents(NUM_DOCUMENTS, 3, 0, w, 2, sent_before=sent) for w in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(sent, NUM_DOCUMENTS))
    for worker in range(2):
        by_epoch = {0: set(), 1: set()}
        for epoch, batch in iter_worker_batches(index, generation, vocab, 3, worker, 2, 4, epochs=2,
                                                early_documents=sent):
            by_epoch[epoch].update(source_documents(batch, vocab))
        assert by_epoch[0] == set(shares[worker].tolist())
        assert by_epoch[1] == set(worker_documents(NUM_DOCUMENTS, 3, 1, worker, 2).tolist())


def test_early_stream_stays_off_for_a_small_corpus_and_a_cached_index(setup, endpoint):
    vocab, config, stream = setup
    early = EarlyStream(stream, GenerationConfig(), vocab, seed=0, producer_id="test:1", worker=1)  # 8 MB minimum
    build_or_load_index(config, vocab, 1, on_chunk=early.on_chunk)
    assert early.finish() == 0 and early.instances_sent == 0
    cached = EarlyStream(stream, GenerationConfig(), vocab, seed=0, producer_id="test:1", worker=1, min_bytes=0)
    build_or_load_index(config, vocab, 1, on_chunk=cached.on_chunk)  # cached now: no piece is handed over
    assert cached.finish() == 0 and cached.instances_sent == 0


def test_abort_stops_the_early_stream_when_start_up_is_interrupted(setup, endpoint):
    vocab, config, stream = setup
    receiver = Receiver(endpoint)
    early = EarlyStream(stream, GenerationConfig(), vocab, seed=0, producer_id="test:1", worker=1, min_bytes=0)
    on_chunk = held_build(early)

    def interrupted(chunk):
        on_chunk(chunk)
        if early.instances_sent:
            raise KeyboardInterrupt("SIGTERM")

    try:
        with pytest.raises(KeyboardInterrupt):
            build_or_load_index(config, vocab, 1, on_chunk=interrupted)
        early.abort()
        assert not early._thread.is_alive()
        assert early.error is None
    finally:
        receiver.close(drain_s=0)
