"""NSP pairs, truncation and masking: the seed's instance generation as pure functions over token ids.

The call tree follows Google's `create_pretraining_data.py` and the seed that copied it:
`create_instances_from_document` → `truncate_seq_pair` → `create_masked_lm_predictions`, then `collate` into
fixed-shape arrays for `BertForPreTraining`. Every random draw comes from the `numpy.random.Generator` passed
in. Segments are (start, stop) ranges into the index's flat token array: a document's sentences are
contiguous there, so a segment of whole sentences is one slice and truncation only moves its ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from common.config import GenerationConfig
from common.index import CorpusIndex
from common.vocab import Vocabulary

IGNORE_INDEX = -100  # label of positions that are not predicted (PyTorch's cross-entropy default)


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


# --- segments -------------------------------------------------------------------------------------------


def sample_random_document(index: CorpusIndex, current: int, rng: np.random.Generator) -> int:
    """Another document, chosen with probability proportional to its sentence count (never `current`)."""
    offsets = index.document_offsets.view(np.ndarray)
    return _sample_other_document(offsets, int(offsets[current]), int(offsets[current + 1]), rng)


def _sample_other_document(document_offsets: np.ndarray, first: int, stop: int, rng: np.random.Generator) -> int:
    """A uniform sentence outside sentences [first, stop), and the document it belongs to."""
    count = stop - first
    sentence = int(rng.integers(0, int(document_offsets[-1]) - count))
    if sentence >= first:  # skip over the current document's sentences
        sentence += count
    return int(document_offsets.searchsorted(sentence, side="right")) - 1


def truncate_seq_pair(a: tuple[int, int], b: tuple[int, int], max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cut the pair to `max_num_tokens`, one token at a time from the longer side, front or back at random.

    The seed loops per token; this computes how many tokens each side loses (the longer side until the two
    are level, then alternately, ties going to B) and draws each side's front share as a binomial, which is
    the same distribution in O(1), so a 10 MB one-sentence document costs no more than a short one.
    """
    la, lb = a[1] - a[0], b[1] - b[0]
    excess = la + lb - max_num_tokens
    if excess <= 0:
        return a, b
    if la > lb:
        drop_a, drop_b = min(excess, la - lb), 0
        rest = excess - drop_a
        drop_b, drop_a = drop_b + (rest + 1) // 2, drop_a + rest // 2
    else:
        drop_a, drop_b = 0, min(excess, lb - la + 1)
        rest = excess - drop_b
        drop_a, drop_b = drop_a + (rest + 1) // 2, drop_b + rest // 2
    front_a, front_b = rng.binomial(drop_a, 0.5), rng.binomial(drop_b, 0.5)
    return (a[0] + front_a, a[1] - (drop_a - front_a)), (b[0] + front_b, b[1] - (drop_b - front_b))


# --- masking --------------------------------------------------------------------------------------------


def num_to_mask(length: int, config: GenerationConfig) -> int:
    """The seed's budget; `length` counts the special tokens. Python's round (half to even), as the seed."""
    return min(config.max_predictions_per_seq, max(1, int(round(length * config.masked_lm_prob))))


