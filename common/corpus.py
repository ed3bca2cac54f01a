"""Text → documents: the seed's input format (one sentence a line, a blank line between documents), plain or gzip.

Every file ends the document it is in, so several files concatenate as several sets of documents. A line that
is empty after stripping (`\\r\\n` endings and whitespace-only lines included) is a document break; several in a
row make empty documents, which are skipped and counted, never silently.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

NSP_NEEDS_DOCUMENTS = (
    "No document breaks were found in the input: next-sentence prediction samples its random 'next' "
    "segments from other documents, so it needs at least two. Separate documents with a blank line "
    "(one sentence per line, a blank line between documents)."
)


class CorpusError(ValueError):
    """The corpus cannot be read as bertstream input; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class Document:
    path: str
    first_line: int  # 1-based line number of the document's first sentence (a record's number), for error messages
    sentences: tuple[str, ...]


@dataclass
class CorpusStats:
    """What reading saw; `empty_documents` are skipped, and the reader says so."""

    files: int = 0
    bytes: int = 0
    lines: int = 0
    documents: int = 0
    sentences: int = 0
    empty_documents: int = 0
    per_file_bytes: dict[str, int] = field(default_factory=dict)


def check_paths(paths: list[str] | tuple[str, ...]) -> list[Path]:
    """Each corpus path as a readable file, or a CorpusError that says what is wrong with it."""
    if not paths:
        raise CorpusError("no corpus file given (--train_corpus)")
    checked = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.exists():
            raise CorpusError(f"{name}: corpus file not found")
        if path.is_dir():
            raise CorpusError(f"{name}: is a directory; pass the corpus text file(s) instead")
        checked.append(path)
    return checked


def _open_binary(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) for each line of one file; bytes that are not UTF-8 stop with file:line."""
    with _open_binary(path) as stream:
        try:
            for number, raw in enumerate(stream, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(
                        f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                if number == 1:
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not text
                yield number, text.strip()
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
            raise CorpusError(f"{path}: cannot read ({exc})") from None


def iter_documents(paths: list[str] | tuple[str, ...], stats: CorpusStats | None = None) -> Iterator[Document]:
    """Documents of all files in order. Fills `stats` as it goes; raises CorpusError at the first bad byte."""
    stats = stats if stats is not None else CorpusStats()
    for path in check_paths(paths):
        stats.files += 1
        size = path.stat().st_size
        stats.bytes += size
        stats.per_file_bytes[str(path)] = size
        sentences: list[str] = []
        first_line = 1
        for number, text in iter_lines(path):
            stats.lines += 1
            if text:
                if not sentences:
                    first_line = number
                sentences.append(text)
                continue
            if sentences:
                stats.documents += 1
                stats.sentences += len(sentences)
                yield Document(str(path), first_line, tuple(sentences))
                sentences = []
            elif number > 1:
                stats.empty_documents += 1  # a second blank line in a row: an empty document
        if sentences:
            stats.documents += 1
            stats.sentences += len(sentences)
            yield Document(str(path), first_line, tuple(sentences))
