"""Plain-Python reference for instance generation: the tests' oracle and the benchmark baseline.

It mirrors the seed's `pregenerate_training_data.py` (HuggingFace examples/lm_finetuning, itself Google
BERT's `create_pretraining_data.py` with sentence-weighted document sampling and no global shuffle)
function for function and random call for random call, with two deliberate differences that DESIGN.md
asks for:

- every random draw comes from an explicit `random.Random` passed in, never the global `random`;
- with whole-word masking, a `##` piece that truncation left first in a segment (right after `[CLS]` or
  the first `[SEP]`) starts a word of its own; the seed joined it across the `[SEP]`, a bug.

It works on lists of token strings with per-token Python loops in one process, on purpose: it is meant to
be obviously right, not fast. It imports nothing from the project.
"""

import bisect
import collections
import json
import random
from pathlib import Path
from typing import Callable, Iterable

Document = list[list[str]]  # a document is a list of sentences, a sentence a list of wordpieces

NO_DOCUMENT_BREAKS = (
    "No document breaks were found in the input file! These are needed to allow the script to ensure that "
    "random NextSentences are not sampled from the same document. Please add blank lines to indicate breaks "
    "between documents in your input file. If your dataset does not contain multiple documents, blank lines "
    "can be inserted at any natural boundary, such as the ends of chapters, sections or paragraphs."
)

MaskedLmInstance = collections.namedtuple("MaskedLmInstance", ["index", "label"])


def read_documents(lines: Iterable[str], tokenize: Callable[[str], list[str]]) -> list[Document]:
    """Split a corpus the seed's way: one sentence a line, a blank (or whitespace-only) line ends a document.

    Empty documents are skipped, as the seed's `add_document` does. A line that tokenizes to nothing is
    dropped too (the seed kept it as an empty sentence, which can trip its own asserts).
    """
    documents, doc = [], []
    for line in lines:
        line = line.strip()
        if not line:
            if doc:
                documents.append(doc)
            doc = []
        else:
            tokens = tokenize(line)
            if tokens:
                doc.append(tokens)
    if doc:  # the last document need not end with a blank line
        documents.append(doc)
    return documents


def read_corpus_file(path, tokenize: Callable[[str], list[str]]) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return read_documents(f, tokenize)