def create_masked_lm_predictions(ids: np.ndarray, a_len: int, config: GenerationConfig, vocab: Vocabulary,
                                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masked ids, sorted positions, original ids there) for one `[CLS] A [SEP] B [SEP]` sequence.

    Works on candidate indices (every position but [CLS] and the two [SEP]s, in order: candidate c is
    position c + 1 in A, c + 2 in B). An instance is ~128 tokens, so a few numpy calls and a short Python
    loop over the shuffled words cost less than more vectorised bookkeeping would.
    """
    length = len(ids)
    num_candidates = length - 3
    budget = num_to_mask(length, config)
    if config.whole_word_mask:
        # A `##` piece joins the word before it, except as the first token of a segment: the word before
        # would be across [CLS] or [SEP] (truncation can leave a piece first; the seed joins it, a bug).
        starts_word = ~vocab.is_continuation[np.concatenate((ids[1 : a_len + 1], ids[a_len + 2 : length - 1]))]
        starts_word[0] = starts_word[a_len] = True
        word_starts = np.flatnonzero(starts_word).tolist()
        word_ends = word_starts[1:] + [num_candidates]
        chosen, count = [], 0
        for word in rng.permutation(len(word_starts)).tolist():
            if count >= budget:
                break
            size = word_ends[word] - word_starts[word]
            if count + size <= budget:  # the seed skips a word that would overflow and tries the next
                chosen.extend(range(word_starts[word], word_ends[word]))
                count += size
        chosen = np.sort(np.array(chosen, dtype=np.int64))
    else:
        # Every candidate is a word of one token: the first `budget` of a shuffle of the candidates.
        chosen = np.sort(rng.permutation(num_candidates)[:budget])
    positions = (chosen + 1 + (chosen >= a_len)).astype(np.int32)
    labels = ids[positions]

    # 80% [MASK], 10% kept, 10% a uniformly random vocabulary id.
    draw = rng.random(len(positions))
    masked = ids.copy()
    masked[positions[draw < 0.8]] = vocab.mask_id
    random_slots = positions[draw >= 0.9]
    masked[random_slots] = rng.integers(0, vocab.size, len(random_slots))
    return masked, positions, labels


# --- documents ------------------------------------------------------------------------------------------


def _assemble(tokens: np.ndarray, a: tuple[int, int], b: tuple[int, int], specials: np.ndarray) -> np.ndarray:
    """`[CLS] A [SEP] B [SEP]` as int32; `specials` is `[cls_id, sep_id]`."""
    cls, sep = specials[:1], specials[1:]
    return np.concatenate((cls, tokens[a[0] : a[1]], sep, tokens[b[0] : b[1]], sep), dtype=np.int32)


def create_instances_from_document(index: CorpusIndex, doc: int, config: GenerationConfig, vocab: Vocabulary,
                                   rng: np.random.Generator) -> list[TrainingInstance]:
    """All instances whose A segment comes from document `doc`, in order."""
    # Plain ndarray views of the maps (indexing an np.memmap goes through Python code), and this document's
    # sentence offsets as Python ints for the chunk loop.
    tokens = index.tokens.view(np.ndarray)
    all_offsets = index.sentence_offsets.view(np.ndarray)
    document_offsets = index.document_offsets.view(np.ndarray)
    first, stop = int(document_offsets[doc]), int(document_offsets[doc + 1])
    so = all_offsets[first : stop + 1].tolist()  # so[s]: where this document's sentence s starts in `tokens`
    num_sentences = stop - first
    specials = np.array([vocab.cls_id, vocab.sep_id], dtype=np.int32)
    max_num_tokens = config.max_num_tokens
    # Mostly fill the sequence, but sometimes (short_seq_prob) aim shorter, so the model also sees the
    # short inputs of fine-tuning tasks. Drawn once per document, as in the seed.
    target = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target = int(rng.integers(2, max_num_tokens + 1))

    instances = []
    chunk_start = i = 0
    while i < num_sentences:
        # A chunk is whole sentences: splitting at sentence ends keeps NSP from being too easy.
        if i != num_sentences - 1 and so[i + 1] - so[chunk_start] < target:
            i += 1
            continue
        chunk_len = i + 1 - chunk_start
        a_end = chunk_start + (1 if chunk_len == 1 else int(rng.integers(1, chunk_len)))
        a = (so[chunk_start], so[a_end])
        if chunk_len == 1 or rng.random() < 0.5:
            is_random_next = True
            other = _sample_other_document(document_offsets, first, stop, rng)
            o_first, o_stop = int(document_offsets[other]), int(document_offsets[other + 1])
            b_first = int(rng.integers(o_first, o_stop))
            # Whole sentences from b_first until B reaches target - len(A) tokens (at least one sentence).
            b_start = int(all_offsets[b_first])
            wanted = b_start + target - (a[1] - a[0])
            b_stop = min(b_first + 1 + int(all_offsets[b_first + 1 : o_stop + 1].searchsorted(wanted)), o_stop)
            b = (b_start, int(all_offsets[b_stop]))
            # The chunk's unused sentences go back to the document rather than being wasted.
            i = a_end - 1
        else:
            is_random_next = False
            b = (so[a_end], so[i + 1])
        a, b = truncate_seq_pair(a, b, max_num_tokens, rng)
        a_len = a[1] - a[0]
        masked, positions, labels = create_masked_lm_predictions(_assemble(tokens, a, b, specials), a_len, config,
                                                                 vocab, rng)
        instances.append(TrainingInstance(masked, a_len, is_random_next, positions, labels))
        i += 1
        chunk_start = i
    return instances


def iter_instances(index: CorpusIndex, documents: Iterable[int], config: GenerationConfig, vocab: Vocabulary,
                   rng: np.random.Generator) -> Iterator[TrainingInstance]:
    for doc in documents:
        yield from create_instances_from_document(index, int(doc), config, vocab, rng)


def epoch_document_order(num_documents: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled document order; every worker computes the same one and takes its share."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_documents)


def worker_documents(num_documents: int, seed: int, epoch: int, worker: int, num_workers: int) -> np.ndarray:
    """The documents whose instances `worker` generates in `epoch`: each document belongs to exactly one."""
    return epoch_document_order(num_documents, seed, epoch)[worker::num_workers]


def worker_rng(seed: int, worker: int, epoch: int) -> np.random.Generator:
    """Independent streams per (seed, worker, epoch): forked workers never share random state."""
    return np.random.default_rng([seed, worker, epoch])


# --- batches --------------------------------------------------------------------------------------------


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
    """Instances in one epoch, from generating a seeded sample of documents and scaling by their token share.

    Counting exactly would mean generating the whole epoch before the first batch; on a sample of 2000
    documents the estimate is within about 1% on real corpora, and exact when the corpus is that small.
    """
    rng = np.random.default_rng([seed, 0xC0DE])
    if index.num_documents <= sample_documents:
        documents = np.arange(index.num_documents)
    else:
        documents = rng.choice(index.num_documents, sample_documents, replace=False)
    count = sum(len(create_instances_from_document(index, int(d), config, vocab, rng)) for d in documents)
    if len(documents) == index.num_documents:
        return count
    so, do = index.sentence_offsets, index.document_offsets
    sample_tokens = int(np.sum(so[do[documents + 1]] - so[do[documents]]))
    return max(1, round(count * index.num_tokens / max(sample_tokens, 1)))
