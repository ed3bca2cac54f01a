"""One worker process: its shard of every epoch's documents, as masked instances, pushed or written to disk.

Worker `w` of `n` generates, in each epoch, the instances of the documents `worker_documents(..., w, n)`
(every document belongs to exactly one worker per epoch) with the generator `worker_rng(seed, w, epoch)`,
so the stream is reproducible from the seed and the worker count, and a restarted worker can regenerate
exactly the batches its predecessor already sent and skip them.

A worker talks to its supervisor over its own one-way pipe (a worker killed mid-write spoils only its own):
progress every ~0.5 s, a finished dump part, "done" when its epochs are complete, "the trainer is gone",
or the traceback of the exception that ends it. It ignores SIGINT (Ctrl-C reaches the whole process group;
the supervisor decides) and stops cleanly when the supervisor's stop flag is set, on SIGTERM, or when the
supervisor itself has disappeared.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from typing import Callable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from common import security, seedformat
from common.blend import Blend
from common.config import GenerationConfig
from common.index import CorpusIndex
from common.instances import Batch, TrainingInstance, iter_instances, worker_documents, worker_rng
from common.shuffle import DEFAULT_SHUFFLE_PAIRS, ShuffleBuffer, iter_mixed_batches, shuffle_rng
from common.vocab import Vocabulary
from common.wire import Header, encode
from producer.cli import DumpConfig, StreamConfig

REPORT_INTERVAL_S = 0.5
GENERATION_ROWS = 128  # instances generated and masked together at least (numpy calls cost per batch, not per row)
WORKER_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_POLL_MS = 100  # how often a blocked send looks up from the socket to check for stop


class Stopped(Exception):
    """The supervisor asked this worker to stop, or is gone: finish up and exit 0."""


class TrainerGone(Exception):
    """Every endpoint has been disconnected for `--trainer_gone_timeout_s` after a trainer was there."""

    def __init__(self, seconds: float):
        super().__init__(f"no trainer connected for {seconds:.1f} s")
        self.seconds = seconds


@dataclass(frozen=True)
class Resume:
    """Where a (re)started worker begins: epoch `epoch`, whose first batch has sequence number `sequence`."""

    epoch: int = 0
    sequence: int = 0
    skip_until: int = 0  # batches numbered below this were sent by the process this one replaces


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker process needs; handed over by fork, so the index maps are shared, not copied."""

    worker: int
    num_workers: int
    seed: int
    generation: GenerationConfig
    vocab: Vocabulary
    index: CorpusIndex
    supervisor_pid: int
    producer_id: str = ""  # host:pid of the supervisor, the same for every worker and restart
    epoch_instances: int = 0  # the supervisor's estimate of the instances in a whole epoch
    resume: Resume = Resume()
    early_documents: int = 0  # documents [0, early_documents) of epoch 0 went out in a cold start's early stream
    blend: Blend | None = None  # --corpus_weights: each epoch's documents are the blend's draw (common/blend.py)


@dataclass
class Progress:
    """Totals of one worker process, reported to the supervisor."""

    instances: int = 0
    batches: int = 0
    blocked_s: float = 0.0
    epoch: int = 0
    epoch_first_sequence: int = 0
    corpus_instances: tuple[int, ...] = ()  # instances from each corpus of a blend (empty without one)


# --- what a worker generates ------------------------------------------------------------------------------


def iter_shard(index: CorpusIndex, generation: GenerationConfig, vocab: Vocabulary, seed: int, worker: int,
               num_workers: int, epoch: int, blend: Blend | None = None) -> Iterator[TrainingInstance]:
    """The instances of `worker`'s documents in `epoch`, in order: the same for every process of the worker."""
    documents = worker_documents(index.num_documents, seed, epoch, worker, num_workers, blend=blend)
    return iter_instances(index, documents, generation, vocab, worker_rng(seed, worker, epoch))


