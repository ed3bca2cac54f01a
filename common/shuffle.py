"""Mixing a stream that arrives in document order: a worker's shuffle buffer of pairs, the trainer's pool of rows.

Why: a worker generates its documents one after another, so without mixing a 32-row micro-batch holds one to
three documents where a uniform draw from the epoch (the seed's `RandomSampler`, Google's global shuffle)
holds about 30, and gradients are noisier and biased on corpora of long documents (books, contracts).

How, after MosaicML streaming: its loaders never shuffle a whole epoch either; they shuffle within bounded
blocks of samples spanning many shards (`shuffle_block_size`, `py1b`/`py1e`), from an RNG derived from
(seed, epoch), so the order is reproducible and the memory bounded. A stream cannot know its samples' ids in
advance, so here the block is a shuffle buffer in the tf.data manner: `ShuffleBuffer` holds up to `capacity`
items and, once full, every item pushed in sends out a uniformly random held one.

- Producer (`iter_mixed_batches`): the buffer holds `SegmentPair`s, the untruncated pairs of the chunk loop:
  token offsets into the memory-mapped index, some 140 bytes each, so a buffer spanning hundreds of
  documents costs a few MB. Drawn pairs are made into batches (random next segment, truncation, masking) as before.
  The buffer is drained at each epoch's end (a message carries one epoch, and an epoch stays a function of
  (seed, worker, epoch) alone, so a restarted worker regenerates only its current epoch's head to skip it).
- Trainer (`RowPool`): a fixed pool of rows copied out of received messages; once full, each micro-batch is
  `size` rows drawn at random from it, which mixes workers and producers as well as documents.
"""

from __future__ import annotations

from typing import Generic, Iterable, Iterator, TypeVar

import numpy as np

from common.config import GenerationConfig
from common.index import CorpusIndex
from common.instances import IGNORE_INDEX, Batch, ScalarDraws, SegmentPair, create_pairs_from_document, make_batch
from common.vocab import Vocabulary

# Sized with `benchmarks/bench_mixing.py --sweep` (2000 documents of 150 sentences, ~37 pairs each; README,
# "Mixed batches"). Producer: 16384 pairs give 0.99 of a uniform draw's distinct documents per 32 rows of a
# worker's messages (8192: 0.97, 4096: 0.93), for ~2 MB of pairs (~140 bytes each) and ~0.1 CPU-s of chunk loop
# before a worker's first message of each epoch.
DEFAULT_SHUFFLE_PAIRS = 16384
# Trainer: 4096 rows alone lift unshuffled messages of 2 workers to 0.93 (2048: 0.87), for 2 MB at seq 128
# (467 bytes a row) and 4096 instances of stream before the first step.
DEFAULT_MIX_ROWS = 4096

T = TypeVar("T")


class ShuffleBuffer(Generic[T]):
    """Up to `capacity` items; once full, each `push` returns a uniformly random held item (0: no buffering)."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        if capacity < 0:
            raise ValueError(f"shuffle buffer capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._draws = ScalarDraws(rng)
        self._items: list[T] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """The held items (in no meaningful order), without taking them out."""
        return iter(self._items)

    def push(self, item: T) -> T | None:
        """Hold `item`; return the item it displaces (None while the buffer is filling)."""
        if len(self._items) < self.capacity:
            self._items.append(item)
            return None
        if not self.capacity:
            return item
        slot = self._draws.below(self.capacity)
        out, self._items[slot] = self._items[slot], item
        return out

    def drain(self) -> Iterator[T]:
        """Every held item, in a uniformly random order; the buffer is empty afterwards."""
        items = self._items
        while items:
            slot = self._draws.below(len(items))
            items[slot], items[-1] = items[-1], items[slot]  # swap-remove: O(1) per item
            yield items.pop()


def shuffle_rng(seed: int, worker: int, epoch: int) -> np.random.Generator:
    """The buffer's own stream, beside `worker_rng(seed, worker, epoch)`: reproducible from the same three."""
    return np.random.default_rng([seed, worker, epoch, 0x5B0F])


def iter_mixed_batches(index: CorpusIndex, documents: Iterable[int], config: GenerationConfig, vocab: Vocabulary,
                       rng: np.random.Generator, batch_size: int,
                       buffer: ShuffleBuffer[SegmentPair]) -> Iterator[Batch]:
    """Batches of `batch_size` instances of `documents`' pairs drawn through `buffer`, which ends empty.

    With a buffer of capacity 0 this is `instances.iter_batches` exactly (same draws, same batches).
    """
    draws = ScalarDraws(rng)
    ready: list[SegmentPair] = []
    for doc in documents:
        for pair in create_pairs_from_document(index, int(doc), config, draws):
            out = buffer.push(pair)
            if out is not None:
                ready.append(out)
        while len(ready) >= batch_size:
            yield make_batch(index, ready[:batch_size], config, vocab, rng)
            del ready[:batch_size]
    ready += buffer.drain()  # the epoch's end: the last pairs leave in random order, still many documents
    for start in range(0, len(ready), batch_size):
        yield make_batch(index, ready[start : start + batch_size], config, vocab, rng)


class RowPool:
    """The trainer's mixer: rows of received batches in a fixed pool; when it is full, micro-batches of `size`
    rows drawn uniformly from it without replacement. Holds at most `capacity` rows (memory fixed at the first
    batch: capacity x (seq x 3 + predictions x 4 + 3) bytes for a uint16 vocabulary). `capacity` 0 turns it
    into a pass-through of arrival order (the caller re-slices)."""

    def __init__(self, capacity: int, size: int, rng: np.random.Generator):
        if capacity and capacity < size:
            raise ValueError(f"the mixing pool must hold at least one micro-batch ({size} rows), got {capacity}")
        self.capacity, self.size, self.rng = capacity, size, rng
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
                if part.ndim == 2 and part.shape[1] < array.shape[1]:  # fewer prediction slots than the pool
                    fill = IGNORE_INDEX if name == "masked_labels" else 0
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
        """`size` random held rows (fewer if fewer are held) as a batch of their own; their slots are freed."""
        n = min(self.size, self.held)
        chosen = np.sort(self.rng.choice(self.held, n, replace=False))
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
            self._pool = {name: np.empty((self.capacity, *getattr(batch, name).shape[1:]), getattr(batch, name).dtype)
                          for name in Batch.FIELDS}
            return
        width = batch.masked_positions.shape[1]
        if width > self._pool["masked_positions"].shape[1]:
            for name, fill in (("masked_positions", 0), ("masked_labels", IGNORE_INDEX)):
                old = self._pool[name]
                self._pool[name] = np.pad(old, ((0, 0), (0, width - old.shape[1])), constant_values=fill)
