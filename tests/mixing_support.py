"""The mixing statistic, shared by tests/test_mixing.py and benchmarks/bench_mixing.py: distinct source documents
per 32-row micro-batch, against what 32 rows drawn uniformly from the epoch would hold."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from conftest import WORDS

ROWS = 32  # the micro-batch


def write_long_corpus(path: Path, num_documents: int = 300, sentences_per_document: int = 150,
                      seed: int = 0) -> Path:
    """Long documents whose every sentence opens and ends with "document d": truncation cuts a pair from
    either end, so segment A still names its document (`segment_documents`)."""
    rng = random.Random(seed)
    lines = []
    for d in range(num_documents):
        for s in range(sentences_per_document):
            filler = " ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(4, 14)))
            lines.append(f"document {d} sentence {s} {filler} document {d}.")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def segment_documents(batch, vocab) -> list[int]:
    """The document each row's segment A comes from: the first "document" + digits in A's unmasked tokens."""
    sources = []
    for row in range(batch.size):
        ids = batch.input_ids[row, : batch.lengths[row]].astype(np.int64)
        used = batch.masked_labels[row] != -100
        ids[batch.masked_positions[row][used]] = batch.masked_labels[row][used]  # undo the masking
        a_len = int(batch.lengths[row]) - int(batch.token_type_ids[row].sum()) - 2
        tokens = [vocab.tokens[i] for i in ids[1 : a_len + 1]]
        for at, token in enumerate(tokens[:-1]):
            if token == "document" and tokens[at + 1].isdigit():
                digits = tokens[at + 1]
                for piece in tokens[at + 2 :]:
                    if not (piece.startswith("##") and piece[2:].isdigit()):
                        break
                    digits += piece[2:]
                sources.append(int(digits))
                break
        else:
            raise AssertionError(f"segment A names no document: {tokens}")
    return sources


def distinct_per_micro_batch(documents: Sequence[int], rows: int = ROWS) -> float:
    """Mean distinct documents over the whole `rows`-row pieces of a stream of rows' source documents."""
    pieces = [documents[i : i + rows] for i in range(0, len(documents) - rows + 1, rows)]
    return float(np.mean([len(set(p)) for p in pieces]))


def uniform_distinct(documents: Iterable[int], rows: int = ROWS) -> float:
    """Expected distinct documents in `rows` rows drawn uniformly, without replacement, from the epoch's rows:
    the sum over documents of 1 - P(none of its n rows is drawn) = 1 - C(N - n, rows) / C(N, rows)."""
    counts = np.array(list(Counter(documents).values()), dtype=np.float64)
    total = counts.sum()
    absent = np.ones_like(counts)
    for i in range(rows):
        absent *= np.clip(total - counts - i, 0, None) / (total - i)
    return float(np.sum(1 - absent))
