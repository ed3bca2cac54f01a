"""A cold start that does not wait for the index: epoch 0 streams from the documents already tokenized.

Tokenizing a 40 MB corpus takes several seconds even on every core, and the seed's way (and a plain
"build the index, then fork the workers") makes the trainer wait all of it. When the supervisor has to build
the index of a large corpus (at least EARLY_MIN_BYTES) for a stream, an `EarlyStream` thread in the
supervisor takes each tokenized piece as the build hands it over (`on_chunk`) and streams epoch 0 from it at
once: documents in corpus order (the only order known before the end), each one's pairs drawn as usual,
except that a random next sentence comes from the documents tokenized so far rather than from the whole
corpus. When the build is done, `finish()` sends what is left of the documents begun and returns how many
documents it has sent; the workers then generate epoch 0 from every other document (shuffled as always), so
epoch 0 still visits each document once. Every later epoch, and the dump mode, are exactly DESIGN.md's.

Like a worker, the early stream sends its pairs through a shuffle buffer (common.shuffle), but a smaller one
(at most EARLY_SHUFFLE_PAIRS): whatever it holds when the build ends must still reach the trainer within
`finish()`'s deadline. A send given up there leaves the documents with unsent pairs to the workers, whole,
so some of their instances may go out twice.

Epoch 0 of a cold start is not reproducible from --seed (where the early stream stops depends on timing);
the epochs after it are. The early stream holds at most EARLY_MAX_CHARS of text's tokens in memory; if the
trainer takes them all before the build ends, it waits for the workers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np

from common.config import GenerationConfig
from common.index import CorpusIndex, IndexChunk
from common.instances import (ScalarDraws, SegmentPair, create_pairs_from_document, estimate_epoch_instances,
                              make_batch, pairs_array)
from common.progress import log
from common.shuffle import ShuffleBuffer
from common.vocab import Vocabulary
from common.wire import Header, encode
from producer.cli import StreamConfig
from producer.worker import Sender, Stopped

EARLY_MIN_BYTES = 8 << 20  # smaller corpora are indexed in about a second: not worth a second kind of epoch 0
EARLY_MAX_CHARS = 16 << 20  # text whose tokens the early stream keeps (about 8 MB of ids)
# 1024 pairs mix 0.77 of a uniform draw's documents per 32 rows (benchmarks/bench_mixing.py --sweep; the
# trainer's pool mixes further), fill from the first 1 MB piece of the build (~2000 pairs), so the first batch
# waits for no second piece, and drain in a few messages when the build ends.
EARLY_SHUFFLE_PAIRS = 1024
DOCUMENT = SegmentPair._fields.index("document")  # the column of a pair's document in pairs_array


class EarlyStream:
    """Streams the head of epoch 0 from a build in progress; inactive unless the build is large enough."""

    def __init__(self, stream: StreamConfig, generation: GenerationConfig, vocab: Vocabulary, seed: int,
                 producer_id: str, worker: int, min_bytes: int = EARLY_MIN_BYTES, max_chars: int = EARLY_MAX_CHARS):
        # Nothing to watch for: the workers notice a trainer that is gone; this thread only needs to end.
        self.stream = replace(stream, trainer_gone_timeout_s=0.0)
        self.generation, self.vocab, self.seed = generation, vocab, seed
        self.producer_id, self.worker = producer_id, worker  # worker: an id no worker process uses
        self.min_bytes, self.max_chars = min_bytes, max_chars
        self._cond = threading.Condition()
        self._chunks: list[IndexChunk] = []  # what the build has handed over (up to max_chars)
        self._documents = 0  # documents in those chunks
        self._total_bytes = 0
        self._finishing = False  # the build is done: send what is begun, then stop
        self._deadline: float | None = None  # after finishing, how long a blocked send may still wait
        self._aborted = threading.Event()
        self._settled = threading.Event()  # `documents_sent` is final
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self.documents_sent = 0  # documents [0, documents_sent) had every instance sent
        self.instances_sent = 0
        self.documents_held = 0  # documents handed over and kept (the early stream draws from these)
        self.first_batch_s: float | None = None  # from construction to the first batch handed to the socket
        self.error: BaseException | None = None

    # --- the build's side ---------------------------------------------------------------------------------

    def on_chunk(self, chunk: IndexChunk) -> None:
        """Called by the index build with each tokenized piece, in order."""
        if self._thread is None:
            if chunk.total_bytes < self.min_bytes:
                return
            self._thread = threading.Thread(target=self._run, name="early-stream", daemon=False)
            self._thread.start()
        with self._cond:
            if self._chunks and self._chunks[-1].text_chars >= self.max_chars:
                return  # enough to bridge the build; the rest waits for the workers
            self._chunks.append(chunk)
            self._documents += len(chunk.document_counts)
            self.documents_held = self._documents
            self._total_bytes = chunk.total_bytes
            self._cond.notify()

    def finish(self) -> int:
        """The build is done: send the rest of the documents begun; return how many documents were sent whole."""
        if self._thread is None:
            return 0
        with self._cond:
            self._finishing = True
            self._deadline = time.monotonic() + self.stream.linger_ms / 1000 + 1.0
            self._cond.notify()
        self._settled.wait()
        with self._cond:
            self._chunks = []  # the workers map the finished index; this copy is no longer needed
        log.info("early stream: %d instances from documents 0-%d sent while the index was built (first after "
                 "%.1f s); the workers take epoch 0's other documents", self.instances_sent,
                 self.documents_sent - 1, self.first_batch_s or 0.0)
        return self.documents_sent

    def abort(self) -> None:
        """Stop now (start-up interrupted or failed)."""
        self._aborted.set()
        with self._cond:
            self._finishing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the thread ---------------------------------------------------------------------------------------

    watch = None  # Sender's guard protocol (below): no peer watch here

    def check(self) -> None:
        """Sender's guard: give up a blocked send when aborted, or when finishing takes too long."""
        if self._aborted.is_set() or (self._deadline is not None and time.monotonic() > self._deadline):
            raise Stopped()

    def _run(self) -> None:
        try:
            sender = Sender(self.stream, self, lambda blocked_s: None)
            try:
                self._generate(sender)
            except Stopped:
                pass
            finally:
                self._settled.set()
                sender.close()  # waits up to linger_ms for queued batches to leave, while the workers start
        except BaseException as exc:  # reported by finish(); the workers still cover every document
            self.error = exc
            log.warning("early stream: stopped by %s: %s", type(exc).__name__, exc)
        finally:
            self._settled.set()

    def _index(self) -> CorpusIndex:
        """The documents handed over so far as one index (token offsets only grow, so older pairs stay valid)."""
        lengths = np.concatenate([c.sentence_lengths for c in self._chunks])
        counts = np.concatenate([c.document_counts for c in self._chunks])
        return CorpusIndex(np.concatenate([c.tokens for c in self._chunks]),
                           np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                           np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def _generate(self, sender: Sender) -> None:
        rng = np.random.default_rng([self.seed, 0xEA71])
        draws = ScalarDraws(rng)
        buffer = ShuffleBuffer(min(self.stream.shuffle_pairs, EARLY_SHUFFLE_PAIRS),
                               np.random.default_rng([self.seed, 0xEA71, 0x5B0F]))
        fingerprint = self.vocab.fingerprint(self.generation.max_seq_len)
        batch_size = self.stream.batch_size
        index, indexed_chunks, epoch_instances, sequence = None, 0, 0, 0
        pending = pairs_array([])  # (pairs, 7): drawn from the buffer, not sent yet
        incoming: list[SegmentPair] = []  # generated, not pushed into the buffer yet
        document = 0  # the next document to generate
        try:
            while True:
                with self._cond:
                    while not self._finishing and (document >= self._documents or self._documents < 2):
                        self._cond.wait()
                    if self._finishing:
                        break
                    if indexed_chunks != len(self._chunks):
                        index, indexed_chunks = self._index(), len(self._chunks)
                        if not epoch_instances:  # the trainer plans its steps on it: scaled from the first pieces
                            counted = estimate_epoch_instances(index, self.generation, self.vocab, self.seed)
                            epoch_instances = max(1, round(counted * self._total_bytes
                                                           / max(self._chunks[-1].text_chars, 1)))
                incoming += create_pairs_from_document(index, document, self.generation, draws)
                if len(incoming) >= batch_size:  # a push costs the same for a few pairs or many
                    pending = np.concatenate([pending, buffer.push(pairs_array(incoming))])
                    incoming = []
                document += 1
                while len(pending) >= batch_size:
                    sequence = self._send(sender, index, pending[:batch_size], rng, fingerprint, epoch_instances,
                                          sequence)
                    pending = pending[batch_size:]
            if not self._aborted.is_set():  # the documents begun are sent whole
                pending = np.concatenate([pending, buffer.push(pairs_array(incoming)), buffer.drain()])
                incoming = []
                while len(pending):
                    sequence = self._send(sender, index, pending[:batch_size], rng, fingerprint, epoch_instances,
                                          sequence)
                    pending = pending[batch_size:]
        finally:  # a send given up (Stopped) leaves every document with an unsent pair to the workers, whole
            unsent = np.concatenate([pending[:, DOCUMENT], buffer.rows()[:, DOCUMENT],
                                     pairs_array(incoming)[:, DOCUMENT]])
            self.documents_sent = int(unsent.min()) if len(unsent) else document

    def _send(self, sender: Sender, index: CorpusIndex, pairs: np.ndarray, rng: np.random.Generator,
              fingerprint, epoch_instances: int, sequence: int) -> int:
        batch = make_batch(index, pairs, self.generation, self.vocab, rng)
        header = Header(self.producer_id, self.worker, 0, sequence, epoch_instances, fingerprint, seed=self.seed)
        sender.send(encode(header, batch))
        self.instances_sent += batch.size
        if self.first_batch_s is None:
            self.first_batch_s = time.monotonic() - self._started
            log.info("early stream: first batch after %.1f s, from the %d documents tokenized so far (the index is "
                     "still being built)", self.first_batch_s, self.documents_held)
        return sequence + 1
