"""Corpus sources → documents: the seed's text files, JSONL records, Parquet rows and Hugging Face datasets, streamed.

Each `--train_corpus` entry is a *source*; its kind comes from its name:

- `hf:NAME`: a Hugging Face Hub dataset, split `--dataset_split` (needs the `datasets` extra);
- a directory: a dataset saved with `Dataset.save_to_disk` (needs the `datasets` extra);
- `*.jsonl`, `*.jsonl.gz`: one JSON object a line, one document a record, its text in `--text_field`;
- `*.parquet`: one document a row, the same field (needs the `parquet` extra, pyarrow);
- anything else: the seed's text format (common/corpus.py), plain or gzip.

A record's text is split on newlines into stripped, non-empty lines: without `--split_sentences` those lines are
the document's sentences, as a text file's are; with it, the index build splits each line further
(common/sentences.py). Every reader streams: records come a line or a record batch at a time (datasets are
memory-mapped Arrow), so memory does not grow with the corpus. A bad record (not JSON, not an object, no such
field, not a string) stops the build with a CorpusError naming the file and the record's number.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from common.corpus import CorpusError, CorpusStats, Document, iter_documents as iter_text_documents, iter_lines

TEXT, JSONL, PARQUET, DATASET, HUB = "text", "jsonl", "parquet", "dataset", "hub"
HUB_PREFIX = "hf:"
_RECORD_BATCH = 1024  # Parquet and dataset rows read at a time: large enough to amortise the call, small in memory
EXTRAS = {"pyarrow": "parquet", "datasets": "datasets"}  # module -> the bertstream extra that installs it


@dataclass(frozen=True)
class SourceOptions:
    """How record sources are read (the flags of the same names)."""

    text_field: str = "text"  # the record field (JSONL key, Parquet/dataset column) that holds a document's text
    dataset_split: str = "train"  # the split of a Hub dataset, or of a saved DatasetDict


def source_kind(name: str) -> str:
    """The reader a source name selects; raises CorpusError if it names nothing readable."""
    if name.startswith(HUB_PREFIX):
        if not name[len(HUB_PREFIX):]:
            raise CorpusError(f"{name}: expected hf:NAME, a dataset name on the Hugging Face Hub")
        return HUB
    path = Path(name).expanduser()
    if not path.exists():
        raise CorpusError(f"{name}: corpus file not found")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return DATASET
        raise CorpusError(f"{name}: is a directory but not a saved Hugging Face dataset (no dataset_info.json or "
                          "dataset_dict.json); pass the corpus file(s) instead")
    lower = path.name.lower()
    if lower.endswith((".jsonl", ".jsonl.gz")):
        return JSONL
    if lower.endswith(".parquet"):
        return PARQUET
    return TEXT


def check_sources(names: tuple[str, ...] | list[str]) -> list[str]:
    """Each source's kind, or a CorpusError for the first that cannot be read (checked before any work)."""
    if not names:
        raise CorpusError("no corpus given (--train_corpus)")
    return [source_kind(name) for name in names]


def require(module: str, source: str):
    """Import an optional reader's module, or a CorpusError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS[module.split(".")[0]]
        raise CorpusError(f"{source}: reading it needs {module.split('.')[0]} ({exc}); install it with "
                          f"`pip install 'bertstream[{extra}]'`") from None


def add_source_flags(group) -> None:
    """The flags that say how sources are read: the producer's for --train_corpus, the trainer's for --eval_corpus."""
    group.add_argument("--text_field", default="text",
                       help="the field of a JSONL record or the column of a Parquet file or dataset that holds a "
                       "document's text (default %(default)s)")
    group.add_argument("--dataset_split", default="train",
                       help="the split of an hf:NAME dataset or of a saved DatasetDict (default %(default)s)")
    group.add_argument("--split_sentences", action="store_true",
                       help="split each line (or record) into sentences with Bling Fire, once, in the index build "
                       "(pip install 'bertstream[split]'); without it a line is a sentence")


# --- documents -------------------------------------------------------------------------------------------


def text_lines(text: str) -> tuple[str, ...]:
    """A record's text as its stripped, non-empty lines."""
    return tuple(line for line in (raw.strip() for raw in text.splitlines()) if line)


