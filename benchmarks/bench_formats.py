"""Index build speed (MB/s of text) for each corpus format, with and without --split_sentences.

The same documents (the KJV benchmark corpus of benchmarks/corpus.py, a chapter a document) are written as
the seed's text (a sentence a line), JSONL, gzip JSONL, Parquet and a saved Hugging Face dataset; then, for
--split_sentences, as one line per document (a chapter's sentences joined with spaces) in text and JSONL.
Each index is built from scratch (an empty cache) by `build_or_load_index` with the all-MiniLM-L6-v2
tokenizer in `--num_procs` processes. MB/s is the document text's UTF-8 megabytes (the same for every
format) over the build's wall time, best of `--repeats`; MB per CPU-second divides by the CPU time of this
process and its tokenizing processes instead, which a machine shared with other work disturbs less.

    .venv/bin/python benchmarks/bench_formats.py --megabytes 4 --num_procs 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from support import ensure_corpus, minilm_dir, report

from common.config import CorpusConfig
from common.index import build_or_load_index
from common.readers import SourceOptions, iter_source_documents
from common.vocab import Vocabulary, load_tokenizer


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the index build's pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_formats(text_corpus: str, out: Path) -> tuple[dict[str, tuple[Path, bool]], float]:
    """name -> (source, split_sentences) and the text's megabytes."""
    documents = [list(d.sentences) for _, d in iter_source_documents([text_corpus], SourceOptions())]
    records = ["\n".join(d) for d in documents]
    one_line = [" ".join(d) for d in documents]
    megabytes = sum(len(r.encode()) for r in records) / 1e6
    (out / "records.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    with gzip.open(out / "records.jsonl.gz", "wt") as stream:
        stream.write("".join(json.dumps({"text": r}) + "\n" for r in records))
    (out / "one_line.txt").write_text("\n\n".join(one_line) + "\n")
    (out / "one_line.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in one_line))
    formats = {"text (seed's format)": (Path(text_corpus), False), "jsonl": (out / "records.jsonl", False),
               "jsonl.gz": (out / "records.jsonl.gz", False)}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": records}), out / "records.parquet")
        formats["parquet"] = (out / "records.parquet", False)
    except ImportError:
        print("pyarrow missing: no parquet row (pip install 'bertstream[parquet]')")
    try:
        import datasets

        datasets.Dataset.from_dict({"text": records}).save_to_disk(str(out / "dataset"))
        formats["dataset (save_to_disk)"] = (out / "dataset", False)
    except ImportError:
        print("datasets missing: no dataset row (pip install 'bertstream[datasets]')")
    formats["text, a document a line, --split_sentences"] = (out / "one_line.txt", True)
    formats["jsonl, a document a line, --split_sentences"] = (out / "one_line.jsonl", True)
    formats["parquet, --split_sentences"] = (out / "records.parquet", True)
    return formats, megabytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--num_procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    corpus = ensure_corpus(f"/tmp/corpus_{args.megabytes:g}mb.txt", args.megabytes)
    model = minilm_dir()
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model, True), True)
    rows, result = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_formats-") as tmp:
        formats, megabytes = write_formats(corpus, Path(tmp))
        for name, (source, split) in formats.items():
            if not source.exists():
                continue
            times, cpus = [], []
            for _ in range(args.repeats):
                cache = Path(tmp) / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                config = CorpusConfig((str(source),), str(model), True, str(cache), split_sentences=split)
                cpu_before, start = cpu_seconds(), time.perf_counter()
                index = build_or_load_index(config, vocab, num_procs=args.num_procs)
                times.append(time.perf_counter() - start)
                cpus.append(cpu_seconds() - cpu_before)
            best, cpu = min(times), min(cpus)
            rows.append((name, f"{best:.2f}", f"{megabytes / best:.2f}", f"{cpu:.2f}", f"{megabytes / cpu:.2f}",
                         index.num_documents, index.num_sentences))
            result[name] = {"seconds": best, "mb_per_s": megabytes / best, "cpu_seconds": cpu,
                            "mb_per_cpu_s": megabytes / cpu, "documents": index.num_documents,
                            "sentences": index.num_sentences}
    report("formats", rows, ("format", "build s", "MB/s", "CPU s", "MB/CPU-s", "documents", "sentences"),
           {"megabytes": megabytes, "num_procs": args.num_procs, "formats": result})


if __name__ == "__main__":
    main()
