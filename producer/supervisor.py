"""Starts the worker processes, watches them, restarts the ones that die, and stops them all cleanly.

The supervisor owns SIGINT and SIGTERM: a signal only sets a flag, the watch loop then sets the workers'
stop flag, joins them for a few seconds (stream workers get `--linger_ms` more to hand over queued
batches), terminates, then kills what is left, and always joins, so no worker outlives it as an orphan or a
zombie. It prints one progress line per `--progress_interval_s`.

Worker death policy: a worker that dies (non-zero exit, signal, or an exception whose traceback it sends) is
reported and restarted with the same worker id. A stream worker's successor regenerates the same
deterministic batches and skips those its predecessor had sent, so no batch is ever sent twice; the ones
lost are those still queued in the dead process's socket and the one it was sending; a dump worker's successor keeps the epoch
parts already finished. A worker that dies more than MAX_DEATHS times within DEATH_WINDOW_S stops the
producer with exit status 1: something is wrong that restarting will not fix.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from common import seedformat
from common.blend import Blend, corpus_index, plan_blend
from common.index import CorpusIndex, build_or_load_index
from common.instances import estimate_epoch_instances
from common.progress import Every, log
from common.vocab import Vocabulary, load_tokenizer
from producer.cli import ProducerConfig
from producer.early import EarlyStream
from producer.worker import (WORKER_SIGNALS, Progress, Resume, WorkerJob, add_counts, dump_worker, stream_worker,
                             worker_main)

MAX_DEATHS = 3  # restarts allowed per worker within DEATH_WINDOW_S; one more death gives up
DEATH_WINDOW_S = 60.0
JOIN_TIMEOUT_S = 3.0  # on stop, beyond linger_ms, before stragglers are terminated, then killed
_WAIT_S = 0.25  # the watch loop's tick: how quickly a signal or a death is acted on


@dataclass(frozen=True)
class Resources:
    """What the workers share, built once in the supervisor before they are forked."""

    model_dir: Path
    vocab: Vocabulary
    index: CorpusIndex  # memory-mapped: forked workers share the pages
    epoch_instances: int  # estimated instances in one epoch (sent in every header)
    early_documents: int = 0  # epoch 0's documents already streamed while the index was built (producer.early)
    blend: Blend | None = None  # --corpus_weights: the corpora and their documents per epoch


def prepare(config: ProducerConfig, model_dir: Path) -> Resources:
    """Vocabulary, the corpus index (built in parallel if not cached) and the epoch-size estimate."""
    # producer.__main__ decides it from the flags and the tokenizer's files (common.vocab.decide_lower_case).
    assert config.corpus.do_lower_case is not None, "lower-casing must be decided before prepare()"
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, config.corpus.do_lower_case),
                                      config.corpus.do_lower_case)
    early = None
    # A cold start streams epoch 0 from the documents already tokenized, in corpus order; a blend's epoch is
    # a weighted draw over corpora that are not all tokenized yet, so a blend waits for its index.
    if config.stream is not None and config.corpus.corpus_weights is None:
        early = EarlyStream(config.stream, config.generation, vocab, config.pool.seed, producer_id(),
                            worker=config.pool.num_workers)
    try:
        index = build_or_load_index(config.corpus, vocab, num_procs=config.pool.num_workers,
                                    on_chunk=early.on_chunk if early else None)
        early_documents = early.finish() if early else 0
    except BaseException:
        if early:
            early.abort()
        raise
    started = time.monotonic()
    blend = None
    if config.corpus.corpus_weights is not None:
        blend = plan_blend(index, config.corpus, config.generation, config.pool.seed)
        index, epoch_instances = corpus_index(index, blend), blend.epoch_instances
        log.info("blend: %s", blend.describe())
    else:
        epoch_instances = estimate_epoch_instances(index, config.generation, vocab, config.pool.seed)
    log.info("epoch: ~%d instances from %d documents (estimated in %.1f s)", epoch_instances,
             index.num_documents if blend is None else sum(blend.epoch_documents), time.monotonic() - started)
    return Resources(model_dir, vocab, index, epoch_instances, early_documents, blend)


def producer_id() -> str:
    """host:pid of the supervisor: the same in every header of this producer, its workers' and its early stream's."""
    return f"{socket.gethostname()}:{os.getpid()}"


def raise_on_sigterm() -> None:
    """Until the supervisor takes over, SIGTERM interrupts start-up the way Ctrl-C does."""
    owner = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != owner:  # a forked tokenizing process: die as SIGTERM's default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


@dataclass
class Slot:
    """One worker id across the processes that have run it."""

    worker: int
    sent: object  # shared int64: batches sent by the current stream process (read after its death)
    process: multiprocessing.Process | None = None
    conn: Connection | None = None
    last: Progress = field(default_factory=Progress)  # the current process's latest report
    earlier: Progress = field(default_factory=Progress)  # totals of the processes before it
    error: str | None = None  # traceback sent by the current process
    done: bool = False  # the current process said it completed its epochs
    deaths: collections.deque = field(default_factory=collections.deque)
    finished: bool = False

    def totals(self) -> Progress:
        return Progress(self.earlier.instances + self.last.instances, self.earlier.batches + self.last.batches,
                        self.earlier.blocked_s + self.last.blocked_s, self.last.epoch,
                        corpus_instances=add_counts(self.earlier.corpus_instances, self.last.corpus_instances))


class Supervisor:
    def __init__(self, config: ProducerConfig, resources: Resources):
        self.config, self.resources = config, resources
        # fork: the children inherit the index maps and the vocabulary instead of rebuilding them.
        self.context = multiprocessing.get_context("fork")
        # The stop flag is one shared byte, not a multiprocessing.Event: an Event has a lock inside, and a
        # worker killed while holding it (SIGKILL, the OOM killer) would hang every other reader and set().
        self.stop = self.context.RawValue(ctypes.c_bool, False)
        self.producer_id = producer_id()
        self.slots = [Slot(w, self.context.RawValue("q", 0)) for w in range(config.pool.num_workers)]
        self.signal_received: int | None = None
        self.trainer_gone = False
        self.restarts = 0
        self.parts: dict[int, dict[int, int]] = collections.defaultdict(dict)  # dump: epoch -> worker -> count
        self.written: dict[int, int] = {}  # dump: epoch -> instances in its file
        self.started = time.monotonic()

    # --- running ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Exit status: 0 done or stopped by a signal while streaming; 1 gave up; 128+signal for a cut dump."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        if self.config.dump is not None:
            out = Path(self.config.dump.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            for leftover in seedformat.remove_leftovers(out):
                log.info("removed %s, left by an interrupted dump", leftover)
        try:
            for slot in self.slots:
                self._start(slot, Resume())
            status = self._watch()
        finally:
            self._shutdown()
            if self.config.dump is not None:
                seedformat.remove_leftovers(Path(self.config.dump.output_dir))  # parts of unfinished epochs
        self._summary()
        if status == 0 and self.config.dump is not None and len(self.written) < self.config.dump.epochs_to_generate:
            log.error("dump incomplete: %d of %d epochs written", len(self.written),
                      self.config.dump.epochs_to_generate)
            return 1
        return status

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum  # only a flag: the watch loop acts on it within _WAIT_S

    def _start(self, slot: Slot, resume: Resume) -> None:
        reader, writer = self.context.Pipe(duplex=False)  # one pipe per worker: a killed writer spoils only its own
        job = WorkerJob(
            worker=slot.worker, num_workers=self.config.pool.num_workers, seed=self.config.pool.seed,
            generation=self.config.generation, vocab=self.resources.vocab, index=self.resources.index,
            supervisor_pid=os.getpid(), producer_id=self.producer_id,
            epoch_instances=self.resources.epoch_instances, resume=resume,
            early_documents=self.resources.early_documents, blend=self.resources.blend,
        )
        if self.config.stream is not None:
            args = (stream_worker, job, self.config.stream, self.stop, writer, slot.sent)
        else:
            args = (dump_worker, job, self.config.dump, self.stop, writer)
        process = self.context.Process(target=worker_main, args=args, name=f"worker-{slot.worker}", daemon=True)
        # Signals stay blocked across the fork until the child has its own handlers (worker_main unblocks
        # them): one arriving in between would otherwise run the supervisor's handler in the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        writer.close()  # the child holds the write end now; we see EOF when it exits
        slot.process, slot.conn, slot.error, slot.done = process, reader, None, False
        slot.last = Progress(epoch=resume.epoch, epoch_first_sequence=resume.sequence)
        where = ""
        if resume.skip_until:
            where = f", resuming at epoch {resume.epoch} after batch {resume.skip_until}"
        elif resume.epoch:
            where = f", resuming at epoch {resume.epoch}"
        log.info("worker %d started: pid %d%s", slot.worker, process.pid, where)

    def _watch(self) -> int:
        ticker = Every(self.config.pool.progress_interval_s)
        previous = (time.monotonic(), Progress())
        while True:
            live = [slot for slot in self.slots if slot.process is not None]
            if not live:
                return 0
            ready = set(wait([s.conn for s in live] + [s.process.sentinel for s in live], timeout=_WAIT_S))
            for slot in live:
                if slot.conn in ready:
                    self._drain(slot)
            for slot in live:
                if slot.process.sentinel in ready and self._exited(slot) == "give up":
                    return 1
            self._write_complete_epochs()
            if self.signal_received is not None:
                name = signal.Signals(self.signal_received).name
                log.info("%s received: stopping the workers", name)
                return 0 if self.config.stream is not None else 128 + self.signal_received
            if self.trainer_gone:
                return 0
            if ticker.due():
                previous = self._progress_line(*previous)

    def _drain(self, slot: Slot) -> None:
        try:
            while slot.conn.poll():
                self._handle(slot, slot.conn.recv())
        except (EOFError, OSError):
            pass  # the worker has exited; its sentinel tells the rest

    def _handle(self, slot: Slot, message: tuple) -> None:
        kind = message[0]
        if kind == "progress":
            slot.last = message[2]
        elif kind == "part":
            _, worker, epoch, count = message
            self.parts[epoch][worker] = count
        elif kind == "done":
            slot.done = True
        elif kind == "error":
            slot.error = message[2]
        elif kind == "trainer_gone":
            if not self.trainer_gone:
                log.info("no trainer on any endpoint for %.1f s (worker %d noticed): stopping", message[2], slot.worker)
            self.trainer_gone = True
        else:
            raise AssertionError(f"unknown worker message {kind!r}")

    def _exited(self, slot: Slot) -> str:
        process = slot.process
        process.join()
        self._drain(slot)
        slot.conn.close()
        slot.earlier = slot.totals()
        slot.process, slot.conn, slot.last = None, None, Progress(epoch=slot.last.epoch,
                                                                  epoch_first_sequence=slot.last.epoch_first_sequence)
        stopping = self.stop.value or self.signal_received is not None or self.trainer_gone
        if process.exitcode == 0 and (slot.done or stopping):
            return "finished"
        how = describe_exit(process.exitcode) if process.exitcode else "exited before finishing (SIGTERM?)"
        log.error("worker %d (pid %d) %s%s", slot.worker, process.pid, how,
                  f":\n{slot.error.rstrip()}" if slot.error else "")
        now = time.monotonic()
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > DEATH_WINDOW_S:
            slot.deaths.popleft()
        if len(slot.deaths) > MAX_DEATHS:
            log.error("worker %d died %d times within %.0f s: giving up", slot.worker, len(slot.deaths), DEATH_WINDOW_S)
            return "give up"
        if stopping:
            return "died"
        self.restarts += 1
        # A dump worker resumes at its first epoch without a finished part (it finishes them in order).
        resume = Resume(epoch=sum(slot.worker in parts for parts in self.parts.values()))
        if self.config.stream is not None:
            # The last report names the epoch under way and its first batch's number; `sent` is exact.
            resume = Resume(epoch=slot.last.epoch, sequence=slot.last.epoch_first_sequence,
                            skip_until=slot.sent.value)
        self._start(slot, resume)
        return "restarted"

    # --- stopping -----------------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop every live worker: ask, wait, terminate, kill; always join."""
        self.stop.value = True
        live = [slot for slot in self.slots if slot.process is not None]
        linger_s = self.config.stream.linger_ms / 1000 if self.config.stream is not None else 0.0
        deadline = time.monotonic() + linger_s + JOIN_TIMEOUT_S
        while live and time.monotonic() < deadline:
            ready = set(wait([s.conn for s in live] + [s.process.sentinel for s in live],
                             timeout=max(0.0, deadline - time.monotonic())))
            for slot in live:
                if slot.conn in ready:
                    self._drain(slot)
                if slot.process.sentinel in ready:
                    self._exited(slot)
            live = [slot for slot in live if slot.process is not None]
        for slot in live:
            for action in ("terminate", "kill"):
                log.warning("worker %d (pid %d) did not stop in time: %s", slot.worker, slot.process.pid, action)
                getattr(slot.process, action)()
                slot.process.join(JOIN_TIMEOUT_S)
                if slot.process.exitcode is not None:
                    break
            slot.process.join()  # never leave a zombie
            slot.conn.close()
            slot.process = slot.conn = None
        self._write_complete_epochs()

    # --- reporting ----------------------------------------------------------------------------------------

    def _totals(self) -> Progress:
        totals = Progress()
        for slot in self.slots:
            t = slot.totals()
            totals.instances += t.instances
            totals.batches += t.batches
            totals.blocked_s += t.blocked_s
            totals.corpus_instances = add_counts(totals.corpus_instances, t.corpus_instances)
        return totals

    def _progress_line(self, since: float, before: Progress) -> tuple[float, Progress]:
        now, totals = time.monotonic(), self._totals()
        elapsed = max(now - since, 1e-9)
        live = [slot for slot in self.slots if slot.process is not None]
        rate = (totals.instances - before.instances) / elapsed
        if self.config.stream is not None:
            epochs = sorted({slot.last.epoch for slot in live}) or [0]
            epoch = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
            blocked = (totals.blocked_s - before.blocked_s) / (elapsed * max(len(live), 1))
            log.info("stream: %.0f inst/s, %.1f batches/s | epoch %s | %d instances sent (%.2f epochs of ~%d) | "
                     "blocked on socket %.0f%% | %d/%d workers up, %d restarts",
                     rate, (totals.batches - before.batches) / elapsed, epoch, totals.instances,
                     totals.instances / max(self.resources.epoch_instances, 1), self.resources.epoch_instances,
                     100 * min(blocked, 1.0), len(live), len(self.slots), self.restarts)
            if self.resources.blend is not None:
                log.info("stream: %s", blend_line(self.resources.blend, totals.corpus_instances))
        else:
            expected = self.resources.epoch_instances * self.config.dump.epochs_to_generate
            share = min(totals.instances / max(expected, 1), 0.99)  # an estimate: never claim 100% early
            eta = (expected - totals.instances) / rate if rate > 0 else float("inf")
            log.info("dump: [%-30s] %3.0f%% | %d/~%d instances | %d/%d epochs written | %.0f inst/s | ETA %s",
                     "#" * int(30 * share), 100 * share, totals.instances, expected, len(self.written),
                     self.config.dump.epochs_to_generate, rate, f"{max(eta, 0):.0f} s" if eta != float("inf") else "?")
        return now, totals

    def _summary(self) -> None:
        totals, elapsed = self._totals(), time.monotonic() - self.started
        what = f"sent in {totals.batches} batches" if self.config.stream is not None else "written"
        log.info("done: %d instances %s, %.1f s, %.0f inst/s, %d restarts", totals.instances, what, elapsed,
                 totals.instances / max(elapsed, 1e-9), self.restarts)
        if self.resources.blend is not None and self.config.stream is not None:
            log.info("done: %s", blend_line(self.resources.blend, totals.corpus_instances))

    # --- dump mode ----------------------------------------------------------------------------------------

    def _write_complete_epochs(self) -> None:
        """Concatenate every epoch whose parts are all finished into epoch_{i}.json, then its metrics."""
        if self.config.dump is None:
            return
        out, workers = Path(self.config.dump.output_dir), self.config.pool.num_workers
        for epoch in sorted(self.parts):
            if epoch in self.written or len(self.parts[epoch]) < workers:
                continue
            count = sum(self.parts[epoch].values())
            path = seedformat.concatenate_parts(out, epoch, workers)
            seedformat.write_metrics(out, epoch, count, self.config.generation.max_seq_len)
            self.written[epoch] = count
            log.info("wrote %s: %d instances, %.1f MB", path, count, path.stat().st_size / 1e6)


def blend_line(blend: Blend, counts: tuple[int, ...]) -> str:
    """`blend: a.txt 80.3% (want 80%), b.jsonl 19.7% (want 20%)` of the instances sent so far."""
    total = max(sum(counts), 1)
    counts = counts or (0,) * blend.num_corpora
    return "blend sent: " + ", ".join(f"{name} {count / total:.1%} (want {weight:.0%})" for name, count, weight
                                      in zip(blend.short_names(), counts, blend.weights))


def describe_exit(exitcode: int) -> str:
    """`exited with status 3` or `killed by signal SIGKILL`, from multiprocessing's exit code."""
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
