"""Documents → cached token arrays: the corpus tokenized once, in parallel, and memory-mapped by every reader.

An index is four flat `.npy` arrays in one directory: `tokens` (every sentence's ids back to back, uint16 when
the vocabulary fits), `sentence_offsets` (sentence s is `tokens[so[s]:so[s+1]]`), `document_offsets`
(document d is sentences `do[d]:do[d+1]`) and `source_offsets` (the documents of `--train_corpus` entry i are
`src[i]:src[i+1]`, so a blend can tell its corpora apart). Sentences of a document are contiguous, so any run
of sentences is one slice. Worker processes map the same files, so N workers share one copy through the page
cache.

Sources are read by common/readers.py (text, JSONL, Parquet, datasets). With `--split_sentences` the
tokenizing processes also split each line into sentences (common/sentences.py), so the split is paid once,
in parallel, and cached. The directory is named by a key over the sources' contents, the flags that change
how they are read, the vocabulary and lower-casing. It is written under
a temporary name and renamed when complete, so a build killed half-way leaves only a `.tmp-*` folder that
the next build ignores and removes.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import CorpusConfig
from common import readers, sentences
from common.corpus import NSP_NEEDS_DOCUMENTS, CorpusError, CorpusStats
from common.progress import Every, log
from common.vocab import Vocabulary, load_tokenizer, resolve_model_dir

INDEX_FORMAT = 2  # 2: source_offsets.npy
_CHUNK_CHARS = 1 << 20  # text per tokenizing task: large enough to amortise IPC, small enough to stream
TOKENIZER_NICENESS = 10  # added to the tokenizing processes' nice value
_ARRAYS = ("tokens", "sentence_offsets", "document_offsets", "source_offsets")
# A line longer than this many tokens is longer than any instance (max_seq_len <= 512): NSP can only cut it,
# never split it at a sentence end, which is what --split_sentences is for.
LONG_LINE_TOKENS = 512


@dataclass(frozen=True)
class CorpusIndex:
    tokens: np.ndarray  # (n_tokens,) uint16 or int32, memory-mapped
    sentence_offsets: np.ndarray  # (n_sentences + 1,) int64 into tokens
    document_offsets: np.ndarray  # (n_documents + 1,) int64 into sentences
    path: Path | None = None
    source_offsets: np.ndarray | None = None  # (n_sources + 1,) int64 into documents: each --train_corpus entry
    # The corpora of a blend, as (n_corpora + 1,) document offsets: random next segments stay inside their
    # first segment's corpus. None: the whole index is one corpus (no --corpus_weights).
    corpus_offsets: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document_sentence_counts(self) -> np.ndarray:
        return np.diff(self.document_offsets)

    def sentences_of(self, doc: int) -> list[np.ndarray]:
        """The token-id arrays of one document's sentences (views into the map, no copy)."""
        start, stop = self.document_offsets[doc], self.document_offsets[doc + 1]
        bounds = self.sentence_offsets[start : stop + 1]
        return [self.tokens[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]

    @classmethod
    def from_arrays(cls, sentences_by_document: list[list[list[int]]], dtype=np.uint16) -> "CorpusIndex":
        """An in-memory index from nested lists; for tests and tiny corpora."""
        flat = [sentence for document in sentences_by_document for sentence in document]
        lengths = np.array([len(s) for s in flat], dtype=np.int64)
        tokens = np.array([t for s in flat for t in s], dtype=dtype)
        sentence_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        counts = np.array([len(d) for d in sentences_by_document], dtype=np.int64)
        document_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(tokens, sentence_offsets, document_offsets)


@dataclass(frozen=True)
class IndexChunk:
    """What a build has just tokenized, in corpus order: whole documents (for a progressive start)."""

    tokens: np.ndarray  # (n_tokens,) the index's dtype
    sentence_lengths: np.ndarray  # (n_sentences,) int64, every one > 0
    document_counts: np.ndarray  # (n_documents,) int64 sentences per document, every one > 0
    text_chars: int  # characters of text tokenized so far, this chunk included
    total_bytes: int  # size of the corpus files (compressed size for gzip)


def source_options(corpus: CorpusConfig) -> readers.SourceOptions:
    return readers.SourceOptions(text_field=corpus.text_field, dataset_split=corpus.dataset_split)


def index_key(corpus: CorpusConfig, vocab: Vocabulary) -> str:
    """A key over everything the index depends on: each source's content (in order, so the source boundaries
    are covered), the reading flags, the splitter's version, the vocabulary and lower-casing."""
    import hashlib

    parts = [f"format={INDEX_FORMAT}", f"vocab={vocab.sha256}", f"lower={vocab.do_lower_case}"]
    kinds = readers.check_sources(corpus.train_corpus)
    options = source_options(corpus)
    if any(kind != readers.TEXT for kind in kinds):
        parts.append(f"text_field={corpus.text_field!r}")
    if any(kind in (readers.DATASET, readers.HUB) for kind in kinds):
        parts.append(f"dataset_split={corpus.dataset_split!r}")
    if corpus.split_sentences:
        parts.append(f"split={sentences.splitter_id()}")
    parts += [f"source={readers.source_digest(name, kind, options)}" for name, kind in zip(corpus.train_corpus, kinds)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def load_index(path: Path) -> CorpusIndex:
    """Map a complete index directory; raises ValueError if its arrays disagree with each other."""
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    arrays["source_offsets"] = np.array(arrays["source_offsets"])  # a few numbers: not worth a map
    index = CorpusIndex(**arrays, path=path)
    so, do, src = index.sentence_offsets, index.document_offsets, index.source_offsets
    if (len(so) < 1 or len(do) < 1 or len(src) < 2 or so[-1] != index.num_tokens or do[-1] != index.num_sentences
            or src[0] != 0 or src[-1] != index.num_documents or np.any(np.diff(src) < 0)):
        raise ValueError(f"index at {path} is inconsistent (offsets do not match the arrays)")
    return index


def build_or_load_index(corpus: CorpusConfig, vocab: Vocabulary, num_procs: int,
                        on_chunk: Callable[[IndexChunk], None] | None = None) -> CorpusIndex:
    """The cached index of this corpus and vocabulary, built first if it is missing or damaged.

    `on_chunk`, if given, sees each tokenized piece as a build goes (never called for a cached index).
    """
    cache_root = Path(corpus.cache_dir).expanduser()
    key = index_key(corpus, vocab)
    final = cache_root / f"index-{key}"
    if final.is_dir():
        try:
            index = load_index(final)
            log.info("index: %s (%d documents, %d sentences, %d tokens, cached)", final,
                     index.num_documents, index.num_sentences, index.num_tokens)
            return index
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty .npy (a crash before the data hit disk)
            log.warning("index: cached copy at %s is damaged (%s); rebuilding", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_root, key)
    tmp = Path(tempfile.mkdtemp(prefix=f"index-{key}.tmp-", dir=cache_root))
    try:
        _build(corpus, vocab, tmp, num_procs, on_chunk)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # anything but "another process finished the same index first"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_index(final)


def _remove_stale_temporaries(cache_root: Path, key: str, older_than_s: float = 3600.0) -> None:
    """Half-built indexes of crashed runs; recent ones may belong to a build still running beside us."""
    for leftover in cache_root.glob(f"index-{key}.tmp-*"):
        if time.time() - leftover.stat().st_mtime > older_than_s:
            shutil.rmtree(leftover, ignore_errors=True)


# --- building -------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_tokenizer_worker(model_dir: str, do_lower_case: bool, split: bool = False) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes, not Rayon threads
    # Below the processes that start the stream (the trainer loading its model, a producer's early stream):
    # a build is the background of a start-up, and on a machine with no idle core it would otherwise hold
    # back the first step. Alone on the machine it runs at full speed all the same.
    if hasattr(os, "nice"):
        os.nice(TOKENIZER_NICENESS)
    _worker_tokenizer = load_tokenizer(Path(model_dir), do_lower_case)
    if split:
        sentences.load()


def _tokenize_chunk(documents: list[tuple[str, ...]], split: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, tokens per sentence, sentences per document) for a chunk; empty sentences count as 0 tokens.

    `split`: each document's lines are split into sentences first (--split_sentences)."""
    if split:
        documents = [sentences.split_document(document) for document in documents]
    flat = [s for document in documents for s in document]
    encodings = _worker_tokenizer.encode_batch(flat, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
    counts = np.array([len(d) for d in documents], dtype=np.int64)
    return ids, lengths, counts


def _chunks(documents, chunk_chars: int):
    """(documents' lines, their characters, each document's source number) in pieces of ~chunk_chars."""
    chunk, sources, size = [], [], 0
    for source, document in documents:
        chunk.append(document.sentences)
        sources.append(source)
        size += sum(len(s) for s in document.sentences)
        if size >= chunk_chars:
            yield chunk, size, np.array(sources, dtype=np.int64)
            chunk, sources, size = [], [], 0
    if chunk:
        yield chunk, size, np.array(sources, dtype=np.int64)


def _build(corpus: CorpusConfig, vocab: Vocabulary, out: Path, num_procs: int,
           on_chunk: Callable[[IndexChunk], None] | None) -> None:
    stats = CorpusStats()
    model_dir = str(resolve_model_dir(corpus.bert_model))
    dtype = vocab.id_dtype
    sentence_lengths: list[np.ndarray] = []
    document_counts: list[np.ndarray] = []
    empty_sentences = empty_token_documents = n_tokens = done_chars = long_lines = one_long_line = longest = 0
    source_counts = np.zeros(len(corpus.train_corpus), dtype=np.int64)  # documents kept, per source
    start = time.monotonic()
    ticker = Every(2.0)
    kinds = readers.check_sources(corpus.train_corpus)
    total_bytes = sum(readers.source_bytes(name, kind) for name, kind in zip(corpus.train_corpus, kinds))
    split = corpus.split_sentences
    if split:
        sentences.load()  # here first: a missing extra is one clear error, not a traceback from every worker
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    raw_path = out / "tokens.raw"
    with context.Pool(num_procs, _init_tokenizer_worker, (model_dir, vocab.do_lower_case, split)) as pool, \
            open(raw_path, "wb") as raw:
        pending: collections.deque = collections.deque()

        def drain_one() -> None:
            nonlocal n_tokens, empty_sentences, empty_token_documents, done_chars, long_lines, one_long_line, longest
            result, chars, sources = pending.popleft()
            ids, lengths, counts = result.get()
            if len(lengths) and not split:  # split sentences are not lines: no warning to give about them
                long = lengths > LONG_LINE_TOKENS
                long_lines += int(np.count_nonzero(long))
                first_of_document = np.concatenate([[0], np.cumsum(counts)[:-1]])
                one_long_line += int(np.count_nonzero((counts == 1) & long[first_of_document]))
                longest = max(longest, int(lengths.max()))
            # Sentences that tokenize to nothing (control characters only) would make empty segments.
            keep = lengths > 0
            empty_sentences += int((~keep).sum())
            doc_of_sentence = np.repeat(np.arange(len(counts)), counts)
            kept_counts = np.bincount(doc_of_sentence[keep], minlength=len(counts))
            empty_token_documents += int((kept_counts == 0).sum())
            source_counts[:] += np.bincount(sources[kept_counts > 0], minlength=len(source_counts))
            ids = ids.astype(dtype)
            raw.write(ids.tobytes())
            sentence_lengths.append(lengths[keep])
            document_counts.append(kept_counts[kept_counts > 0])
            n_tokens += len(ids)
            done_chars += chars
            if on_chunk is not None:
                on_chunk(IndexChunk(ids, sentence_lengths[-1], document_counts[-1], done_chars, total_bytes))
            if ticker.due():
                elapsed = time.monotonic() - start
                log.info("tokenizing: %.1f MB of %.1f MB text, %.2f MB/s, %d tokens",
                         done_chars / 1e6, total_bytes / 1e6, done_chars / 1e6 / elapsed, n_tokens)

        documents = readers.iter_source_documents(corpus.train_corpus, source_options(corpus), stats)
        for chunk, chars, sources in _chunks(documents, _CHUNK_CHARS):
            pending.append((pool.apply_async(_tokenize_chunk, (chunk, split)), chars, sources))
            if len(pending) > 2 * num_procs:  # bounded: the corpus is never held in memory whole
                drain_one()
        while pending:
            drain_one()
        # Let the workers exit on their own: the `with` block's terminate() sends SIGTERM, which a worker
        # still inside fork() can lose when its parent has a Python-level SIGTERM handler (the producer's),
        # and the pool's join then waits forever.
        pool.close()
        pool.join()

    lengths = np.concatenate(sentence_lengths) if sentence_lengths else np.zeros(0, np.int64)
    counts = np.concatenate(document_counts) if document_counts else np.zeros(0, np.int64)
    if len(counts) < 2:
        where = ", ".join(corpus.train_corpus)
        raise CorpusError(f"{where}: {len(counts)} document(s) with text. {NSP_NEEDS_DOCUMENTS}")
    elapsed = time.monotonic() - start
    log.info(
        "tokenized %d files, %.1f MB in %.1fs (%.2f MB/s): %d documents, %d sentences, %d tokens; skipped %d empty "
        "documents (blank-line runs), %d sentences with no tokens, %d documents left without tokens",
        stats.files, stats.bytes / 1e6, elapsed, stats.bytes / 1e6 / max(elapsed, 1e-9), len(counts), len(lengths),
        n_tokens, stats.empty_documents, empty_sentences, empty_token_documents)
    # A few long sentences are normal in a sentence-a-line corpus (the KJV has 2 in 100,000 lines); documents
    # that are one long line, or many long lines, are paragraphs or whole texts that want splitting.
    if not split and (one_long_line or long_lines > 0.01 * max(len(lengths), 1)):
        log.warning("%d documents are one line of more than %d tokens, and %d lines in all (the longest %d): "
                    "each line is taken as one sentence, so NSP can only cut them, never pair their sentences. If "
                    "the documents are paragraphs or whole texts on a line, pass --split_sentences", one_long_line, LONG_LINE_TOKENS, long_lines, longest)

    _raw_to_npy(raw_path, out / "tokens.npy", dtype, n_tokens)
    np.save(out / "sentence_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(out / "document_offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    np.save(out / "source_offsets.npy", np.concatenate([[0], np.cumsum(source_counts)]).astype(np.int64))
    meta = {
        "format": INDEX_FORMAT, "bert_model": corpus.bert_model, "vocab_sha256": vocab.sha256,
        "do_lower_case": vocab.do_lower_case, "files": list(corpus.train_corpus), "bytes": stats.bytes,
        "text_field": corpus.text_field, "dataset_split": corpus.dataset_split,
        "split_sentences": corpus.split_sentences, "source_documents": source_counts.tolist(),
        "documents": int(len(counts)), "sentences": int(len(lengths)), "tokens": int(n_tokens),
        "skipped_empty_documents": stats.empty_documents, "skipped_empty_sentences": empty_sentences,
        "skipped_tokenless_documents": empty_token_documents,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _raw_to_npy(raw_path: Path, npy_path: Path, dtype: np.dtype, count: int) -> None:
    """Prefix the streamed raw ids with a .npy header, so building never holds all tokens in memory."""
    with open(npy_path, "wb") as out, open(raw_path, "rb") as raw:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(raw, out, 1 << 22)
    raw_path.unlink()
