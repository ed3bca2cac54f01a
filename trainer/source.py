"""Where the training loop's micro-batches come from: the ZeroMQ stream, or batches held in memory.

Every source cuts what it receives into micro-batches of exactly the trainer's size (a producer's
`--batch_size` never changes the training semantics), each padded only to its longest row (rounded up to an
allowed width, `common.lengths`), and hands them out as CPU tensors in their compact dtypes, pinned when
training on CUDA so the copy to the device can overlap compute. The stream source does its receiving,
decoding, validating, mixing (a pool of rows across messages that also groups them by length,
`common.shuffle.RowPool`) and tensor-making on a background thread behind a small bounded queue, so the loop
only waits when the producers are truly behind.

The interface every source keeps (the pregenerated source in `trainer.pregenerated` too):
`start()` (blocks until the first batch is there, so `max_seq_len` is known), `next_batch()`,
`planned_instances(epochs)` (None when the source cannot tell), `state_dict()` / `load_state_dict()`
(a resumable position), `stats()` (counters for the metrics) and `close()`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch

from common import security
from common.instances import IGNORE_INDEX, Batch
from common.lengths import Widths, fit_width, stream_widths, trim
from common.shuffle import RowPool
from common.progress import log
from common.vocab import Fingerprint
from common.wire import Header, WireError, decode
from trainer import TrainerError
from trainer.model import TensorBatch

WAIT_NOTE_S = 5.0  # how often "waiting for data" is said while the queue is empty
REJECT_NOTE_S = 5.0  # rejected messages are reported at most this often
NOTED_PRODUCERS = 1024  # distinct producer ids logged on their first batch (a bound against a flood of ids)
# With no message for this long, the mixing pool tops up the loop's queue from what it holds rather than let
# the GPU wait for it to fill (a slow start, the end of a finite stream): mixing never costs a stall.
MIX_IDLE_S = 0.5


def _is_local(endpoint: str) -> bool:
    """ipc://, inproc:// and loopback tcp endpoints cannot be reached from another host."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived while the loop was waiting for data."""


class DataTimeout(TrainerError):
    """No batch for longer than --data_timeout."""


def to_tensors(batch: Batch, pin_memory: bool) -> TensorBatch:
    """The batch as host tensors in its compact dtypes (see TensorBatch), pinned for an asynchronous copy."""
    def tensor(array: np.ndarray) -> torch.Tensor:
        if array.dtype == np.uint16:  # torch's uint16 has few operations; its bits as int16 have them all
            array = array.view(np.int16)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # a view of a received message: torch wants memory it may own
            array = array.copy()
        t = torch.from_numpy(array)
        return t.pin_memory() if pin_memory else t

    return TensorBatch(**{name: tensor(getattr(batch, name)) for name in TensorBatch.ARRAYS},
                       tokens=int(batch.lengths.sum(dtype=np.int64)))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(**{name: getattr(batch, name)[start:stop] for name in Batch.FIELDS})


