"""NSP pairs, truncation and masking: the seed's instance generation over token ids, a batch at a time.

The call tree follows Google's `create_pretraining_data.py` and the seed that copied it:
`create_pairs_from_document` (the chunk loop) → `truncate_pairs` → `mask_batch`, then `Batch`, the
fixed-shape arrays for `BertForPreTraining`. Every random draw comes from the `numpy.random.Generator`
passed in. Segments are (start, stop) ranges into the index's flat token array: a document's sentences are
contiguous there, so a segment of whole sentences is one slice and truncation only moves its ends.

Why a batch at a time: an instance is ~128 tokens, so masking one costs a dozen numpy calls of a few µs
each on tiny arrays; masking 64 at once costs the same dozen calls. The chunk loop stays per document in
plain Python, drawing its scalars from a buffer (`ScalarDraws`) rather than one Generator call each; the
random next segments and truncation, which do not feed back into the loop, are drawn for the whole batch
with its arrays (`random_segments`, `truncate_pairs`). The per-instance API
(`TrainingInstance`, `create_instances_from_document`, `iter_instances`, `create_masked_lm_predictions`)
is the same code on batches, split into rows.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import chain
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from common.blend import Blend, blend_epoch_order
from common.config import GenerationConfig
from common.index import CorpusIndex
from common.vocab import Vocabulary

IGNORE_INDEX = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)
INSTANCE_BATCH = 64  # pairs masked together when instances are asked for one by one (dump, evaluation)


@dataclass(frozen=True)
class TrainingInstance:
    input_ids: np.ndarray  # (length,) int32: [CLS] A [SEP] B [SEP], masked
    a_len: int  # tokens of segment A; segment 1 starts at a_len + 2
    is_random_next: bool
    masked_positions: np.ndarray  # (k,) int32, sorted ascending
    masked_labels: np.ndarray  # (k,) int32: the original ids at masked_positions


@dataclass(frozen=True)
class Batch:
    """A fixed-shape batch, in the smallest dtypes that hold it (this is also what travels on the wire)."""

    input_ids: np.ndarray  # (batch, seq) uint16 or int32, [PAD] after each length
    token_type_ids: np.ndarray  # (batch, seq) uint8
    lengths: np.ndarray  # (batch,) uint16: tokens before padding
    masked_positions: np.ndarray  # (batch, max_predictions) uint16, 0 where unused
    masked_labels: np.ndarray  # (batch, max_predictions) int16 or int32, IGNORE_INDEX where unused
    next_sentence_labels: np.ndarray  # (batch,) uint8: 0 = B follows A, 1 = B is random
    # (batch,) uint8: the blend's corpus each row's A comes from; None without a blend. Not sent as an array:
    # the message header carries its counts (common/wire.py).
    corpus: np.ndarray | None = None

    FIELDS = ("input_ids", "token_type_ids", "lengths", "masked_positions", "masked_labels", "next_sentence_labels")

    @property
    def size(self) -> int:
        return len(self.lengths)

    def attention_mask(self) -> np.ndarray:
        """(batch, seq) uint8: 1 on real tokens."""
        return (np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.uint8)

    def dense_mlm_labels(self) -> np.ndarray:
        """(batch, seq) int64 labels with IGNORE_INDEX off the masked positions: the stock model's format."""
        dense = np.full(self.input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        rows, cols = np.nonzero(self.masked_labels != IGNORE_INDEX)
        dense[rows, self.masked_positions[rows, cols]] = self.masked_labels[rows, cols]
        return dense

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop) as a batch of their own (views, no copy)."""
        return Batch(**{name: getattr(self, name)[start:stop] for name in self.FIELDS},
                     corpus=None if self.corpus is None else self.corpus[start:stop])

    def corpus_counts(self, num_corpora: int) -> tuple[int, ...] | None:
        """Rows from each corpus of a blend (None without one): what the message header carries."""
        if self.corpus is None:
            return None
        return tuple(np.bincount(self.corpus, minlength=num_corpora).tolist())

    def instances(self) -> list[TrainingInstance]:
        """The rows as instances (for the seed's records and per-instance callers)."""
        lengths = self.lengths.tolist()
        a_lens = (self.lengths - self.token_type_ids.sum(axis=1, dtype=np.int64) - 2).tolist()
        counts = (self.masked_labels != IGNORE_INDEX).sum(axis=1).tolist()
        return [TrainingInstance(self.input_ids[row, :n].astype(np.int32), a_len, bool(random_next),
                                 self.masked_positions[row, :k].astype(np.int32),
                                 self.masked_labels[row, :k].astype(np.int32))
                for row, (n, a_len, k, random_next) in enumerate(zip(lengths, a_lens, counts,
                                                                      self.next_sentence_labels.tolist()))]


class SegmentPair(NamedTuple):
    """Segment A as a token range, before truncation; B as one too, or, for a random next, how to draw it.

    A random B does not feed back into the chunk loop, so it is drawn later for a whole batch at once
    (`random_segments`): from another document than `document`, aiming at `b_target` tokens.
    """

    a_start: int
    a_stop: int
    b_start: int  # B's token range when B follows A; 0, 0 for a random B until it is drawn
    b_stop: int
    is_random_next: bool
    b_target: int  # a random B's wanted length in tokens (target - len(A)); 0 when B follows A
    document: int  # the document A comes from


class ScalarDraws:
    """Uniform floats from a Generator, a block per numpy call: a Generator scalar call costs 1-3 µs, and the
    chunk loop needs a few per instance. `below(n)` is floor(u * n), uniform on [0, n) up to the 2^-53
    granularity of u (a bias below n / 2^53, some 1e-10 for a corpus of a million sentences)."""

    def __init__(self, rng: np.random.Generator, block: int = 256):
        self.rng, self.block = rng, block
        self._buffer: list[float] = []

    def uniform(self) -> float:
        if not self._buffer:
            self._buffer = self.rng.random(self.block).tolist()
            self._buffer.reverse()  # pop() from the end hands them out in the drawn order
        return self._buffer.pop()

    def below(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)  # min: belt and braces; u < 1 already keeps it below n


# --- segments -------------------------------------------------------------------------------------------


def sample_random_documents(index: CorpusIndex, current: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of `current`, another document, with probability proportional to its sentence count.

    A uniform sentence outside the current document's sentences (so never the current one), and the
    document it belongs to. Integers are floor(u * n) of uniforms u, uniform up to u's 2^-53 granularity.
    In a blend (`index.corpus_offsets`), the sentence is drawn from the current document's corpus only.
    """
    do = index.document_offsets.view(np.ndarray)
    first, count = do[current], do[current + 1] - do[current]
    low, high = 0, do[-1]  # the sentences to draw from: the whole index, or the current document's corpus
    if index.corpus_offsets is not None:
        corpora = np.asarray(index.corpus_offsets)
        corpus = np.searchsorted(corpora, current, side="right") - 1
        low, high = do[corpora[corpus]], do[corpora[corpus + 1]]
    others = high - low - count  # sentences outside each current document
    sentence = low + np.minimum((rng.random(len(current)) * others).astype(np.int64), others - 1)
    sentence += count * (sentence >= first)  # skip over the current document's sentences
    return np.searchsorted(do, sentence, side="right") - 1


def random_segments(index: CorpusIndex, documents: np.ndarray, b_targets: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token ranges of random next segments: from another document than each of `documents`, starting at a
    uniform sentence of it, whole sentences until `b_targets` tokens (at least one, at most to its end)."""
    do, so = index.document_offsets.view(np.ndarray), index.sentence_offsets.view(np.ndarray)
    other = sample_random_documents(index, documents, rng)
    o_first, o_stop = do[other], do[other + 1]
    b_first = o_first + np.minimum((rng.random(len(other)) * (o_stop - o_first)).astype(np.int64),
                                   o_stop - o_first - 1)
    b_start = so[b_first]
    # Sentence offsets are sorted, so one search over all of them finds where B reaches its target.
    b_stop = np.clip(np.searchsorted(so, b_start + b_targets), b_first + 1, o_stop)
    return b_start, so[b_stop]


def truncate_pairs(a_start: np.ndarray, a_stop: np.ndarray, b_start: np.ndarray, b_stop: np.ndarray,
                   max_num_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Cut each pair to `max_num_tokens`, one token at a time from the longer side, front or back at random.

    The seed loops per token; this computes how many tokens each side loses (the longer side until the two
    are level, then alternately, ties going to B) and draws each side's front share as a binomial, which is
    the same distribution in O(1), so a 10 MB one-sentence document costs no more than a short one.
    All arguments are (pairs,) int64 arrays; returns the four cut ones.
    """
    la, lb = a_stop - a_start, b_stop - b_start
    excess = np.maximum(la + lb - max_num_tokens, 0)
    a_longer = la > lb
    # Until level: the longer side alone (B also takes the first cut of a tie, so it leads by one).
    level = np.minimum(excess, np.where(a_longer, la - lb, lb - la + 1))
    rest = excess - level
    drop_a = np.where(a_longer, level + rest // 2, (rest + 1) // 2)
    drop_b = np.where(a_longer, (rest + 1) // 2, level + rest // 2)
    front_a, front_b = rng.binomial(drop_a, 0.5), rng.binomial(drop_b, 0.5)
    return a_start + front_a, a_stop - (drop_a - front_a), b_start + front_b, b_stop - (drop_b - front_b)


def truncate_seq_pair(a: tuple[int, int], b: tuple[int, int], max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """`truncate_pairs` for one pair."""
    cut = truncate_pairs(*(np.array([x], dtype=np.int64) for x in (*a, *b)), max_num_tokens, rng)
    a0, a1, b0, b1 = (int(x[0]) for x in cut)
    return (a0, a1), (b0, b1)


# --- masking --------------------------------------------------------------------------------------------


def num_to_mask(length: int, config: GenerationConfig) -> int:
    """The seed's budget; `length` counts the special tokens. Python's round (half to even), as the seed."""
    return min(config.max_predictions_per_seq, max(1, int(round(length * config.masked_lm_prob))))


def mask_batch(ids: np.ndarray, lengths: np.ndarray, a_lens: np.ndarray, config: GenerationConfig,
               vocab: Vocabulary, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask `ids` (batch, seq) in place; return (positions, labels), each (batch, max_predictions_per_seq).

    Per row, the seed's procedure: the candidates (every position but [CLS] and the two [SEP]s) are grouped
    into words, the words are shuffled, and taken in that order while they fit the budget (a word that would
    overflow it is skipped, a later shorter one may still fit). Vectorised: each word gets a uniform key and
    argsort orders a row's words (a uniform random permutation); the greedy walk is done in rounds. A round
    drops the words larger than what is left of the budget (they can never fit again: it only shrinks),
    takes the prefix of the rest that fits, and skips the first word that does not; the ones after it wait
    for the next round. Each round takes at least one word, and two or three end every row. Without
    whole-word masking every word is one token and the walk is the first `budget` words of the order.
    Indices are flat (row * seq + position) where that saves numpy calls: each costs a few µs here.
    """
    size, seq = ids.shape
    pos = np.arange(seq)
    lengths = lengths.astype(np.int64)
    candidate = (pos >= 1) & (pos < (lengths - 1)[:, None]) & (pos != (a_lens + 1)[:, None])  # (batch, seq)
    starts = candidate
    if config.whole_word_mask:
        # A `##` piece joins the word before it, except as the first token of a segment: the word before
        # would be across [CLS] or [SEP] (truncation can leave a piece first; the seed joins it, a bug).
        joins = vocab.is_continuation[ids] & (pos != 1) & (pos != (a_lens + 2)[:, None])
        starts = candidate & ~joins
    word_of = np.cumsum(starts, axis=1) - 1  # (batch, seq): a candidate's word, numbered within its row
    words = int(word_of[:, -1].max()) + 1
    cand = np.flatnonzero(candidate)  # (candidates,) flat positions, ascending
    cand_word = cand // seq * words + word_of.reshape(-1)[cand]  # flat (row, word) slot of each candidate
    word_size = np.bincount(cand_word, minlength=size * words)  # (batch * words,) 0: no such word

    keys = rng.random(size * words)
    keys[word_size == 0] = 2.0  # missing words sort last
    order = np.argsort(keys.reshape(size, words), axis=1) + (np.arange(size) * words)[:, None]  # flat slots
    sizes = word_size[order]  # (batch, words) in each row's shuffled order
    budget = np.minimum(config.max_predictions_per_seq,
                        np.maximum(1, np.rint(lengths * config.masked_lm_prob).astype(np.int64)))
    if not config.whole_word_mask:
        taken = (pos[:words] < budget[:, None]) & (sizes > 0)
    else:
        # The rounds run on the rows with words still waiting: once most rows are done (after the first
        # round or two), the few that go on are taken out, so a large batch's slowest row costs little.
        taken = np.zeros(sizes.shape, dtype=bool)
        rows, left, waiting, row_sizes = None, budget, sizes > 0, sizes  # rows: None = every row, in order
        while True:
            live = waiting & (row_sizes <= left[:, None])
            if not live.any():
                break
            take = live & (np.cumsum(row_sizes * live, axis=1) <= left[:, None])
            if rows is None:
                taken |= take
            else:
                taken[rows] |= take
            left = left - (row_sizes * take).sum(axis=1)
            waiting = live ^ take
            waiting[np.arange(len(waiting)), waiting.argmax(axis=1)] = False  # the first misfit is skipped for good
            going_on = waiting.any(axis=1)
            if 4 * np.count_nonzero(going_on) < len(going_on):
                keep = np.flatnonzero(going_on)
                rows = keep if rows is None else rows[keep]
                left, waiting, row_sizes = left[keep], waiting[keep], row_sizes[keep]
    chosen_word = np.zeros(size * words, dtype=bool)
    chosen_word[order[taken]] = True
    chosen = cand[chosen_word[cand_word]]  # flat positions to mask, ascending
    row = chosen // seq
    slot = row * config.max_predictions_per_seq + np.arange(len(chosen)) - np.searchsorted(row, row)
    positions = np.zeros((size, config.max_predictions_per_seq), dtype=np.uint16)
    labels = np.full((size, config.max_predictions_per_seq), IGNORE_INDEX, dtype=label_dtype(vocab))
    flat_ids = ids.reshape(-1)  # a view: ids is contiguous
    positions.reshape(-1)[slot] = chosen - row * seq
    labels.reshape(-1)[slot] = flat_ids[chosen]

    # 80% [MASK], 10% kept, 10% a uniformly random vocabulary id.
    draw = rng.random(len(chosen))
    flat_ids[chosen[draw < 0.8]] = vocab.mask_id
    random_slots = chosen[draw >= 0.9]
    flat_ids[random_slots] = rng.integers(0, vocab.size, len(random_slots))
    return positions, labels


def create_masked_lm_predictions(ids: np.ndarray, a_len: int, config: GenerationConfig, vocab: Vocabulary,
                                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masked ids, sorted positions, original ids there) for one `[CLS] A [SEP] B [SEP]` sequence."""
    masked = np.array(ids, dtype=vocab.id_dtype)[None, :]
    positions, labels = mask_batch(masked, np.array([len(ids)]), np.array([a_len]), config, vocab, rng)
    k = int((labels[0] != IGNORE_INDEX).sum())
    return masked[0].astype(np.int32), positions[0, :k].astype(np.int32), labels[0, :k].astype(np.int32)


# --- documents ------------------------------------------------------------------------------------------


def create_pairs_from_document(index: CorpusIndex, doc: int, config: GenerationConfig,
                               draws: ScalarDraws) -> list[SegmentPair]:
    """The (untruncated) segment pairs whose A comes from document `doc`, in order."""
    # Plain ndarray views of the maps (indexing an np.memmap goes through Python code), and this document's
    # sentence offsets as Python ints for the chunk loop.
    document_offsets = index.document_offsets.view(np.ndarray)
    first, stop = int(document_offsets[doc]), int(document_offsets[doc + 1])
    so = index.sentence_offsets.view(np.ndarray)[first : stop + 1].tolist()  # where sentence s starts in tokens
    num_sentences = stop - first
    max_num_tokens = config.max_num_tokens
    # Mostly fill the sequence, but sometimes (short_seq_prob) aim shorter, so the model also sees the
    # short inputs of fine-tuning tasks. Drawn once per document, as in the seed.
    target = max_num_tokens
    if draws.uniform() < config.short_seq_prob:
        target = 2 + draws.below(max_num_tokens - 1)

    pairs = []
    chunk_start = 0
    while chunk_start < num_sentences:
        # A chunk is whole sentences, up to the one that brings it to `target` tokens or the document's end:
        # splitting at sentence ends keeps NSP from being too easy.
        chunk_stop = bisect_left(so, so[chunk_start] + target, chunk_start + 1, num_sentences)
        chunk_len = chunk_stop - chunk_start
        a_end = chunk_start + (1 if chunk_len == 1 else 1 + draws.below(chunk_len - 1))
        a_start, a_stop = so[chunk_start], so[a_end]
        if chunk_len == 1 or draws.uniform() < 0.5:
            # B from another document, target - len(A) tokens of it: drawn with the batch (random_segments).
            pairs.append(SegmentPair(a_start, a_stop, 0, 0, True, target - (a_stop - a_start), doc))
            # The chunk's unused sentences go back to the document rather than being wasted.
            chunk_start = a_end
        else:
            pairs.append(SegmentPair(a_start, a_stop, so[a_end], so[chunk_stop], False, 0, doc))
            chunk_start = chunk_stop
    return pairs


def pairs_array(pairs: list[SegmentPair]) -> np.ndarray:
    """(pairs, 7) int64: a SegmentPair a row, its fields in order (how common.shuffle holds them)."""
    return np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=7 * len(pairs)).reshape(len(pairs), 7)


def make_batch(index: CorpusIndex, pairs: list[SegmentPair] | np.ndarray, config: GenerationConfig,
               vocab: Vocabulary, rng: np.random.Generator) -> Batch:
    """`[CLS] A [SEP] B [SEP]` for each pair (SegmentPairs, or the rows of `pairs_array`), truncated, padded to
    max_seq_len and masked."""
    if not isinstance(pairs, np.ndarray):
        pairs = pairs_array(pairs)
    a0, a1, b0, b1, random_next, b_targets, documents = pairs.T.copy()  # a copy: the caller's rows stay as they are
    drawn = random_next.astype(bool)
    b0[drawn], b1[drawn] = random_segments(index, documents[drawn], b_targets[drawn], rng)
    a0, a1, b0, b1 = truncate_pairs(a0, a1, b0, b1, config.max_num_tokens, rng)
    a_lens = a1 - a0
    lengths = a_lens + (b1 - b0) + 3
    size, seq = len(pairs), config.max_seq_len
    pos = np.arange(seq)
    # Where each position's token sits in the corpus: A from position 1, B from a_len + 2 (the specials and
    # the padding read some other valid token and are overwritten below).
    source = pos + np.where(pos <= a_lens[:, None], (a0 - 1)[:, None], (b0 - a_lens - 2)[:, None])
    np.minimum(source, len(index.tokens) - 1, out=source)  # B at the corpus's end; -1 is valid as it is
    ids = index.tokens.view(np.ndarray)[source].astype(vocab.id_dtype, copy=False)  # (batch, seq)
    row_start = np.arange(size) * seq
    flat = ids.reshape(-1)
    flat[row_start] = vocab.cls_id
    flat[row_start + a_lens + 1] = vocab.sep_id
    flat[row_start + lengths - 1] = vocab.sep_id
    ids[pos >= lengths[:, None]] = vocab.pad_id
    token_type_ids = ((pos >= (a_lens + 2)[:, None]) & (pos < lengths[:, None])).view(np.uint8)
    positions, labels = mask_batch(ids, lengths, a_lens, config, vocab, rng)
    corpus = None
    if index.corpus_offsets is not None:
        corpus = (np.searchsorted(np.asarray(index.corpus_offsets), documents, side="right") - 1).astype(np.uint8)
    return Batch(ids, token_type_ids, lengths.astype(np.uint16), positions, labels, random_next.astype(np.uint8),
                 corpus)


def iter_batches(index: CorpusIndex, documents: Iterable[int], config: GenerationConfig, vocab: Vocabulary,
                 rng: np.random.Generator, batch_size: int) -> Iterator[Batch]:
    """Batches of `batch_size` instances from the documents in order (the last one may be short)."""
    draws = ScalarDraws(rng)
    pending: list[SegmentPair] = []
    for doc in documents:
        pending += create_pairs_from_document(index, int(doc), config, draws)
        while len(pending) >= batch_size:
            yield make_batch(index, pending[:batch_size], config, vocab, rng)
            del pending[:batch_size]
    if pending:
        yield make_batch(index, pending, config, vocab, rng)


def create_instances_from_document(index: CorpusIndex, doc: int, config: GenerationConfig, vocab: Vocabulary,
                                   rng: np.random.Generator) -> list[TrainingInstance]:
    """All instances whose A segment comes from document `doc`, in order."""
    pairs = create_pairs_from_document(index, doc, config, ScalarDraws(rng, block=16))
    return make_batch(index, pairs, config, vocab, rng).instances()


def iter_instances(index: CorpusIndex, documents: Iterable[int], config: GenerationConfig, vocab: Vocabulary,
                   rng: np.random.Generator) -> Iterator[TrainingInstance]:
    for batch in iter_batches(index, documents, config, vocab, rng, INSTANCE_BATCH):
        yield from batch.instances()


def epoch_document_order(num_documents: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled document order; every worker computes the same one and takes its share."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_documents)


def worker_documents(num_documents: int, seed: int, epoch: int, worker: int, num_workers: int,
                     sent_before: int = 0, blend: "Blend | None" = None) -> np.ndarray:
    """The documents whose instances `worker` generates in `epoch`: each document belongs to exactly one.

    `sent_before`: documents [0, sent_before) are left out (a cold start's early stream sent them in epoch 0).
    `blend`: the epoch is the blend's draw of documents (common/blend.py), a document drawn twice counting twice.
    """
    order = epoch_document_order(num_documents, seed, epoch) if blend is None else blend_epoch_order(blend, seed, epoch)
    if sent_before:
        order = order[order >= sent_before]
    return order[worker::num_workers]


def worker_rng(seed: int, worker: int, epoch: int) -> np.random.Generator:
    """Independent streams per (seed, worker, epoch): forked workers never share random state."""
    return np.random.default_rng([seed, worker, epoch])


# --- batches of given instances and the seed's record ------------------------------------------------------


def label_dtype(vocab: Vocabulary) -> np.dtype:
    return np.dtype(np.int16) if vocab.size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def collate(instances: list[TrainingInstance], config: GenerationConfig, vocab: Vocabulary) -> Batch:
    """Fixed shapes: (len(instances), max_seq_len) and (len(instances), max_predictions_per_seq)."""
    size, seq, preds = len(instances), config.max_seq_len, config.max_predictions_per_seq
    input_ids = np.full((size, seq), vocab.pad_id, dtype=vocab.id_dtype)
    token_type_ids = np.zeros((size, seq), dtype=np.uint8)
    lengths = np.empty(size, dtype=np.uint16)
    masked_positions = np.zeros((size, preds), dtype=np.uint16)
    masked_labels = np.full((size, preds), IGNORE_INDEX, dtype=label_dtype(vocab))
    next_sentence_labels = np.empty(size, dtype=np.uint8)
    for row, inst in enumerate(instances):
        n, k = len(inst.input_ids), len(inst.masked_positions)
        input_ids[row, :n] = inst.input_ids
        token_type_ids[row, inst.a_len + 2 : n] = 1
        lengths[row] = n
        masked_positions[row, :k] = inst.masked_positions
        masked_labels[row, :k] = inst.masked_labels
        next_sentence_labels[row] = inst.is_random_next
    return Batch(input_ids, token_type_ids, lengths, masked_positions, masked_labels, next_sentence_labels)


def to_seed_record(inst: TrainingInstance, vocab: Vocabulary) -> dict:
    """The seed's JSON record: token strings (masked), segment ids, and the original tokens at the masks."""
    tokens = [vocab.tokens[i] for i in inst.input_ids.tolist()]
    n = len(tokens)
    return {
        "tokens": tokens,
        "segment_ids": [0] * (inst.a_len + 2) + [1] * (n - inst.a_len - 2),
        "is_random_next": bool(inst.is_random_next),
        "masked_lm_positions": inst.masked_positions.tolist(),
        "masked_lm_labels": [vocab.tokens[i] for i in inst.masked_labels.tolist()],
    }


def estimate_epoch_instances(index: CorpusIndex, config: GenerationConfig, vocab: Vocabulary, seed: int,
                             sample_documents: int = 2000) -> int:
    """Instances in one epoch, from the pairs of a seeded sample of documents scaled by their token share.

    Counting exactly would mean a pass over the whole corpus before the first batch; on a sample of 2000
    documents the estimate is within about 1% on real corpora, and exact when the corpus is that small.
    Only the chunk loop runs (the count does not depend on truncation or masking).
    """
    rng = np.random.default_rng([seed, 0xC0DE])
    if index.num_documents <= sample_documents:
        documents = np.arange(index.num_documents)
    else:
        documents = rng.choice(index.num_documents, sample_documents, replace=False)
    draws = ScalarDraws(rng)
    count = sum(len(create_pairs_from_document(index, int(d), config, draws)) for d in documents)
    if len(documents) == index.num_documents:
        return count
    so, do = index.sentence_offsets, index.document_offsets
    sample_tokens = int(np.sum(so[do[documents + 1]] - so[do[documents]]))
    return max(1, round(count * index.num_tokens / max(sample_tokens, 1)))