def _record_text(record, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise CorpusError(f"{where}: no field {field!r} (fields: {fields}); choose the text's field with --text_field")
    text = record[field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise CorpusError(f"{where}: field {field!r} is {kind}, expected a string")
    return text


def _iter_jsonl(path: Path, field: str) -> Iterator[tuple[int, str]]:
    record = 0
    for number, line in iter_lines(path):  # stripped, UTF-8 checked, gzip or plain
        if not line:
            continue  # a blank line between records is not a record
        record += 1
        where = f"{path}: record {record} (line {number})"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield record, _record_text(value, field, where)


def _check_column(source: str, columns: list[str], field: str, kind: str, is_string: bool) -> None:
    if field not in columns:
        raise CorpusError(f"{source}: no column {field!r} (columns: {', '.join(columns)}); "
                          "choose the text's column with --text_field")
    if not is_string:
        raise CorpusError(f"{source}: column {field!r} is {kind}, expected strings")


def _iter_column(source: str, batches, field: str) -> Iterator[tuple[int, str]]:
    """(record number, text) from batches of a column's values; a null is a bad record."""
    record = 0
    for values in batches:
        for text in values:
            record += 1
            if not isinstance(text, str):
                raise CorpusError(f"{source}: record {record}: field {field!r} is "
                                  f"{'null' if text is None else type(text).__name__}, expected a string")
            yield record, text


def _iter_parquet(path: Path, field: str) -> Iterator[tuple[int, str]]:
    pq = require("pyarrow.parquet", str(path))
    pa = require("pyarrow", str(path))
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    kind = schema.field(field).type if field in schema.names else None
    _check_column(str(path), schema.names, field, str(kind),
                  kind is not None and (pa.types.is_string(kind) or pa.types.is_large_string(kind)))
    batches = (batch.column(0).to_pylist() for batch in parquet.iter_batches(batch_size=_RECORD_BATCH, columns=[field]))
    yield from _iter_column(str(path), batches, field)


def load_dataset_source(name: str, options: SourceOptions):
    """The `datasets.Dataset` a dataset source names (memory-mapped Arrow: nothing is read into memory)."""
    datasets = require("datasets", name)
    if name.startswith(HUB_PREFIX):
        try:
            return datasets.load_dataset(name[len(HUB_PREFIX):], split=options.dataset_split)
        except Exception as exc:  # offline, unknown name, unknown split: all mean "cannot read this source"
            raise CorpusError(f"{name}: cannot load split {options.dataset_split!r} from the Hugging Face Hub "
                              f"({type(exc).__name__}: {exc})") from None
    loaded = datasets.load_from_disk(str(Path(name).expanduser()))
    if isinstance(loaded, datasets.DatasetDict):
        if options.dataset_split not in loaded:
            raise CorpusError(f"{name}: no split {options.dataset_split!r} (splits: {', '.join(loaded)}); "
                              "choose one with --dataset_split")
        loaded = loaded[options.dataset_split]
    return loaded


def _iter_dataset(name: str, options: SourceOptions) -> Iterator[tuple[int, str]]:
    dataset = load_dataset_source(name, options)
    field = options.text_field
    feature = dataset.features.get(field)
    dtype = getattr(feature, "dtype", type(feature).__name__)
    _check_column(name, list(dataset.column_names), field, str(dtype), dtype in ("string", "large_string"))
    columns = dataset.select_columns([field])
    batches = (batch[field] for batch in columns.iter(batch_size=_RECORD_BATCH))
    yield from _iter_column(name, batches, field)


def _iter_records(name: str, kind: str, options: SourceOptions) -> Iterator[tuple[int, str]]:
    if kind == JSONL:
        return _iter_jsonl(Path(name).expanduser(), options.text_field)
    if kind == PARQUET:
        return _iter_parquet(Path(name).expanduser(), options.text_field)
    return _iter_dataset(name, options)


def source_bytes(name: str, kind: str) -> int:
    """Size of a source as stored (compressed size for gzip; the Arrow files of a saved dataset; 0 for the Hub)."""
    if kind == HUB:
        return 0
    path = Path(name).expanduser()
    if kind == DATASET:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def iter_source_documents(names: tuple[str, ...] | list[str], options: SourceOptions,
                          stats: CorpusStats | None = None) -> Iterator[tuple[int, Document]]:
    """(source number, document) for every document of every source, in order; empty records are counted
    in `stats.empty_documents` and skipped, as blank-line runs are in text."""
    stats = stats if stats is not None else CorpusStats()
    for number, (name, kind) in enumerate(zip(names, check_sources(names))):
        if kind == TEXT:
            for document in iter_text_documents([name], stats):
                yield number, document
            continue
        stats.files += 1
        size = source_bytes(name, kind)
        stats.bytes += size
        stats.per_file_bytes[name] = size
        for record, text in _iter_records(name, kind, options):
            stats.lines += 1
            lines = text_lines(text)
            if not lines:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            stats.sentences += len(lines)
            yield number, Document(name, record, lines)


def source_digest(name: str, kind: str, options: SourceOptions) -> str:
    """sha256 over what a source holds: its bytes (a saved dataset's files), or a Hub dataset's fingerprint."""
    digest = hashlib.sha256(kind.encode())
    if kind == HUB:
        dataset = load_dataset_source(name, options)
        digest.update(f"{name}|{options.dataset_split}|{dataset._fingerprint}".encode())
        return digest.hexdigest()
    root = Path(name).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if kind == DATASET else [root]
    for path in files:
        digest.update(f"{path.relative_to(root) if kind == DATASET else ''}|{path.stat().st_size}|".encode())
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