def iter_worker_batches(index: CorpusIndex, generation: GenerationConfig, vocab: Vocabulary, seed: int, worker: int,
                        num_workers: int, batch_size: int, first_epoch: int = 0, epochs: int | None = None,
                        early_documents: int = 0, blend: Blend | None = None,
                        shuffle_pairs: int = DEFAULT_SHUFFLE_PAIRS) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) per message, epochs `first_epoch` up to `epochs` (None: forever).

    The pairs go through a shuffle buffer of `shuffle_pairs` (common.shuffle) before they are made into
    batches, so a message mixes many documents instead of following one; the buffer is drained at each
    epoch's end, so an epoch depends only on (seed, worker, epoch) and a restart regenerates just its head.
    Batches are generated whole (pairs, then truncation and masking on the batch's arrays) in blocks of at
    least GENERATION_ROWS instances, and messages are rows of them, so they go to the wire as they are. A batch
    never spans two epochs (the header carries one epoch), so each epoch's last batch of a worker may be
    short. The stream depends on the batch size and the buffer's size as well as the seed and the worker count
    (masking draws per block). Epoch 0 leaves out the documents a cold start's early stream sent (producer.early).
    """
    # Small messages are cut from larger generated batches: masking costs about the same per batch of 8 or 128.
    block = batch_size * -(-GENERATION_ROWS // batch_size)
    for epoch in count(first_epoch) if epochs is None else range(first_epoch, epochs):
        documents = worker_documents(index.num_documents, seed, epoch, worker, num_workers,
                                     early_documents if epoch == 0 else 0, blend)
        buffer = ShuffleBuffer(shuffle_pairs, shuffle_rng(seed, worker, epoch))
        for generated in iter_mixed_batches(index, documents, generation, vocab, worker_rng(seed, worker, epoch),
                                            block, buffer):
            for start in range(0, generated.size, batch_size):
                yield epoch, generated.rows(start, start + batch_size)


def add_counts(left: tuple[int, ...], right: tuple[int, ...]) -> tuple[int, ...]:
    """Per-corpus counts added (either may be empty: no instances counted yet)."""
    if not left or not right:
        return tuple(left or right)
    return tuple(a + b for a, b in zip(left, right))


# --- talking to the supervisor ----------------------------------------------------------------------------


class Reporter:
    """Sends progress at most every REPORT_INTERVAL_S (never per batch) over the worker's pipe."""

    def __init__(self, conn: Connection, worker: int):
        self.conn, self.worker = conn, worker
        self._next = 0.0

    def maybe(self, progress: Progress) -> None:
        if time.monotonic() >= self._next:
            self.now(progress)

    def now(self, progress: Progress) -> None:
        self.conn.send(("progress", self.worker, Progress(**vars(progress))))
        self._next = time.monotonic() + REPORT_INTERVAL_S


class PeerWatch:
    """Follows the PUSH socket's connections (a ZeroMQ socket monitor) to notice a trainer that is gone."""

    def __init__(self, socket: zmq.Socket, timeout_s: float):
        # Created before connect(), so the first EVENT_CONNECTED is not missed.
        self.monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.timeout_s = timeout_s
        self.connected: collections.Counter = collections.Counter()  # endpoint -> open connections
        self.ever_connected = False
        self.alone_since = time.monotonic()

    def gone_for(self) -> float | None:
        """Seconds every endpoint has been disconnected, once that reaches the timeout; else None."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            endpoint = event["endpoint"]
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected[endpoint] += 1
                self.ever_connected = True
            elif self.connected[endpoint] > 0:
                self.connected[endpoint] -= 1
                if not any(self.connected.values()):
                    self.alone_since = time.monotonic()
        if not self.ever_connected or any(self.connected.values()):
            return None
        alone = time.monotonic() - self.alone_since
        return alone if alone >= self.timeout_s else None


_terminated = False  # set by SIGTERM in a worker process


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True


class Guard:
    """The checks a worker makes between batches and while blocked: stop asked, supervisor alive, trainer there."""

    def __init__(self, stop, supervisor_pid: int):
        self.stop, self.supervisor_pid = stop, supervisor_pid
        self.watch: PeerWatch | None = None

    def check(self) -> None:
        if self.stop.value or _terminated:
            raise Stopped()
        if os.getppid() != self.supervisor_pid:  # the supervisor was killed: do not live on as an orphan
            raise Stopped()
        if self.watch is not None:
            gone = self.watch.gone_for()
            if gone is not None:
                raise TrainerGone(gone)


class Sender:
    """A PUSH socket connected to every trainer endpoint; counts the time sends spend blocked."""

    def __init__(self, stream: StreamConfig, guard: Guard, while_blocked: Callable[[float], None]):
        self.guard = guard
        self.while_blocked = while_blocked  # called every _POLL_MS of a blocked send with the blocked total
        self.linger_ms = stream.linger_ms
        self.blocked_s = 0.0
        self.context = zmq.Context(io_threads=1)
        self.socket = self.context.socket(zmq.PUSH)
        # Past hwm_batches queued messages per endpoint a send blocks: a slow or absent trainer slows the
        # workers instead of growing their memory. Messages queued for an endpoint whose trainer is down
        # wait there for it to come back (ZMQ_IMMEDIATE stays off), so a restarted trainer loses nothing.
        self.socket.setsockopt(zmq.SNDHWM, stream.hwm_batches)
        self.socket.setsockopt(zmq.LINGER, stream.linger_ms)
        if stream.trainer_gone_timeout_s > 0:
            guard.watch = PeerWatch(self.socket, stream.trainer_gone_timeout_s)
        if stream.curve_secret_key is not None:  # before connect(): every connection is CURVE or none is
            security.configure_client(self.socket, security.client_keys(stream.curve_secret_key,
                                                                        stream.curve_server_key))
        for endpoint in stream.endpoints:
            self.socket.connect(endpoint)

    def send(self, data: bytes) -> None:
        """Send one message, waiting as long as it takes but checking the guard every _POLL_MS."""
        # copy=False: encode() returns a fresh bytes object per batch that nothing else holds or changes,
        # so ZeroMQ may read it after send() returns (pyzmq copies frames under 64 KiB anyway).
        try:
            self.socket.send(data, zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            pass
        start = time.monotonic()
        try:
            while True:
                self.guard.check()
                self.while_blocked(self.blocked_s + time.monotonic() - start)
                if self.socket.poll(_POLL_MS, zmq.POLLOUT):
                    try:
                        self.socket.send(data, zmq.NOBLOCK, copy=False)
                        return
                    except zmq.Again:  # another peer's turn in the round-robin was not ready after all
                        continue
        finally:
            self.blocked_s += time.monotonic() - start

    def close(self) -> None:
        """Close everything; queued batches get linger_ms to leave, so an absent trainer never hangs this."""
        if self.guard.watch is not None:
            self.socket.disable_monitor()
            self.guard.watch.monitor.close(linger=0)
        self.socket.close(linger=self.linger_ms)
        self.context.term()


# --- the two bodies ---------------------------------------------------------------------------------------


def stream_worker(job: WorkerJob, stream: StreamConfig, stop, conn: Connection, sent) -> None:
    """Push batches until the epochs are done, stop is asked or the trainer is gone.

    `sent` (shared memory) holds the number of batches handed to the socket so far, written just before each
    send; the supervisor reads it only if this process dies, to resume its successor right after them. Before,
    not after: a kill between the send and the count (a preempted process on a busy machine) would make the
    successor send that batch a second time; counted first, a kill at worst loses the batch in hand, as it
    loses the ones still queued in the socket. The stream is at most once, never twice.
    """
    guard = Guard(stop, job.supervisor_pid)
    reporter = Reporter(conn, job.worker)
    resume = job.resume
    progress = Progress(epoch=resume.epoch, epoch_first_sequence=resume.sequence)
    sequence = resume.sequence
    fingerprint = job.vocab.fingerprint(job.generation.max_seq_len)

    def while_blocked(blocked_s: float) -> None:  # a trainer that never reads still shows in the progress line
        progress.blocked_s = blocked_s
        reporter.maybe(progress)

    sender = Sender(stream, guard, while_blocked)
    try:
        batches = iter_worker_batches(job.index, job.generation, job.vocab, job.seed, job.worker, job.num_workers,
                                      stream.batch_size, resume.epoch, stream.epochs, job.early_documents, job.blend,
                                      stream.shuffle_pairs)
        for epoch, batch in batches:
            if epoch != progress.epoch:
                progress.epoch, progress.epoch_first_sequence = epoch, sequence
                reporter.now(progress)  # a restart then regenerates at most this epoch's head to skip it
            if sequence < resume.skip_until:  # sent by the process this one replaces: regenerated, not sent
                sequence += 1
                continue
            blend = batch.corpus_counts(job.blend.num_corpora) if job.blend is not None else None
            header = Header(job.producer_id, job.worker, epoch, sequence, job.epoch_instances, fingerprint,
                            seed=job.seed, blend=blend)
            data = encode(header, batch)
            sent.value = sequence + 1  # before the send (see the docstring)
            sender.send(data)
            sequence += 1
            progress.instances += batch.size
            progress.batches += 1
            if blend is not None:
                progress.corpus_instances = add_counts(progress.corpus_instances, blend)
            progress.blocked_s = sender.blocked_s
            reporter.maybe(progress)
            guard.check()
        conn.send(("done", job.worker))  # all --epochs sent: exit 0 means finished, not stopped
    except Stopped:
        pass
    except TrainerGone as gone:
        conn.send(("trainer_gone", job.worker, gone.seconds))
    finally:
        sender.close()
        progress.blocked_s = sender.blocked_s
        reporter.now(progress)


def dump_worker(job: WorkerJob, dump: DumpConfig, stop, conn: Connection) -> None:
    """Write this worker's part of every epoch from `job.resume.epoch` on; a finished part is kept as it is."""
    guard = Guard(stop, job.supervisor_pid)
    reporter = Reporter(conn, job.worker)
    progress = Progress(epoch=job.resume.epoch)
    try:
        for epoch in range(job.resume.epoch, dump.epochs_to_generate):
            progress.epoch = epoch
            part = seedformat.part_path(dump.output_dir, epoch, job.worker)
            if part.exists():  # a predecessor died between finishing it and saying so; it is whole (renamed)
                conn.send(("part", job.worker, epoch, seedformat.count_lines(part)))
                continue
            written = 0
            with seedformat.atomic_output(part) as out:
                for instance in iter_shard(job.index, job.generation, job.vocab, job.seed, job.worker,
                                           job.num_workers, epoch, job.blend):
                    out.write(seedformat.record_line(instance, job.vocab))
                    written += 1
                    progress.instances += 1
                    if written % 32 == 0:
                        guard.check()
                        reporter.maybe(progress)
            conn.send(("part", job.worker, epoch, written))
            reporter.now(progress)
        conn.send(("done", job.worker))
    except Stopped:
        pass
    finally:
        reporter.now(progress)


def worker_main(body: Callable, job: WorkerJob, config, stop, conn: Connection, *extra) -> None:
    """Process entry: signals set for a worker, and any exception's traceback sent to the supervisor."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C hits the whole process group; the supervisor decides
    # SIGTERM to the whole process group (systemd, `kill -- -PGID`) asks for the same clean stop as the flag.
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked by the supervisor across the fork
    try:
        body(job, config, stop, conn, *extra)
    except Exception:
        try:
            conn.send(("error", job.worker, traceback.format_exc()))
        except OSError:
            pass  # the supervisor is gone; nobody to tell
        sys.exit(1)
    finally:
        conn.close()
