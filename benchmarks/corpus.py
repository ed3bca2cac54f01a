"""Build a real-text benchmark corpus in bertstream's input format from a registry package.

Source: the King James Bible as Debian's `bible-kjv` package ships it (public domain, 1611; about 4.4 MB
of text, 66 books, 1,189 chapters). Nobody on the project wrote it, it is real English prose with long and
short sentences, and `apt-get install bible-kjv` brings it to any fresh Debian machine. Its `bible`
program dumps the whole text, one verse a line ("Ge1:1 In the beginning ...").

Output: one chapter = one document; the chapter's verses are joined and split into sentences on ". ", "! "
or "? " before a capital letter; one sentence a line, a blank line between documents. If more megabytes
are asked for than the text holds, whole documents are repeated, in order, until the size is reached;
fewer, and the text stops at the first document boundary past the size.

    python benchmarks/corpus.py --out /tmp/corpus_4mb.txt --megabytes 4

Standard library only.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

BIBLE_PACKAGE = "bible-kjv"  # depends on bible-kjv-text, the compressed text itself
VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Co13:4 Charity suffereth long, ..."
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
MEGABYTE = 1_000_000


def _run(cmd):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def find_bible_program() -> str:
    """Path of Debian's `bible` program, installing the package with apt-get if it is missing."""
    path = shutil.which("bible")
    if path:
        return path
    print(f"`bible` not found: installing Debian package {BIBLE_PACKAGE}", file=sys.stderr)
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
    try:
        _run(apt + ["install", "-y", "--no-install-recommends", BIBLE_PACKAGE])
    except subprocess.CalledProcessError:  # a fresh machine may have no package lists yet
        _run(apt + ["update"])
        _run(apt + ["install", "-y", "--no-install-recommends", BIBLE_PACKAGE])
    path = shutil.which("bible")
    if not path:
        raise RuntimeError(f"installed {BIBLE_PACKAGE} but found no `bible` program on PATH")
    return path


def source_documents(by: str = "chapter") -> list[list[str]]:
    """The KJV text as documents (one per chapter, or with `by="book"` one per book: 66 long documents, as
    benchmarks/bench_learning.py uses), each a list of sentences."""
    # -f turns pretty-printing off: one verse a line, each prefixed with its reference.
    dump = subprocess.run([find_bible_program(), "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=True).stdout
    chapters: dict[tuple[str, str], list[str]] = {}  # insertion-ordered: Genesis 1 ... Revelation 22
    for line in dump.splitlines():
        m = VERSE_LINE.match(line.strip())
        if m:
            chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(4).strip())
    if len(chapters) < 1000:
        raise RuntimeError(f"expected the whole KJV (1,189 chapters) from `bible`, parsed {len(chapters)}")
    if by == "book":
        books: dict[str, list[str]] = {}
        for (book, _), verses in chapters.items():
            books.setdefault(book, []).extend(verses)
        chapters = books
    # Verses are not sentences: a verse may hold several, and a sentence may run over two verses.
    return [[s for s in SENTENCE_END.split(" ".join(verses)) if s] for verses in chapters.values()]


def write_corpus(out_path: str, megabytes: float) -> dict:
    """Write whole documents until `megabytes` MB (10^6 bytes) are reached; return the file's stats."""
    blocks = ["\n".join(doc) + "\n" for doc in source_documents()]
    target = megabytes * MEGABYTE
    size = documents = sentences = 0
    with open(out_path, "w", encoding="utf-8", newline="\n") as out:
        while True:
            for block in blocks:
                if size >= target:
                    return {"path": out_path, "bytes": size, "documents": documents, "sentences": sentences}
                if documents:
                    out.write("\n")  # the blank line between documents
                    size += 1
                out.write(block)
                size += len(block.encode("utf-8"))
                documents += 1
                sentences += block.count("\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="corpus file to write")
    parser.add_argument("--megabytes", type=float, default=4.0,
                        help="size in MB (10^6 bytes), reached with whole documents, repeated past the source's 4.3 MB")
    args = parser.parse_args(argv)
    if args.megabytes <= 0:
        parser.error(f"--megabytes must be positive, got {args.megabytes}")
    stats = write_corpus(args.out, args.megabytes)
    print(f"wrote {stats['path']}: {stats['bytes'] / MEGABYTE:.2f} MB ({stats['bytes']} bytes), "
          f"{stats['documents']} documents, {stats['sentences']} sentences")


if __name__ == "__main__":
    main()
