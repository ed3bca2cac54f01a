"""What each P1 change bought: P1's harness over `common/instances.py` as it was at successive commits.

For each step of the work on issue 6, the generator of that commit (read with `git show`, loaded as a module
of its own) runs one worker's epoch the way the producer ran it then (per-instance generation + `collate`
before the change, batches after; messages of 32, then of 128) and encodes every message with today's
`common.wire.encode`; instances per CPU-second on one core, whole-word masking, the first `--documents`
documents of the 40 MB corpus, median of `--repeats` rounds (the variants alternate within a round). The
seed's loop (P1's baseline) is measured in the same run. Needs the repository's git history.

glibc's allocator settings are process-wide, so they cannot take turns with the rest: `--keep_freed_memory`
runs every step with them, as a producer process has run since common/allocator.py (compare two runs).

    .venv/bin/python benchmarks/bench_p1_history.py                       # ~1 min
    .venv/bin/python benchmarks/bench_p1_history.py --keep_freed_memory

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

from bench_p1_worker import baseline  # noqa: E402
from common.config import GenerationConfig  # noqa: E402
from common.wire import Header, encode  # noqa: E402

# (commit, what it changed, how the worker used it: "instances" = per instance + collate, else block size,
#  instances per message)
STEPS = [
    ("83eae4d", "before: per-instance masking (a dozen numpy calls each) + collate", "instances", 32),
    ("a2db054", "masking a batch at a time, truncation vectorised, scalar draws from a buffer", 32, 32),
    ("5056719", "flat indices in masking and assembly, bisect for the chunk's end", 32, 32),
    ("c68c608", "generated 128 at a time, messages of 32 cut from them", 128, 32),
    ("c68c608", "messages of 128 (--batch_size default 128)", 128, 128),
    ("c391129", "random next segments drawn for the whole batch", 128, 128),
    ("d025296", "pairs to arrays with fromiter", 128, 128),
    ("d025296", "messages (and generated batches) of 256", 256, 256),
    ("d025296", "messages (and generated batches) of 512, the --batch_size default now", 512, 512),
    ("7138dec", "whole-word rounds go on with the rows still waiting only", 512, 512),
]


def load(commit: str, directory: Path):
    source = subprocess.run(["git", "show", f"{commit}:common/instances.py"], cwd=support.REPO, check=True,
                            capture_output=True, text=True).stdout
    path = directory / f"instances_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"instances_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def epoch(module, index, config, vocab, header, epoch_number: int, block, message: int) -> int:
    documents = module.worker_documents(index.num_documents, 0, epoch_number, 0, 1)
    rng = module.worker_rng(0, 0, epoch_number)
    count = 0
    if block == "instances":
        pending = []
        for instance in module.iter_instances(index, documents, config, vocab, rng):
            pending.append(instance)
            if len(pending) == message:
                encode(header, module.collate(pending, config, vocab))
                count, pending = count + len(pending), []
        if pending:
            encode(header, module.collate(pending, config, vocab))
            count += len(pending)
        return count
    for batch in module.iter_batches(index, documents, config, vocab, rng, block):
        for start in range(0, batch.size, message):
            part = batch if block == message else batch.rows(start, start + message)
            encode(header, part)
            count += part.size
    return count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep_freed_memory", action="store_true",
                        help="glibc's thresholds as a producer sets them (common/allocator.py)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        from common.allocator import keep_freed_memory

        keep_freed_memory()

    support.ensure_corpus(args.corpus, 40)
    vocab, index = support.build_index(args.corpus, support.minilm_dir(), args.cache_dir)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    subset = support.first_documents(index, args.documents)
    config = GenerationConfig(whole_word_mask=True)
    header = Header("bench:1", 0, 0, 0, 0, vocab.fingerprint(config.max_seq_len), seed=0)
    import seed_reference

    db = seed_reference.DocumentDatabase([[[vocab.tokens[i] for i in s.tolist()] for s in subset.sentences_of(d)]
                                          for d in range(subset.num_documents)])
    with tempfile.TemporaryDirectory(prefix="bench_p1_history-") as tmp:
        modules = {commit: load(commit, Path(tmp)) for commit, *_ in STEPS}
        rates = {i: [] for i in range(len(STEPS))}
        seed_rates = []
        for repeat in range(args.repeats):
            start = time.process_time()
            seed_rates.append(baseline(db, list(vocab.tokens), config, repeat, True) / (time.process_time() - start))
            for i, (commit, _, block, message) in enumerate(STEPS):
                start = time.process_time()
                n = epoch(modules[commit], subset, config, vocab, header, repeat, block, message)
                rates[i].append(n / (time.process_time() - start))
            support.log(f"history round {repeat + 1}/{args.repeats} done")
    seed = support.median(seed_rates)
    rows = [("", "seed's loop + json.dumps (P1's baseline)", f"{seed:.0f}", "1.00x", "")]
    previous = None
    for i, (commit, what, _, _) in enumerate(STEPS):
        rate = support.median(rates[i])
        gain = "" if previous is None else f"{rate / previous - 1:+.0%}"
        rows.append((commit, what, f"{rate:.0f}", f"{rate / seed:.2f}x", gain))
        previous = rate
    print(f"P1 step by step: one worker, whole-word masking, {subset.num_documents} documents, per CPU-second, "
          f"median of {args.repeats}, glibc thresholds {'kept' if args.keep_freed_memory else 'default'}")
    result = {"baseline": round(seed, 1), "keep_freed_memory": args.keep_freed_memory, "steps": [{"commit": c, "what": w, "instances_per_s": round(
        support.median(rates[i]), 1)} for i, (c, w, _, _) in enumerate(STEPS)]}
    support.report("P1-history", rows, ("commit", "change", "instances/s", "vs seed", "gain"), result)
    return result


if __name__ == "__main__":
    main()