class DocumentDatabase:
    """The seed's in-memory document store, with sentence-count-weighted sampling of *other* documents."""

    def __init__(self, documents: list[Document]):
        self.documents = [doc for doc in documents if doc]
        self.doc_cumsum = list(_cumsum(len(doc) for doc in self.documents))
        self.cumsum_max = self.doc_cumsum[-1] if self.doc_cumsum else 0

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, idx):
        return self.documents[idx]

    def sample_doc(self, current_idx: int, rng: random.Random) -> Document:
        # Draw a sentence uniformly from every sentence outside the current document (the window starts
        # just after it and wraps around), then return the document holding it: each sentence, rather
        # than each document, is equally likely to be the random next sentence.
        rand_start = self.doc_cumsum[current_idx]
        rand_end = rand_start + self.cumsum_max - len(self.documents[current_idx])
        sentence_index = rng.randrange(rand_start, rand_end) % self.cumsum_max
        sampled = bisect.bisect_right(self.doc_cumsum, sentence_index)
        assert sampled != current_idx
        return self.documents[sampled]


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def truncate_seq_pair(tokens_a: list[str], tokens_b: list[str], max_num_tokens: int, rng: random.Random):
    """Trim the longer side one token at a time, from the front or the back with equal chance, in place."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(trunc_tokens) >= 1
        # Sometimes the front, sometimes the back, to add randomness and avoid biases.
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


def create_masked_lm_predictions(tokens, masked_lm_prob, max_predictions_per_seq, whole_word_mask,
                                 vocab_list, rng: random.Random):
    """Mask `tokens` in place; return (tokens, sorted masked positions, original tokens at them)."""
    cand_indices = []
    for i, token in enumerate(tokens):
        if token == "[CLS]" or token == "[SEP]":
            continue
        # A "##" piece continues the word before it, but only if that word is in the same segment (the
        # previous position is itself a candidate): never join across [CLS] or [SEP].
        if whole_word_mask and token.startswith("##") and cand_indices and cand_indices[-1][-1] == i - 1:
            cand_indices[-1].append(i)
        else:
            cand_indices.append([i])

    num_to_mask = min(max_predictions_per_seq, max(1, int(round(len(tokens) * masked_lm_prob))))
    rng.shuffle(cand_indices)
    masked_lms = []
    for index_set in cand_indices:
        if len(masked_lms) >= num_to_mask:
            break
        # A whole word that would overflow the budget is skipped; a shorter one later may still fit.
        if len(masked_lms) + len(index_set) > num_to_mask:
            continue
        for index in index_set:
            if rng.random() < 0.8:
                masked_token = "[MASK]"
            elif rng.random() < 0.5:
                masked_token = tokens[index]  # keep the original
            else:
                masked_token = rng.choice(vocab_list)
            masked_lms.append(MaskedLmInstance(index=index, label=tokens[index]))
            tokens[index] = masked_token

    masked_lms.sort(key=lambda x: x.index)
    return tokens, [p.index for p in masked_lms], [p.label for p in masked_lms]


def create_instances_from_document(doc_database: DocumentDatabase, doc_idx, max_seq_length, short_seq_prob,
                                   masked_lm_prob, max_predictions_per_seq, whole_word_mask, vocab_list,
                                   rng: random.Random) -> list[dict]:
    document = doc_database[doc_idx]
    max_num_tokens = max_seq_length - 3  # room for [CLS], [SEP], [SEP]

    # Usually fill the whole sequence; sometimes aim shorter, to lessen the mismatch with fine-tuning.
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    # A and B are split at sentence boundaries rather than at an arbitrary token: cutting one long token
    # stream anywhere would make next sentence prediction too easy.
    instances = []
    current_chunk, current_length = [], 0
    i = 0
    while i < len(document):
        current_chunk.append(document[i])
        current_length += len(document[i])
        if i == len(document) - 1 or current_length >= target_seq_length:
            a_end = 1 if len(current_chunk) < 2 else rng.randrange(1, len(current_chunk))
            tokens_a = [t for sentence in current_chunk[:a_end] for t in sentence]
            tokens_b = []
            if len(current_chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                target_b_length = target_seq_length - len(tokens_a)
                random_document = doc_database.sample_doc(doc_idx, rng)
                for j in range(rng.randrange(0, len(random_document)), len(random_document)):
                    tokens_b.extend(random_document[j])
                    if len(tokens_b) >= target_b_length:
                        break
                # The chunk's sentences after A went unused: put them back for the next chunk.
                i -= len(current_chunk) - a_end
            else:
                is_random_next = False
                tokens_b = [t for sentence in current_chunk[a_end:] for t in sentence]
            truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            assert len(tokens_a) >= 1 and len(tokens_b) >= 1

            tokens = ["[CLS]"] + tokens_a + ["[SEP]"] + tokens_b + ["[SEP]"]
            # Segment 0 is [CLS], A and the first [SEP]; segment 1 is B and the last [SEP].
            segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            tokens, masked_lm_positions, masked_lm_labels = create_masked_lm_predictions(
                tokens, masked_lm_prob, max_predictions_per_seq, whole_word_mask, vocab_list, rng)
            instances.append({
                "tokens": tokens,
                "segment_ids": segment_ids,
                "is_random_next": is_random_next,
                "masked_lm_positions": masked_lm_positions,
                "masked_lm_labels": masked_lm_labels,
            })
            current_chunk, current_length = [], 0
        i += 1
    return instances


def generate_epoch(docs, vocab_list, rng: random.Random, max_seq_len=128, short_seq_prob=0.1,
                   masked_lm_prob=0.15, max_predictions_per_seq=20, whole_word_mask=False) -> list[dict]:
    """One epoch as the seed's `create_training_file` makes it: every document in order, its records."""
    db = docs if isinstance(docs, DocumentDatabase) else DocumentDatabase(docs)
    if len(db) <= 1:
        raise ValueError(NO_DOCUMENT_BREAKS)
    records = []
    for doc_idx in range(len(db)):
        records.extend(create_instances_from_document(
            db, doc_idx, max_seq_len, short_seq_prob, masked_lm_prob, max_predictions_per_seq,
            whole_word_mask, vocab_list, rng))
    return records


def write_epoch(records: list[dict], output_dir, epoch: int, max_seq_len: int) -> None:
    """Write `epoch_{i}.json` (one record a line) and `epoch_{i}_metrics.json`, the seed's file format."""
    output_dir = Path(output_dir)
    with open(output_dir / f"epoch_{epoch}.json", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    metrics = {"num_training_examples": len(records), "max_seq_len": max_seq_len}
    (output_dir / f"epoch_{epoch}_metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
