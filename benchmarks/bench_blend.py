"""A blend's shares as they reach the trainer: a real producer streams a 0.8/0.2 blend, and the receiving end
counts each message's per-corpus header, decoded by `common.wire.decode` as the trainer's receive thread does.

Corpora: the Python standard library's documentation (scripts/stdlib_corpus.py, a module a document, about
2 MB: the "domain") at 0.8, and the KJV (benchmarks/corpus.py, a chapter a document, 4 MB: the "general"
text) at 0.2. The stdlib corpus is smaller than its share, so it repeats; the KJV is sampled.

    .venv/bin/python benchmarks/bench_blend.py --epochs 2
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
from support import ENV, REPO, ensure_corpus, free_endpoint, minilm_dir, report

from common.wire import decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--weights", type=float, nargs=2, default=(0.8, 0.2))
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args(argv)
    general = ensure_corpus("/tmp/corpus_4mb.txt", 4)
    model = minilm_dir()
    with tempfile.TemporaryDirectory(prefix="bench_blend-") as tmp:
        subprocess.run([sys.executable, str(REPO / "scripts" / "stdlib_corpus.py"), "--out_dir", tmp], check=True,
                       env=ENV, capture_output=True)
        domain = next(p for p in Path(tmp).glob("*.txt") if "heldout" not in p.name)
        endpoint = free_endpoint()
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.bind(endpoint)
        log_path = Path(tmp) / "producer.log"
        started = time.monotonic()
        with open(log_path, "w") as log:
            producer = subprocess.Popen(
                [sys.executable, "-m", "producer", "--train_corpus", str(domain), general, "--corpus_weights",
                 *map(str, args.weights), "--bert_model", str(model), "--do_lower_case", "--cache_dir",
                 str(Path(tmp) / "cache"), "--connect", endpoint, "--epochs", str(args.epochs), "--num_workers",
                 str(args.num_workers), "--progress_interval_s", "5"], cwd=REPO, env=ENV, stdout=log,
                stderr=subprocess.STDOUT)
        per_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        announced = None
        while True:
            if pull.poll(200):
                message = decode(pull.recv())
                announced = message.header.epoch_instances
                for corpus, count in enumerate(message.header.blend):
                    per_epoch[message.header.epoch][corpus] += count
            elif producer.poll() is not None and not pull.poll(1000):
                break
        pull.close(linger=0)
        context.term()
        elapsed = time.monotonic() - started
        lines = [line for line in log_path.read_text().splitlines() if "blend" in line]
    rows, total = [], collections.Counter()
    for epoch in sorted(per_epoch):
        counts = per_epoch[epoch]
        total.update(counts)
        n = sum(counts.values())
        rows.append((epoch, n, f"{counts[0] / n:.4f}", f"{counts[1] / n:.4f}"))
    n = sum(total.values())
    rows.append(("all", n, f"{total[0] / n:.4f}", f"{total[1] / n:.4f}"))
    for line in lines:
        print(line)
    report("blend", rows, ("epoch", "instances", f"stdlib (w {args.weights[0]:g})", f"kjv (w {args.weights[1]:g})"),
           {"weights": list(args.weights), "announced_epoch_instances": announced, "seconds": elapsed,
            "shares": [total[0] / n, total[1] / n], "instances": n, "producer_exit": producer.returncode})


if __name__ == "__main__":
    main()
