"""P1: instances per CPU-second of one producer worker, index warm, against the seed's generation loop.

Both sides run in this process, pinned to one core, over the same documents (the first `--documents` of the
corpus, tokenized once by the same tokenizer), `--repeats` times each, alternating; the table shows medians of
instances per CPU-second (CPU time, so other work on a shared machine does not count against either side).

- bertstream: what a producer worker does per message, the socket aside: its batches
  (`producer.worker.iter_worker_batches`: pairs, truncation and masking on a whole batch's arrays) encoded
  for the wire (`common.wire.encode`), at the producer's default `--batch_size` (and at 32, for comparison).
- baseline: the seed's `pregenerate_training_data.py` loop as the seed ran it, in tests/seed_reference.py
  (Python lists of token strings, per-token loops, one process): `create_instances_from_document` for every
  document, then `json.dumps` of each instance (its output format; writing the file is left out).

Generation alone (no encode / no json) is reported for both, for transparency. Whole-word masking is the
headline figure (the issue's setting); `--no_wwm` adds nothing, the plain run is always shown too.

    .venv/bin/python benchmarks/bench_p1_worker.py                 # ~1 min
    .venv/bin/python benchmarks/bench_p1_worker.py --profile       # + cProfile of bertstream's side

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402  (puts the repository and tests/ on sys.path)

import seed_reference  # noqa: E402
from common.allocator import keep_freed_memory  # noqa: E402
from common.config import GenerationConfig  # noqa: E402
from common.wire import Header, encode  # noqa: E402
from producer.cli import build_parser  # noqa: E402
from producer.worker import iter_worker_batches  # noqa: E402


def ours(index, config, vocab, batch_size: int, epoch: int, wire: bool) -> int:
    """One epoch of one worker (worker 0 of 1): its messages' batches, encoded as they would be sent."""
    header = Header("bench:1", 0, epoch, 0, 0, vocab.fingerprint(config.max_seq_len), seed=0)
    count = 0
    for _, batch in iter_worker_batches(index, config, vocab, 0, 0, 1, batch_size, epoch, epoch + 1):
        if wire:
            encode(header, batch)
        count += batch.size
    return count


def baseline(db, vocab_list, config, epoch: int, wire: bool) -> int:
    """One epoch of the seed's loop; with `wire`, each record becomes its JSON line as the seed writes it."""
    rng = random.Random(epoch)
    count = 0
    for doc_idx in range(len(db)):
        for record in seed_reference.create_instances_from_document(
                db, doc_idx, config.max_seq_len, config.short_seq_prob, config.masked_lm_prob,
                config.max_predictions_per_seq, config.whole_word_mask, vocab_list, rng):
            if wire:
                json.dumps(record)
            count += 1
    return count


def cpu_rate(run) -> float:
    start = time.process_time()
    count = run()
    return count / (time.process_time() - start)


def measure(subset, db, vocab, args, whole_word_mask: bool) -> dict:
    config = GenerationConfig(max_seq_len=args.max_seq_len, whole_word_mask=whole_word_mask)
    vocab_list = list(vocab.tokens)
    runs = {"ours": [], "ours_generate": [], "ours_small_messages": [], "baseline": [], "baseline_generate": []}
    for repeat in range(args.repeats):  # alternating, so a burst of load elsewhere hits every side alike
        runs["ours"].append(cpu_rate(lambda: ours(subset, config, vocab, args.batch_size, repeat, True)))
        runs["baseline"].append(cpu_rate(lambda: baseline(db, vocab_list, config, repeat, True)))
        runs["ours_generate"].append(cpu_rate(lambda: ours(subset, config, vocab, args.batch_size, repeat, False)))
        runs["baseline_generate"].append(cpu_rate(lambda: baseline(db, vocab_list, config, repeat, False)))
        runs["ours_small_messages"].append(cpu_rate(lambda: ours(subset, config, vocab, 32, repeat, True)))
        support.log(f"P1 wwm={whole_word_mask} repeat {repeat + 1}/{args.repeats}: ours {runs['ours'][-1]:.0f}/s, "
                    f"baseline {runs['baseline'][-1]:.0f}/s")
    medians = {k: support.median(v) for k, v in runs.items()}
    return {**{k: round(v, 1) for k, v in medians.items()},
            "ratio": round(medians["ours"] / medians["baseline"], 2),
            "ratio_generate": round(medians["ours_generate"] / medians["baseline_generate"], 2),
            "ratio_small_messages": round(medians["ours_small_messages"] / medians["baseline"], 2),
            "runs": {k: [round(x) for x in v] for k, v in runs.items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--documents", type=int, default=2000, help="first documents used by both sides")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=build_parser().get_default("batch_size"),
                        help="instances per message (default: the producer's default, %(default)s)")
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    support.ensure_corpus(args.corpus, 40)
    keep_freed_memory()  # as a producer process does (common/allocator.py)
    model = support.minilm_dir()
    vocab, index = support.build_index(args.corpus, model, args.cache_dir)
    if hasattr(os, "sched_setaffinity"):  # one core, as one worker process has
        os.sched_setaffinity(0, {args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))})
    subset = support.first_documents(index, args.documents)
    # The baseline's input: the same documents as lists of token strings, as the seed holds them.
    db = seed_reference.DocumentDatabase([[[vocab.tokens[i] for i in sentence.tolist()]
                                           for sentence in subset.sentences_of(d)]
                                          for d in range(subset.num_documents)])
    results = {"wwm": measure(subset, db, vocab, args, True), "plain": measure(subset, db, vocab, args, False)}

    profile = None
    if args.profile:
        profiler = cProfile.Profile()
        config = GenerationConfig(max_seq_len=args.max_seq_len, whole_word_mask=True)
        profiler.runcall(ours, subset, config, vocab, args.batch_size, 0, True)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        profile = out.getvalue()
        print(profile)

    rows = []
    for mode, label in (("wwm", "whole-word masking"), ("plain", "token masking")):
        r = results[mode]
        rows.append((label, "generate + wire format", f"{r['baseline']:.0f}", f"{r['ours']:.0f}", f"{r['ratio']:.2f}x"))
        rows.append((label, "generate only", f"{r['baseline_generate']:.0f}", f"{r['ours_generate']:.0f}",
                     f"{r['ratio_generate']:.2f}x"))
        rows.append((label, "generate + wire, 32 a message", f"{r['baseline']:.0f}",
                     f"{r['ours_small_messages']:.0f}", f"{r['ratio_small_messages']:.2f}x"))
    print(f"P1: one worker, instances per CPU-second, {subset.num_documents} documents "
          f"({subset.num_tokens} tokens) of {args.corpus}, max_seq_len {args.max_seq_len}, batch {args.batch_size}, "
          f"median of {args.repeats}")
    result = {"target": ">= 3x (stretch 10x)", "metric": "instances per CPU-second, one core",
              "baseline": results["wwm"]["baseline"], "ours": results["wwm"]["ours"],
              "ratio": results["wwm"]["ratio"], "met": results["wwm"]["ratio"] >= 3,
              "documents": subset.num_documents, "batch_size": args.batch_size, "repeats": args.repeats,
              "corpus": args.corpus, "detail": results}
    support.report("P1", rows, ("masking", "measured", "seed loop /s", "bertstream /s", "ratio"), result)
    return result


if __name__ == "__main__":
    main()