def concat_batches(parts: Sequence[Batch], pad_id: int = 0) -> Batch:
    """One batch of all rows; prediction slots are padded to the widest part (producers may differ there), and
    the token arrays to the widest part's width with `pad_id` (messages are as wide as their longest row)."""
    if len(parts) == 1:
        return parts[0]
    positions = max(p.input_ids.shape[1] for p in parts)
    parts = [fit_width(p, positions, pad_id) for p in parts]
    width = max(p.masked_positions.shape[1] for p in parts)

    def padded(array: np.ndarray, fill: int) -> np.ndarray:
        extra = width - array.shape[1]
        return array if extra == 0 else np.pad(array, ((0, 0), (0, extra)), constant_values=fill)

    return Batch(
        input_ids=np.concatenate([p.input_ids for p in parts]),
        token_type_ids=np.concatenate([p.token_type_ids for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        masked_positions=np.concatenate([padded(p.masked_positions, 0) for p in parts]),
        masked_labels=np.concatenate([padded(p.masked_labels, IGNORE_INDEX) for p in parts]),
        next_sentence_labels=np.concatenate([p.next_sentence_labels for p in parts]))


class Reslicer:
    """Cuts a flow of batches of any size into micro-batches of exactly `size` instances; leftovers wait."""

    def __init__(self, size: int, pad_id: int = 0):
        self.size, self.pad_id = size, pad_id
        self._parts: list[Batch] = []
        self._pending = 0

    def push(self, batch: Batch) -> list[Batch]:
        """The micro-batches completed by `batch`, in order."""
        self._parts.append(batch)
        self._pending += batch.size
        out = []
        while self._pending >= self.size:
            take, rows, rest = [], 0, []
            for part in self._parts:
                need = self.size - rows
                if need == 0:
                    rest.append(part)
                elif part.size <= need:
                    take.append(part)
                    rows += part.size
                else:
                    take.append(slice_batch(part, 0, need))
                    rest.append(slice_batch(part, need, part.size))
                    rows += need
            out.append(concat_batches(take, self.pad_id))
            self._parts, self._pending = rest, self._pending - self.size
        return out


class MemorySource:
    """Batches held in memory, cycled in order: deterministic, for tests and benchmarks."""

    def __init__(self, batches: Sequence[Batch], micro_batch_size: int, pin_memory: bool = False,
                 epoch_instances: int | None = None):
        if not batches:
            raise ValueError("MemorySource needs at least one batch")
        self._batches = list(batches)
        self._micro = micro_batch_size
        self._pin = pin_memory
        self.max_seq_len = self._batches[0].input_ids.shape[1]
        self.epoch_instances = epoch_instances
        self._position = 0  # micro-batches handed out
        self._rewind()

    def _rewind(self) -> None:
        """Rebuild the reslicer's state for `self._position` by replaying the cycle from the start."""
        self._reslicer, self._ready, self._next_batch, handed = Reslicer(self._micro), [], 0, 0
        while handed < self._position:
            self._fill()
            skip = min(len(self._ready), self._position - handed)
            del self._ready[:skip]
            handed += skip

    def _fill(self) -> None:
        while not self._ready:
            self._ready = self._reslicer.push(self._batches[self._next_batch % len(self._batches)])
            self._next_batch += 1

    def start(self) -> None:
        pass

    def planned_instances(self, epochs: int) -> int | None:
        return None if self.epoch_instances is None else epochs * self.epoch_instances

    def next_batch(self) -> TensorBatch:
        self._fill()
        self._position += 1
        return to_tensors(self._ready.pop(0), self._pin)

    def state_dict(self) -> dict:
        return {"kind": "memory", "micro_batches": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._position = int(state.get("micro_batches", 0))
        self._rewind()

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class StreamSource:
    """A PULL socket bound at `bind`; a receive thread decodes, validates and re-slices behind a queue.

    The first valid message decides the stream: its fingerprint must match the model's (else a TrainerError
    naming both values ends the run) and its max_seq_len becomes the stream's. Later messages that differ
    from that, and anything that does not decode, are counted and reported at most every few seconds;
    training goes on. A stream has no position to resume: the state only counts what was consumed.
    """

    def __init__(self, bind: str, expected: Fingerprint, max_positions: int, micro_batch_size: int, *,
                 pin_memory: bool, prefetch_batches: int, max_message_bytes: int, data_timeout_s: float,
                 stop: threading.Event, curve: security.ServerKeys | None = None, connect_hint: str | None = None,
                 mix_rows: int = 0, mix_seed: Sequence[int] = (0,), also_bind: Sequence[str] = (),
                 alive: Callable[[], None] | None = None, group_by_length: bool = True, pad_to_multiple_of: int = 0,
                 compiled: bool = False):
        self.bind = bind
        # One PULL socket binds several endpoints: --train_corpus's private one and --bind for remote producers.
        self._also_bind = tuple(also_bind)
        self._alive = alive  # raises once a producer this process started has ended (trainer.local_producers)
        self._connect_hint = connect_hint or f"--connect {bind}"  # how producers reach us, for the timeout message
        self._curve_keys = curve  # None: no encryption, anyone who reaches the endpoint may send
        self._curve: security.CurveServer | None = None
        self._expected = expected
        self._max_positions = max_positions
        self._micro = micro_batch_size
        # Micro-batches are drawn from a pool of received rows (common.shuffle.RowPool): arrival order follows
        # one worker's documents at a time. Seeded from the trainer's --seed and rank.
        self._mix_rows = max(mix_rows, micro_batch_size) if mix_rows else 0
        self._mix_seed = [*mix_seed, 0x4A1]
        # Each micro-batch is padded only to its longest row, rounded up to an allowed width (common.lengths),
        # and with group_by_length the pool draws rows of similar length. The widths wait for max_seq_len.
        self._group_by_length = group_by_length
        self._pad_to_multiple_of, self._compiled = pad_to_multiple_of, compiled
        self.widths: Widths | None = None
        self._pin = pin_memory
        self._max_bytes = max_message_bytes
        self._timeout_s = data_timeout_s
        self._stop = stop
        self._queue: queue.Queue[TensorBatch] = queue.Queue(maxsize=prefetch_batches)
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._context = self._socket = None
        self._head: TensorBatch | None = None  # the first micro-batch, taken by start()
        self.max_seq_len: int | None = None
        self.epoch_instances: int | None = None
        self._stream_fingerprint: Fingerprint | None = None
        # Counters: written by the receive thread, read by the loop (plain ints; the GIL keeps them whole).
        self.messages_received = 0
        self.messages_rejected = 0
        self.instances_consumed = 0
        self._rejected_since_note = 0
        self._last_reject_note = -float("inf")
        self._producers: set[str] = set()  # producer ids seen, each logged once (up to NOTED_PRODUCERS)
        # Instances received from each corpus of a blend (--corpus_weights on the producers), from the headers.
        self.blend_instances: list[int] = []
        self._seed_owner: dict[int, str] = {}  # seed -> the first producer seen sending it

    # --- loop side --------------------------------------------------------------------------------------

    def start(self) -> None:
        import zmq

        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 4)  # little buffered here: backpressure reaches the producers
        # ZeroMQ drops, unread, any frame above the limit (and the connection that sent it; the producer's
        # socket reconnects by itself): a hostile or broken peer cannot make us buffer gigabytes.
        self._socket.setsockopt(zmq.MAXMSGSIZE, self._max_bytes)
        if self._curve_keys is not None:  # before bind(): no connection is ever accepted without CURVE
            self._curve = security.CurveServer(self._context, self._curve_keys, log)
            self._curve.start(self._socket)
        for endpoint in (self.bind, *self._also_bind):
            try:
                self._socket.bind(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise TrainerError(f"cannot bind --bind {endpoint}: {exc}") from exc
        if self._curve is not None:
            log.info("stream: listening on %s (CURVE: %d authorised producer key(s) in %s)", self.bind,
                     len(self._curve_keys.authorized), self._curve_keys.authorized_dir)
        else:
            log.info("stream: listening on %s", " and ".join((self.bind, *self._also_bind)))
            for endpoint in (self.bind, *self._also_bind):
                if not _is_local(endpoint):
                    log.warning("stream: %s accepts batches from anyone who can reach it, unencrypted; across hosts "
                                "use --curve_secret_key and --curve_authorized_keys (see bertstream-keys)", endpoint)
        # The socket is handed to the receive thread and never touched here again until it has stopped.
        self._thread = threading.Thread(target=self._receive_loop, name="receive", daemon=True)
        self._thread.start()
        self._head = self._wait()
        log.info("stream: first batch: max_seq_len %d, %s instances per epoch announced", self.max_seq_len,
                 self.epoch_instances or "no")

    def planned_instances(self, epochs: int) -> int | None:
        return epochs * self.epoch_instances if self.epoch_instances else None

    def next_batch(self) -> TensorBatch:
        if self._head is not None:
            batch, self._head = self._head, None
        else:
            batch = self._wait()
        self.instances_consumed += batch.size
        return batch

    def _wait(self) -> TensorBatch:
        started = time.monotonic()
        next_note = started + WAIT_NOTE_S
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
            if self._error is not None:
                raise self._error
            if self._stop.is_set():
                raise StopRequested()
            if self._alive is not None:
                self._alive()
            now = time.monotonic()
            if self._timeout_s and now - started >= self._timeout_s:
                raise DataTimeout(f"no batch on {self.bind} for {now - started:.0f}s (--data_timeout "
                                  f"{self._timeout_s:g}); is a producer running with {self._connect_hint}?")
            if now >= next_note:
                log.info("waiting for data on %s: no batch for %.0fs", self.bind, now - started)
                next_note = now + WAIT_NOTE_S

    def state_dict(self) -> dict:
        return {"kind": "stream", "instances_consumed": self.instances_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.instances_consumed = int(state.get("instances_consumed", 0))

    def stats(self) -> dict:
        return {"messages_received": self.messages_received, "messages_rejected": self.messages_rejected}

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._curve is not None:  # after the socket: it must never be open without its ZAP handler
            self._curve.stop()
            self._curve = None
        if self._context is not None:
            self._context.term()
            self._context = None

    # --- receive thread ---------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            pad_id = self._expected.pad_id
            reslicer = Reslicer(self._micro, pad_id)
            pool = None  # made at the first batch, which decides max_seq_len
            last_message = time.monotonic()
            while not self._closing.is_set():
                if self._curve is not None:
                    self._curve.note_failed_handshakes()
                if not self._socket.poll(100):
                    if pool is not None and time.monotonic() - last_message >= MIX_IDLE_S:
                        while pool.held >= self._micro and not self._queue.full():
                            self._put(self._tensors(pool.draw()))
                    continue
                last_message = time.monotonic()
                frame = self._socket.recv(copy=False)
                batch = self._accept(frame)
                if batch is None:
                    continue
                if pool is None:
                    self.widths = stream_widths(self.max_seq_len, self._pad_to_multiple_of, self._compiled)
                    pool = RowPool(self._mix_rows, self._micro, np.random.default_rng(self._mix_seed),
                                   max_seq_len=self.max_seq_len, pad_id=pad_id,
                                   group=self.widths if self._group_by_length else None)
                for mixed in pool.push(batch):
                    for micro in reslicer.push(mixed):
                        self._put(self._tensors(micro))
        except BaseException as exc:  # re-raised in the loop's thread by _wait
            self._error = exc

    def _tensors(self, micro: Batch) -> TensorBatch:
        """A micro-batch padded to its longest row's allowed width, as the loop's tensors."""
        return to_tensors(trim(micro, self.widths, self._expected.pad_id), self._pin)

    def _accept(self, frame):
        """The message's batch if it may train the model, else None (counted and reported)."""
        self.messages_received += 1
        try:
            message = decode(frame.buffer, self._max_bytes)
        except WireError as exc:
            self._reject(frame, str(exc))
            return None
        fp = message.header.fingerprint
        if self._stream_fingerprint is None:
            self._check_first(fp)
            self._stream_fingerprint = fp
            self.max_seq_len = fp.max_seq_len
            self.epoch_instances = message.header.epoch_instances or None
            self._note_producer(message.header)
            self._count_blend(message.header)
            return message.batch
        problems = self._stream_fingerprint.mismatches(fp)
        if fp.max_seq_len != self.max_seq_len:
            problems.append(f"max_seq_len: {self.max_seq_len} vs {fp.max_seq_len}")
        if problems:
            self._reject(frame, f"differs from the stream (ours vs theirs): {'; '.join(problems)}",
                         producer=message.header.producer_id)
            return None
        self._note_producer(message.header)
        self._count_blend(message.header)
        return message.batch

    def _count_blend(self, header: Header) -> None:
        """Add a blended message's per-corpus counts (a header without a blend counts for none)."""
        if header.blend is None:
            return
        if len(header.blend) > len(self.blend_instances):
            self.blend_instances += [0] * (len(header.blend) - len(self.blend_instances))
        for corpus, count in enumerate(header.blend):
            self.blend_instances[corpus] += count

    def blend_shares(self) -> list[float] | None:
        """Each corpus's share of the instances received so far, None without a blend."""
        counts = list(self.blend_instances)  # a copy: the receive thread appends to it
        total = sum(counts)
        return [count / total for count in counts] if total else None

    def _note_producer(self, header: Header) -> None:
        """One line per producer process that feeds the stream: a restarted or added producer shows up.

        A producer whose seed another producer already sent generates the same instances (same corpus and
        flags), or a restarted one replays what the model has trained on: warned once per such producer.
        """
        producer = header.producer_id
        if producer in self._producers or len(self._producers) >= NOTED_PRODUCERS:
            return
        self._producers.add(producer)
        log.info("stream: batches from producer %s", producer)  # its seed is in its own log
        first = self._seed_owner.setdefault(header.seed, producer)
        if first != producer:
            log.warning("stream: producers %s and %s both send seed %d: with the same corpus and flags they "
                        "stream the same instances (a producer restarted with the same --seed replays them). Start "
                        "producers without --seed (each draws its own) or give each a different one", first,
                        producer, header.seed)

    def _check_first(self, fp: Fingerprint) -> None:
        problems = self._expected.mismatches(fp)
        if fp.max_seq_len > self._max_positions:
            problems.append(f"max_seq_len: the model has {self._max_positions} positions vs {fp.max_seq_len}")
        if problems:
            raise TrainerError("producer fingerprint does not match the model (model vs producer): "
                               + "; ".join(problems))

    def _reject(self, frame, problem: str, producer: str | None = None) -> None:
        self.messages_rejected += 1
        self._rejected_since_note += 1
        now = time.monotonic()
        if now - self._last_reject_note >= REJECT_NOTE_S:
            try:
                peer = frame.get("Peer-Address")
            except Exception:  # not every transport knows its peer
                peer = "unknown peer"
            who = f"producer {producer} ({peer})" if producer else peer
            log.warning("stream: rejected %d message(s) (%d in all); latest from %s: %s",
                        self._rejected_since_note, self.messages_rejected, who, problem)
            self._rejected_since_note = 0
            self._last_reject_note = now

    def _put(self, batch: TensorBatch) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue
