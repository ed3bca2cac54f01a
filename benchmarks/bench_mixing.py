"""Mixed batches: distinct documents per 32-row micro-batch, at the producer and at the trainer, vs a uniform draw.

The corpus: long documents (default 300 documents of 150 sentences, the issue's measurement), written by
`tests/mixing_support.py` so that each instance's segment A names its source document. The tiny test
vocabulary (tests/conftest.py) tokenizes it; the statistic does not depend on the model.

- producer: a real `python -m producer` (2 workers, `--batch_size 32`, `--epochs 1`) pushing into a PULL
  socket here: the mean distinct documents of its 32-row messages, as they leave it.
- trainer: a real `StreamSource` (micro-batch 32, its default `--mix_rows`) fed over tcp by the same producer:
  the mean distinct documents of the micro-batches it hands the loop. With `--shuffle_pairs 0` too (when the
  producer has the flag), so the trainer's pool is measured alone.
- uniform: the expected distinct documents of 32 rows drawn without replacement from all the epoch's rows.
- first micro-batch: seconds from the trainer's start() (producer launched just before, index cached) to
  its first micro-batch: what both buffers add to the time to the first step.

`--sweep` sizes the buffers instead, in one process, on a larger corpus (default 2000 documents): the
statistic, the memory held and the time before the first message for several producer buffer sizes
(`iter_worker_batches`, one worker of 2), and the statistic for several trainer pool sizes fed the
unshuffled messages of 2 workers in turn.

    .venv/bin/python benchmarks/bench_mixing.py            # the figures (~1 min)
    .venv/bin/python benchmarks/bench_mixing.py --sweep    # the sizing table (~2 min)

Runs on older checkouts too (for the "before" figures): flags and arguments the code lacks are left out.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402  (puts the repository and tests/ on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402

from common.instances import Batch  # noqa: E402
from common.lengths import stream_widths  # noqa: E402
from common.wire import decode  # noqa: E402
from conftest import write_tiny_model  # noqa: E402
from mixing_support import (ROWS, distinct_per_micro_batch, segment_documents, uniform_distinct,  # noqa: E402
                            write_long_corpus)
from producer.cli import build_parser  # noqa: E402

HAS_SHUFFLE = "--shuffle_pairs" in build_parser().format_help()


def as_batch(tensors) -> Batch:
    """A trainer micro-batch (compact host tensors) as the Batch the statistic reads."""
    wide = tensors.to(torch.device("cpu"))  # int64, as on the device
    return Batch(*(getattr(wide, name).numpy() for name in Batch.FIELDS))


def producer_level(corpus: Path, model: Path, cache: str, vocab, workers: int, *flags: str) -> dict:
    endpoint = support.free_endpoint()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    command = support.producer_command(str(corpus), model, cache, endpoint, "--num_workers", str(workers),
                                       "--batch_size", str(ROWS), "--epochs", "1", "--seed", "42", *flags)
    import subprocess

    process = subprocess.Popen(command, cwd=support.REPO, env=support.ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    streams: dict[int, list[int]] = {}
    try:
        while True:
            if pull.poll(100):
                m = decode(pull.recv())
                streams.setdefault(m.header.worker, []).extend(segment_documents(m.batch, vocab))
            elif process.poll() is not None:
                while pull.poll(500):
                    m = decode(pull.recv())
                    streams.setdefault(m.header.worker, []).extend(segment_documents(m.batch, vocab))
                break
    finally:
        support.stop(process)
        pull.close(linger=0)
        context.term()
    # Messages of 32 rows (an epoch's last one per worker may be short): the statistic over each worker's rows.
    documents = [d for s in streams.values() for d in s]
    got = float(np.mean([distinct_per_micro_batch(s) for s in streams.values()]))
    return {"rows": len(documents), "got": got, "uniform": uniform_distinct(documents)}


def trainer_level(corpus: Path, model: Path, cache: str, vocab, workers: int, *flags: str,
                  mix_rows: int | None = None, group: bool = True) -> dict:
    """`mix_rows` None: the trainer's default (`--mix_rows`, where the code has it); `group`: rows of similar
    length per micro-batch (the default, where the code has it) or not (`--no_group_by_length`)."""
    from trainer.source import DataTimeout, StreamSource

    endpoint = support.free_endpoint()
    kwargs = {}
    if "mix_rows" in inspect.signature(StreamSource).parameters:
        from common.shuffle import DEFAULT_MIX_ROWS

        kwargs = {"mix_rows": DEFAULT_MIX_ROWS if mix_rows is None else mix_rows, "mix_seed": (42, 0)}
    if "group_by_length" in inspect.signature(StreamSource).parameters:
        kwargs["group_by_length"] = group
    source = StreamSource(endpoint, vocab.fingerprint(128), 512, ROWS, pin_memory=False, prefetch_batches=4,
                          max_message_bytes=64 << 20, data_timeout_s=3.0, stop=threading.Event(), **kwargs)
    command = support.producer_command(str(corpus), model, cache, endpoint, "--num_workers", str(workers),
                                       "--batch_size", str(ROWS), "--epochs", "1", "--seed", "42", *flags)
    import subprocess

    process = subprocess.Popen(command, cwd=support.REPO, env=support.ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    documents: list[int] = []
    started = time.monotonic()
    try:
        source.start()
        first_s = time.monotonic() - started
        while True:
            try:
                documents += segment_documents(as_batch(source.next_batch()), vocab)
            except DataTimeout:
                break
    finally:
        support.stop(process)
        source.close()
    return {"rows": len(documents), "got": distinct_per_micro_batch(documents), "uniform": uniform_distinct(documents),
            "first_batch_s": first_s}


def figures(args, model: Path) -> None:
    corpus = write_long_corpus(Path(args.work) / f"long_{args.documents}.txt", args.documents, args.sentences)
    cache = str(Path(args.work) / "cache")
    vocab, _ = support.build_index(str(corpus), model, cache, 1)
    runs = [("producer messages", "defaults", producer_level(corpus, model, cache, vocab, args.workers)),
            ("trainer micro-batches", "defaults", trainer_level(corpus, model, cache, vocab, args.workers)),
            ("trainer micro-batches", "--no_group_by_length",
             trainer_level(corpus, model, cache, vocab, args.workers, group=False))]
    if HAS_SHUFFLE:
        runs.append(("trainer micro-batches", "producer --shuffle_pairs 0",
                     trainer_level(corpus, model, cache, vocab, args.workers, "--shuffle_pairs", "0")))
        runs.append(("trainer micro-batches", "producer --shuffle_pairs 0, --no_group_by_length",
                     trainer_level(corpus, model, cache, vocab, args.workers, "--shuffle_pairs", "0", group=False)))
        runs.append(("trainer micro-batches", "both off (--shuffle_pairs 0, --mix_rows 0)",
                     trainer_level(corpus, model, cache, vocab, args.workers, "--shuffle_pairs", "0", mix_rows=0)))
    rows = [(level, setting, r["rows"], f"{r['got']:.2f}", f"{r['uniform']:.2f}", f"{r['got'] / r['uniform']:.3f}",
             f"{r['first_batch_s']:.2f}" if "first_batch_s" in r else "")
            for level, setting, r in runs]
    print(f"distinct documents per {ROWS}-row micro-batch, {args.documents} documents of {args.sentences} sentences, "
          f"{args.workers} workers, max_seq_len 128 (shuffle buffer in the producer: {HAS_SHUFFLE})")
    support.report("mixing", rows, ("level", "setting", "rows", "distinct", "uniform", "ratio",
                                    "first micro-batch, s"),
                   {"target": ">= 0.8 of uniform at both levels", "documents": args.documents,
                    "sentences": args.sentences, "workers": args.workers, "has_shuffle": HAS_SHUFFLE,
                    "runs": [{"level": level, "setting": setting, **r} for level, setting, r in runs]})


def sweep(args, model: Path) -> None:
    from common.config import GenerationConfig
    from common.shuffle import RowPool
    from producer.worker import iter_worker_batches

    corpus = write_long_corpus(Path(args.work) / f"long_{args.sweep_documents}.txt", args.sweep_documents,
                               args.sentences)
    vocab, index = support.build_index(str(corpus), model, str(Path(args.work) / "cache"), 1)
    generation = GenerationConfig()
    rows = []
    result = {"producer": [], "trainer": []}
    for pairs in args.pairs:
        tracemalloc.start()
        started = time.process_time()
        batches = iter_worker_batches(index, generation, vocab, 42, 0, 2, ROWS, epochs=1, shuffle_pairs=pairs)
        documents = segment_documents(next(batches)[1], vocab)
        first_s = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()  # the buffer, full, before the first message
        tracemalloc.stop()
        for _, batch in batches:
            documents += segment_documents(batch, vocab)
        got, uniform = distinct_per_micro_batch(documents), uniform_distinct(documents)
        rows.append(("producer", f"{pairs} pairs", f"{got:.2f}", f"{uniform:.2f}", f"{got / uniform:.3f}",
                     f"{peak / 1e6:.1f}", f"{first_s * 1000:.0f}"))
        result["producer"].append({"pairs": pairs, "got": got, "uniform": uniform, "peak_mb": peak / 1e6,
                                   "first_message_cpu_s": first_s})
    for capacity in args.rows:
        streams = [iter_worker_batches(index, generation, vocab, 42, w, 2, ROWS, epochs=1, shuffle_pairs=0)
                   for w in range(2)]
        pool = RowPool(capacity, ROWS, np.random.default_rng([42, 0]), max_seq_len=generation.max_seq_len,
                       pad_id=vocab.pad_id, group=stream_widths(generation.max_seq_len) if args.group else None)
        received, mixed = [], []
        while streams:
            for stream in list(streams):
                message = next(stream, None)
                if message is None:
                    streams.remove(stream)
                    continue
                received += segment_documents(message[1], vocab)
                for micro in pool.push(message[1]):
                    mixed += segment_documents(micro, vocab)
        got, uniform = distinct_per_micro_batch(mixed), uniform_distinct(received)
        row_bytes = 128 * 3 + 20 * 4 + 3
        rows.append(("trainer", f"{capacity} rows", f"{got:.2f}", f"{uniform:.2f}", f"{got / uniform:.3f}",
                     f"{capacity * row_bytes / 1e6:.1f}", ""))
        result["trainer"].append({"rows": capacity, "got": got, "uniform": uniform,
                                  "pool_mb": capacity * row_bytes / 1e6})
    print(f"sizing: {args.sweep_documents} documents of {args.sentences} sentences ({index.num_documents} indexed); "
          "producer: one worker of 2, its own messages; trainer: the pool alone, fed 2 workers' unshuffled "
          "messages in turn; memory: producer = tracemalloc peak before the first message, trainer = the pool")
    support.report("mixing-sweep", rows, ("level", "buffer", "distinct", "uniform", "ratio", "MB",
                                          "first message, CPU ms"), result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-mixing"))
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--sentences", type=int, default=150, help="sentences per document")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="size the buffers instead (one process)")
    parser.add_argument("--sweep_documents", type=int, default=2000)
    parser.add_argument("--pairs", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--no_group", dest="group", action="store_false",
                        help="--sweep: the trainer's pool draws regardless of length (--no_group_by_length)")
    args = parser.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    model = Path(args.work) / "tiny"
    if not (model / "vocab.txt").exists():
        write_tiny_model(model, with_weights=False)
    (sweep if args.sweep else figures)(args, model)


if __name__ == "__main__":
    main()
