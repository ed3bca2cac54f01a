"""Weighted blends (`--corpus_weights`): each epoch draws documents from the corpora in the given instance shares.

Domain-adaptive pretraining often mixes some general text into the domain text to limit forgetting; Megatron
does it with weighted dataset blends. Here each `--train_corpus` source of a blend is a corpus, and the weights
are shares of *instances* (what the trainer sees), not of documents: corpora differ in document length, so a
document of one may give ten instances and one of another a single one. The plan estimates each corpus's
instances per document from a seeded sample (as `estimate_epoch_instances` does for the epoch size), and an
epoch is as long as one pass over every corpus would be: corpus c gets `w_c * E / m_c` documents, with E the
instances of that pass and m_c its instances per document. A corpus smaller than its share repeats (whole
shuffled passes, then a sample without replacement for the rest); a larger one is sampled without
replacement, a fresh sample each epoch. The epoch's documents are then shuffled together.

Random next segments of NSP stay inside their first segment's corpus (`CorpusIndex.corpus_offsets`, used by
`common.instances.sample_random_documents`), so the "is random" signal never becomes "is from the other corpus".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import CorpusConfig, GenerationConfig
from common.corpus import NSP_NEEDS_DOCUMENTS, CorpusError
from common.index import CorpusIndex
from common.vocab import Vocabulary

MAX_CORPORA = 64  # the wire header's per-corpus counts are a list of at most this many


@dataclass(frozen=True)
class Blend:
    """The corpora of a blend and how many documents of each one epoch draws; the same in every worker."""

    names: tuple[str, ...]  # the --train_corpus sources, one corpus each
    weights: tuple[float, ...]  # shares of instances, normalised to sum to 1
    corpus_offsets: tuple[int, ...]  # (corpora + 1,) corpus c is documents [o[c], o[c+1]) of the index
    epoch_documents: tuple[int, ...]  # documents drawn from each corpus per epoch (repeats included)
    epoch_instances: int  # estimated instances in a whole epoch of the blend

    @property
    def num_corpora(self) -> int:
        return len(self.names)

    def short_names(self) -> list[str]:
        """File names without their folders (what a progress line has room for)."""
        return [Path(name).name if not name.startswith("hf:") else name for name in self.names]

    def describe(self) -> str:
        return ", ".join(f"{name} {weight:.0%} ({count} documents an epoch of {stop - start})"
                         for name, weight, count, start, stop in zip(self.short_names(), self.weights,
                                                                    self.epoch_documents, self.corpus_offsets,
                                                                    self.corpus_offsets[1:]))


def corpus_index(index: CorpusIndex, blend: Blend | None) -> CorpusIndex:
    """The index whose random next segments stay inside each corpus of the blend (unchanged without one)."""
    if blend is None:
        return index
    from dataclasses import replace

    return replace(index, corpus_offsets=np.asarray(blend.corpus_offsets, dtype=np.int64))


def instances_per_document(index: CorpusIndex, start: int, stop: int, generation: GenerationConfig,
                           rng: np.random.Generator, sample_documents: int = 8000) -> float:
    """Mean instances a document of [start, stop) gives, from a sample scaled by its token share.

    A document's instance count varies a lot with its draws: one of ten gets a short target length
    (short_seq_prob) and then gives several times more instances. So a corpus smaller than the sample is run
    through several times (one pass of 200 documents left the blend's shares a point off); a larger one is
    sampled."""
    from common.instances import ScalarDraws, create_pairs_from_document

    count = stop - start
    if count <= sample_documents:
        documents = np.tile(np.arange(start, stop), -(-sample_documents // count))
    else:
        documents = start + rng.choice(count, sample_documents, replace=False)
    draws = ScalarDraws(rng)
    pairs = sum(len(create_pairs_from_document(index, int(d), generation, draws)) for d in documents)
    so, do = index.sentence_offsets, index.document_offsets
    sample_tokens = int(np.sum(so[do[documents + 1]] - so[do[documents]]))
    corpus_tokens = int(so[do[stop]] - so[do[start]])
    passes_or_share = sample_tokens / max(corpus_tokens, 1)  # passes over the corpus, or the share sampled
    return max(pairs / max(passes_or_share, 1e-12), 1.0) / count


def plan_blend(index: CorpusIndex, corpus: CorpusConfig, generation: GenerationConfig, seed: int) -> Blend:
    """Documents per corpus per epoch, so that each corpus's share of instances is its weight."""
    if index.source_offsets is None:
        raise ValueError("a blend needs an index built from its sources (source_offsets)")
    offsets = [int(x) for x in index.source_offsets]
    for name, start, stop in zip(corpus.train_corpus, offsets, offsets[1:]):
        if stop - start < 2:  # random next segments come from the same corpus: each one needs two documents
            raise CorpusError(f"{name}: {stop - start} document(s) with text, as a corpus of a blend. "
                              f"{NSP_NEEDS_DOCUMENTS}")
    total = sum(corpus.corpus_weights)
    weights = tuple(w / total for w in corpus.corpus_weights)
    rng = np.random.default_rng([seed, 0xB1E4D])
    per_document = [instances_per_document(index, start, stop, generation, rng)
                    for start, stop in zip(offsets, offsets[1:])]
    one_pass = sum(m * (stop - start) for m, start, stop in zip(per_document, offsets, offsets[1:]))
    epoch_documents = tuple(max(1, round(w * one_pass / m)) for w, m in zip(weights, per_document))
    epoch_instances = round(sum(n * m for n, m in zip(epoch_documents, per_document)))
    return Blend(tuple(corpus.train_corpus), weights, tuple(offsets), epoch_documents, max(1, epoch_instances))


def blend_epoch_order(blend: Blend, seed: int, epoch: int) -> np.ndarray:
    """The epoch's documents, shuffled; every worker computes the same array and takes its share."""
    rng = np.random.default_rng([seed, epoch, 0xB1E4D])
    parts = []
    for start, stop, wanted in zip(blend.corpus_offsets, blend.corpus_offsets[1:], blend.epoch_documents):
        size = stop - start
        passes, rest = divmod(wanted, size)
        parts += [start + rng.permutation(size) for _ in range(passes)]  # a smaller corpus repeats whole...
        parts.append(start + rng.choice(size, rest, replace=False))  # ...then a sample (a larger one: only this)
    return rng.permutation(np.concatenate(parts))


def corpus_of(blend_offsets: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """The corpus each document belongs to."""
    return np.searchsorted(blend_offsets, documents, side="right") - 1
