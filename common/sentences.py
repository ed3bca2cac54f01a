"""Lines → sentences for `--split_sentences`: Bling Fire's sentence breaker, chosen by measurement.

benchmarks/bench_splitters.py compared it with pysbd, syntok and a regex baseline on 2.7 MB of King James
Bible paragraphs with known boundaries (docs/producer.md, "Input formats"): Bling Fire made 0.3 errors per 1,000
boundaries at 22 MB/s, pysbd 3.4 at 0.06 MB/s (a 1 GB corpus would take hours even on 16 cores), syntok 33 at
1.4 MB/s, the regex 8.9 at 16 MB/s (and it splits "Dr. Smith"). Bling Fire is a native library in a
pure-Python wheel (about 100 MB installed, most of it tokenizer models we do not use), so it is the optional
`split` extra rather than a core dependency: only users who pass `--split_sentences` carry it.

The split runs in the index build's tokenizing processes (common/index.py), so it is paid once per corpus
and cached with the index; the splitter's name and version are part of the index key.
"""

from __future__ import annotations

from common.corpus import CorpusError

SPLITTER = "blingfire"
EXTRA = "split"

_text_to_sentences = None


def splitter_id() -> str:
    """Name and version of the splitter, for the index key (a new version may split differently)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{SPLITTER}=={version(SPLITTER)}"
    except PackageNotFoundError:
        raise CorpusError(missing_message()) from None


def missing_message(detail: str = "") -> str:
    return (f"--split_sentences needs the {SPLITTER} sentence splitter{f' ({detail})' if detail else ''}; "
            f"install it with `pip install 'bertstream[{EXTRA}]'`")


def load() -> None:
    """Import the splitter (once per process); a CorpusError naming the extra if it is missing or cannot load."""
    global _text_to_sentences
    if _text_to_sentences is None:
        try:
            from blingfire import text_to_sentences
        except (ImportError, OSError) as exc:  # OSError: its native library does not load on this platform
            raise CorpusError(missing_message(str(exc))) from None
        _text_to_sentences = text_to_sentences


def split_line(line: str) -> list[str]:
    """The sentences of one line of text, stripped, none empty."""
    load()
    return [s for s in (piece.strip() for piece in _text_to_sentences(line).split("\n")) if s]


def split_document(lines: tuple[str, ...]) -> tuple[str, ...]:
    """A document's lines, each split into sentences (a sentence never spans two lines: a line break in a
    record is a paragraph or a heading, not the middle of a sentence)."""
    return tuple(sentence for line in lines for sentence in split_line(line))
