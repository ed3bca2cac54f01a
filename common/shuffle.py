"""Mixing a stream that arrives in document order: a worker's shuffle buffer of pairs, the trainer's pool of rows.

Why: a worker generates its documents one after another, so without mixing a 32-row micro-batch holds one to
three documents where a uniform draw from the epoch (the seed's `RandomSampler`, Google's global shuffle)
holds about 30, and gradients are noisier and biased on corpora of long documents (books, contracts).

How, after MosaicML streaming: its loaders never shuffle a whole epoch either; they shuffle within bounded
blocks of samples spanning many shards (`shuffle_block_size`, `py1b`/`py1e`), from an RNG derived from
(seed, epoch), so the order is reproducible and the memory bounded. A stream cannot know its samples' ids in
advance, so here the block is a shuffle buffer in the tf.data manner: `ShuffleBuffer` holds up to `capacity`
items and, once full, every item pushed in sends out a uniformly random held one.

- Producer (`iter_mixed_batches`): the buffer holds `SegmentPair`s, the untruncated pairs of the chunk loop,
  as rows of an int64 array: token offsets into the memory-mapped index, 56 bytes each, so a buffer spanning
  hundreds of documents costs about a MB. Drawn pairs are made into batches (random next segment,
  truncation, masking) as before. The buffer is drained at each epoch's end (a message carries one epoch, and an epoch stays a function of
  (seed, worker, epoch) alone, so a restarted worker regenerates only its current epoch's head to skip it).
- Trainer (`RowPool`): a fixed pool of rows copied out of received messages; once full, each micro-batch is
  `size` rows drawn at random from it, which mixes workers and producers as well as documents. With length
  grouping (the trainer's default) the rows of a micro-batch share a padded width (`similar_rows`), so padding
  it to its longest row leaves little padding, and its width is a draw from the widths held, so the lengths
  trained on follow the stream's (common.lengths says why the widths).

Length grouping happens here, in the trainer's pool, not in the producer: the pool holds rows of every worker
and producer, so it finds many rows of each width, and it is where micro-batches are cut (a producer's
grouping would be undone by the pool's random draws, or make them follow one worker's window). The producer
only cuts each message's padding (common.wire).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from common.config import GenerationConfig
from common.index import CorpusIndex
from common.instances import IGNORE_INDEX, Batch, ScalarDraws, create_pairs_from_document, make_batch, pairs_array
from common.lengths import Widths
from common.vocab import Vocabulary

# Sized with `benchmarks/bench_mixing.py --sweep` (2000 documents of 150 sentences, ~37 pairs each; benchmarks/README.md,
# "Mixed batches"). Producer: 16384 pairs give 0.99 of a uniform draw's distinct documents per 32 rows of a
# worker's messages (8192: 0.97, 4096: 0.93), for 0.9 MB of pairs (56 bytes each) and ~0.15 CPU-s of chunk
# loop before a worker's first message of each epoch.
DEFAULT_SHUFFLE_PAIRS = 16384
# Trainer: 4096 rows alone lift unshuffled messages of 2 workers to 0.93 (2048: 0.87), for 2 MB at seq 128
# (467 bytes a row) and 4096 instances of stream before the first step.
DEFAULT_MIX_ROWS = 4096


class ShuffleBuffer:
    """Up to `capacity` rows (int64, `width` each: a pair as `instances.pairs_array` lays it out); once full,
    every row pushed in sends out a uniformly random held one (capacity 0: none held).

    Rows go in and out as arrays (a document's pairs at a time), each step vectorised, and no Python object
    is kept per pair: a pair costs a fraction of a microsecond and 56 bytes.
    """

    def __init__(self, capacity: int, rng: np.random.Generator, width: int = 7):
        if capacity < 0:
            raise ValueError(f"shuffle buffer capacity must be >= 0, got {capacity}")
        self.capacity, self._rng = capacity, rng
        self._rows = np.empty((capacity, width), dtype=np.int64)
        self.held = 0

    def __len__(self) -> int:
        return self.held

    def rows(self) -> np.ndarray:
        """The held rows (in no meaningful order), a view; they stay held."""
        return self._rows[: self.held]

    def push(self, rows: np.ndarray) -> np.ndarray:
        """Hold `rows`, in order; return the rows they displace, in order (none while the buffer fills).

        Row i takes a uniform slot s_i and sends out what s_i holds at that moment, which may be an earlier
        row of the same push (the same as pushing them one by one, in O(k log k) numpy calls for k rows).
        """
        room = min(self.capacity - self.held, len(rows))
        if room:
            self._rows[self.held : self.held + room] = rows[:room]
            self.held += room
            rows = rows[room:]
        if not len(rows) or not self.capacity:
            return rows
        k = len(rows)
        slots = (self._rng.random(k) * self.capacity).astype(np.int64)  # floor(u * capacity), u in [0, 1)
        order = np.argsort(slots, kind="stable")  # by slot, then by arrival
        by_slot = slots[order]
        first = np.empty(k, dtype=bool)  # the first row of the push to take its slot
        first[0] = True
        np.not_equal(by_slot[1:], by_slot[:-1], out=first[1:])
        last = np.empty(k, dtype=bool)  # the last one: it stays there
        last[-1] = True
        last[:-1] = first[1:]
        out = np.empty_like(rows)
        out[order[first]] = self._rows[by_slot[first]]  # what the slot held before this push
        later = np.flatnonzero(~first)
        out[order[later]] = rows[order[later - 1]]  # the row of this push that took the slot just before
        self._rows[by_slot[last]] = rows[order[last]]
        return out

    def drain(self) -> np.ndarray:
        """Every held row, in a uniformly random order; the buffer is empty afterwards."""
        out = self._rows[: self.held][self._rng.permutation(self.held)]  # fancy indexing copies
        self.held = 0
        return out


def shuffle_rng(seed: int, worker: int, epoch: int) -> np.random.Generator:
    """The buffer's own stream, beside `worker_rng(seed, worker, epoch)`: reproducible from the same three."""
    return np.random.default_rng([seed, worker, epoch, 0x5B0F])


def iter_mixed_batches(index: CorpusIndex, documents: Iterable[int], config: GenerationConfig, vocab: Vocabulary,
                       rng: np.random.Generator, batch_size: int, buffer: ShuffleBuffer) -> Iterator[Batch]:
    """Batches of `batch_size` instances of `documents`' pairs drawn through `buffer`, which ends empty.

    Pairs go into the buffer `batch_size` at a time, not a document at a time: a push costs a dozen numpy
    calls whatever its size, and a short document has only a few pairs. With a buffer of capacity 0 the pairs
    keep document order.
    """
    draws = ScalarDraws(rng)
    incoming: list = []  # SegmentPairs not pushed yet
    ready, count = [], 0  # arrays of pairs drawn from the buffer, and their rows in all
    for doc in documents:
        incoming += create_pairs_from_document(index, int(doc), config, draws)
        if len(incoming) < batch_size:
            continue
        drawn = buffer.push(pairs_array(incoming))
        incoming = []
        if len(drawn):
            ready.append(drawn)
            count += len(drawn)
        if count >= batch_size:
            pending = np.concatenate(ready)
            cut = count - count % batch_size
            for start in range(0, cut, batch_size):
                yield make_batch(index, pending[start : start + batch_size], config, vocab, rng)
            ready, count = [pending[cut:]], count - cut
    # The epoch's end: the last pairs leave in random order, still spanning many documents.
    pending = np.concatenate([*ready, buffer.push(pairs_array(incoming)), buffer.drain()])
    for start in range(0, len(pending), batch_size):
        yield make_batch(index, pending[start : start + batch_size], config, vocab, rng)


class RowPool:
    """The trainer's mixer: rows of received batches in a fixed pool; when it is full, micro-batches of `size`
    rows drawn at random from it. Holds at most `capacity` rows (memory fixed at the first batch: capacity x
    (max_seq_len x 3 + predictions x 4 + 3) bytes for a uint16 vocabulary). `capacity` 0 turns it into a
    pass-through of arrival order (the caller re-slices).

    With `group` (the stream's allowed widths, common.lengths) a micro-batch is rows of similar length, so that
    padding it to its longest row leaves little padding (`similar_rows`); without, rows regardless of length.
    Rows arrive as wide as their message (the longest row of it, common.wire); the pool pads them to
    `max_seq_len` with `pad_id`.
    """

    def __init__(self, capacity: int, size: int, rng: np.random.Generator, *, max_seq_len: int, pad_id: int = 0,
                 group: Widths | None = None):
        if capacity and capacity < size:
            raise ValueError(f"the mixing pool must hold at least one micro-batch ({size} rows), got {capacity}")
        self.capacity, self.size, self.rng = capacity, size, rng
        self.max_seq_len, self.pad_id, self.group = max_seq_len, pad_id, group
        self._pool: dict[str, np.ndarray] | None = None
        self.held = 0

    def push(self, batch: Batch) -> list[Batch]:
        """The micro-batches that `batch` makes room for (none while the pool fills)."""
        if not self.capacity:
            return [batch]
        self._fit(batch)
        out, start = [], 0
        while start < batch.size:
            take = min(self.capacity - self.held, batch.size - start)
            for name, array in self._pool.items():
                part = getattr(batch, name)[start : start + take]
                if part.ndim == 2 and part.shape[1] < array.shape[1]:  # narrower than the pool: pad the rest
                    fill = {"masked_labels": IGNORE_INDEX, "input_ids": self.pad_id}.get(name, 0)
                    array[self.held : self.held + take] = fill
                    array[self.held : self.held + take, : part.shape[1]] = part
                else:
                    array[self.held : self.held + take] = part
            self.held += take
            start += take
            if self.held == self.capacity:
                out.append(self.draw())
        return out

    def draw(self) -> Batch:
        """`size` held rows (fewer if fewer are held) as a batch of their own; their slots are freed."""
        n = min(self.size, self.held)
        if self.group is None or n == self.held:
            chosen = self.rng.choice(self.held, n, replace=False)
        else:
            chosen = similar_rows(self._pool["lengths"][: self.held], n, self.group.allowed, self.rng)
        chosen = np.sort(chosen)
        batch = Batch(**{name: array[chosen] for name, array in self._pool.items()})  # fancy indexing copies
        # Keep the held rows in [0, held - n): the survivors past that boundary move into the chosen slots below it.
        keep_below = self.held - n
        holes = chosen[chosen < keep_below]
        movers = np.setdiff1d(np.arange(keep_below, self.held), chosen, assume_unique=True)
        for array in self._pool.values():
            array[holes] = array[movers]
        self.held = keep_below
        return batch

    def _fit(self, batch: Batch) -> None:
        """Allocate the pool at the first batch; widen its prediction slots if a producer sends more."""
        if self._pool is None:
            self._pool = {}
            for name in Batch.FIELDS:
                array = getattr(batch, name)
                shape = (self.capacity, self.max_seq_len) if name in ("input_ids", "token_type_ids") else \
                    (self.capacity, *array.shape[1:])
                self._pool[name] = np.empty(shape, array.dtype)
            return
        width = batch.masked_positions.shape[1]
        if width > self._pool["masked_positions"].shape[1]:
            for name, fill in (("masked_positions", 0), ("masked_labels", IGNORE_INDEX)):
                old = self._pool[name]
                self._pool[name] = np.pad(old, ((0, 0), (0, width - old.shape[1])), constant_values=fill)


def similar_rows(lengths: np.ndarray, n: int, widths: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` rows of similar length: an anchor row drawn uniformly, then rows of its width (the allowed
    width its length is padded to), at random; if too few, rows of the widths below it, nearest first (they add
    padding but keep the batch's width), then the widths above, nearest first.

    Why so: the anchor makes the width a step trains on a draw from the lengths held, so what is trained follows
    the stream's length distribution at every point of a run (nothing waits in the pool for its turn: the shortest
    rows are not all trained at once, at an epoch's start or end); every row of a width is as good as any other
    for the padding, so they are drawn at random, which keeps the documents mixed as well as the pool can.
    """
    bins = np.searchsorted(np.asarray(widths), lengths, side="left")  # a row's width: widths[bin] >= its length
    anchor = bins[rng.integers(len(lengths))]
    distance = np.where(bins <= anchor, anchor - bins, bins - anchor + len(widths))  # below before above
    key = distance + rng.random(len(lengths))  # random within a width, which the integer part keeps apart
    return np.argpartition(key, n - 1)[:n]
