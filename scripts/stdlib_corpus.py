"""Build a demo corpus from text every machine has: the documentation of the Python standard library.

One module is one document (its docstring and those of its public classes and functions), one sentence a
line, a blank line between documents. Every `--heldout_every`-th module goes to the held-out file instead,
so evaluation measures text the model did not train on.

    python scripts/stdlib_corpus.py --out_dir demo_output/corpus
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
import sys
import warnings
from pathlib import Path

# A sentence ends at . ! or ? followed by whitespace and a capital letter or an opening quote/parenthesis.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__hello__", "__phello__"}


def module_text(name: str) -> str | None:
    """The docstrings of a module and its own public members, or None if it cannot be imported quietly."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except BaseException:  # some modules exit, need a display, or are platform-specific
        return None
    parts = [inspect.getdoc(module) or ""]
    for member_name, member in sorted(vars(module).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != name:
            continue
        doc = inspect.getdoc(member)
        if doc:
            parts.append(doc)
    return "\n".join(parts)


def sentences(text: str) -> list[str]:
    """Prose sentences: code examples (doctest lines, indented blocks) are dropped, whitespace collapsed."""
    prose = [line for line in text.splitlines() if not line.startswith((">>>", "...", "    ", "\t"))]
    flat = " ".join(" ".join(prose).split())
    return [s for s in _SENTENCE_END.split(flat) if len(s.split()) >= 3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--heldout_every", type=int, default=10, help="every N-th module is held out")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    documents = []
    for name in sorted(sys.stdlib_module_names - _SKIP):
        text = module_text(name)
        if text:
            found = sentences(text)
            if len(found) >= 2:
                documents.append(found)
    train, heldout = [], []
    for i, document in enumerate(documents):
        (heldout if i % args.heldout_every == args.heldout_every - 1 else train).append(document)
    for filename, docs in (("train.txt", train), ("heldout.txt", heldout)):
        path = args.out_dir / filename
        path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
        words = sum(len(s.split()) for d in docs for s in d)
        print(f"{path}: {len(docs)} documents, {sum(map(len, docs))} sentences, {words} words")


if __name__ == "__main__":
    main()
