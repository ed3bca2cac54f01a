"""Sentence splitters compared on real text with known boundaries: speed (MB/s) and boundary errors.

The text is the King James Bible (Debian's `bible-kjv`, benchmarks/corpus.py). A verse is not always a
sentence (Genesis 1:2 holds two, and a sentence may run over several verses), so the gold standard keeps only
the verses that are exactly one sentence by their punctuation: one `.`, `!` or `?`, at the end (after it, at
most a closing quote or bracket). Each chapter's runs of such verses are joined with a space into paragraphs,
one paragraph a line, and each splitter splits each line. A verse end is a true boundary; a split anywhere
else is a spurious one. Errors are missed + spurious boundaries, per 1,000 true boundaries.

This gold standard leaves out the hardest cases (abbreviations, numbers, quotes inside sentences are rare in
the KJV), so it measures the common case and speed; the second table (`--cases`) shows each splitter on a few
hand-made lines of the hard cases.

    .venv/bin/pip install pysbd syntok   # blingfire comes with the split extra (and the test extra)
    .venv/bin/python benchmarks/bench_splitters.py

Candidates that are missing are reported as such. nltk's punkt is not a candidate here: it needs
`nltk.download('punkt_tab')`, a data download from outside the package registries, which this project's
machines cannot make (and a user's offline cluster often cannot either).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository, for common.sentences

from corpus import VERSE_LINE, find_bible_program  # noqa: E402

SINGLE_SENTENCE = re.compile(r"^[^.!?]*[.!?][\"')\]]?$")
REGEX_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")

CASES = [
    "Dr. Smith arrived at 5 p.m. on Jan. 3. He left early.",
    "The U.S. economy grew 3.5% in 2019. Analysts e.g. at the I.M.F. were surprised.",
    '"Where are you going?" she asked. "Home," he said.',
    "See section 2.1 of the manual (it is short). Then run the tests!",
    "He wrote: the results were clear. the next step was harder.",
]


def gold_paragraphs() -> tuple[list[str], list[list[str]]]:
    """Paragraphs (one line each) and the verses they are made of."""
    import subprocess

    dump = subprocess.run([find_bible_program(), "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=True).stdout
    paragraphs: list[list[str]] = []
    run: list[str] = []
    chapter = None
    for line in dump.splitlines():
        m = VERSE_LINE.match(line.strip())
        if not m:
            continue
        verse = m.group(4).strip()
        if (m.group(1), m.group(2)) != chapter or not SINGLE_SENTENCE.match(verse):
            if len(run) > 1:
                paragraphs.append(run)
            run, chapter = [], (m.group(1), m.group(2))
            if not SINGLE_SENTENCE.match(verse):
                continue
        run.append(verse)
    if len(run) > 1:
        paragraphs.append(run)
    return [" ".join(p) for p in paragraphs], paragraphs


def candidates() -> dict[str, object]:
    """name -> split(text) -> list of sentences, for each splitter that is installed (or the reason it is not)."""
    found: dict[str, object] = {
        "regex baseline": lambda text: [s for s in REGEX_BOUNDARY.split(text) if s.strip()],
    }
    try:
        import pysbd

        segmenter = pysbd.Segmenter(language="en", clean=False)
        found["pysbd " + getattr(pysbd, "__version__", "")] = segmenter.segment
    except ImportError as exc:
        found["pysbd"] = f"not installed ({exc})"
    try:
        import blingfire

        found["blingfire " + _version("blingfire")] = lambda text: blingfire.text_to_sentences(text).split("\n")
    except (ImportError, OSError) as exc:
        found["blingfire"] = f"not installed ({exc})"
    try:
        from syntok import segmenter as syntok_segmenter

        def syntok_split(text: str) -> list[str]:
            return ["".join(t.spacing + t.value for t in sentence).strip()
                    for paragraph in syntok_segmenter.analyze(text) for sentence in paragraph]

        found["syntok " + _version("syntok")] = syntok_split
    except ImportError as exc:
        found["syntok"] = f"not installed ({exc})"
    try:
        from common.sentences import SPLITTER, split_line

        found[f"bertstream ({SPLITTER})"] = split_line
    except ImportError as exc:
        found["bertstream"] = f"not importable ({exc})"
    return found


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def boundaries(pieces: list[str]) -> set[int]:
    """Character offsets (spaces removed) where each piece but the last ends: comparable across splitters that
    keep or drop the spaces between sentences."""
    ends, at = set(), 0
    for piece in pieces[:-1]:
        at += len(re.sub(r"\s+", "", piece))
        ends.add(at)
    return ends


def score(split, paragraphs: list[str], verses: list[list[str]]) -> dict:
    missed = spurious = true = 0
    start = time.perf_counter()
    outputs = [split(p) for p in paragraphs]
    seconds = time.perf_counter() - start
    for output, parts in zip(outputs, verses):
        gold, got = boundaries(parts), boundaries([o for o in output if o.strip()])
        true += len(gold)
        missed += len(gold - got)
        spurious += len(got - gold)
    megabytes = sum(len(p.encode()) for p in paragraphs) / 1e6
    return {"mb_per_s": megabytes / seconds, "seconds": seconds, "true": true, "missed": missed,
            "spurious": spurious, "errors_per_1000": 1000 * (missed + spurious) / true}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", action="store_true", help="also print each splitter's output on the hard cases")
    args = parser.parse_args(argv)
    paragraphs, verses = gold_paragraphs()
    size = sum(len(p.encode()) for p in paragraphs) / 1e6
    print(f"gold: {len(paragraphs)} paragraphs, {sum(map(len, verses))} single-sentence verses, {size:.2f} MB")
    results = {}
    print(f"{'splitter':<28} {'MB/s':>8} {'missed':>7} {'spurious':>9} {'errors/1000':>12}")
    for name, split in candidates().items():
        if isinstance(split, str):
            print(f"{name:<28} {split}")
            results[name] = split
            continue
        r = score(split, paragraphs, verses)
        results[name] = r
        print(f"{name:<28} {r['mb_per_s']:>8.2f} {r['missed']:>7} {r['spurious']:>9} {r['errors_per_1000']:>12.1f}")
    if args.cases:
        for name, split in candidates().items():
            if isinstance(split, str):
                continue
            print(f"\n{name}:")
            for case in CASES:
                print("   " + " | ".join(s.strip() for s in split(case)))
    print(json.dumps({"benchmark": "splitters", "results": results}))


if __name__ == "__main__":
    main()
