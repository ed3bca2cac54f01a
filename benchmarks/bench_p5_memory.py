"""P5: the producer's peak memory (its largest process) streaming a whole epoch of the 40 MB corpus, against the
same on a 4 MB corpus; and the seed's in-memory corpus at both sizes, for comparison.

Each run streams one epoch (`--epochs 1`, `--workers` worker processes) into a PULL socket in this process
that decodes every message, and samples every process of the producer (supervisor and workers) every 50 ms:
VmHWM (peak resident set) and, at the same time, RssAnon (the process's own memory) and RssFile (mapped
files: the memory-mapped index, which is page cache shared by every process that maps it, and the
interpreter's libraries). The figure is the largest process's VmHWM. Warm index by default; `--cold` builds
it in the run (tokenizing processes and a cold start's early stream included).

The seed's way holds the whole tokenized corpus as Python lists of token strings (`DocumentDatabase`); a
child process builds exactly that from the same tokens (tests/seed_reference.py) and reports its VmHWM.

    .venv/bin/python benchmarks/bench_p5_memory.py          # ~1.5 min

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

CORPORA = ((support.CORPUS_4MB, 4), (support.CORPUS_40MB, 40))


def stream_epoch(args, corpus: str, cache_dir: str) -> dict:
    """Peak memory of the producer's processes while it streams one epoch."""
    import zmq

    from common.wire import decode

    endpoint = support.free_endpoint()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    command = support.producer_command(corpus, support.minilm_dir(), cache_dir, endpoint, "--epochs", "1",
                                       "--num_workers", str(args.workers))
    producer = subprocess.Popen(command, cwd=support.REPO, env=support.ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    peaks: dict[int, dict] = {}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            for pid in support.process_tree(producer.pid):
                status = support.proc_status(pid)
                if not status:
                    continue
                peak = peaks.setdefault(pid, {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, "VmRSS": 0})
                peak["VmHWM"] = max(peak["VmHWM"], status.get("VmHWM", 0))
                if status.get("VmRSS", 0) >= peak["VmRSS"]:  # the composition at the largest resident set seen
                    peak.update({k: status.get(k, 0) for k in ("VmRSS", "RssAnon", "RssFile")})
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    instances, start = 0, time.monotonic()
    try:
        while producer.poll() is None or pull.poll(0):
            if pull.poll(200):
                instances += decode(pull.recv(copy=False).buffer).batch.size
            if time.monotonic() - start > args.timeout_s:
                raise SystemExit(f"the producer did not finish an epoch of {corpus} in {args.timeout_s} s")
    finally:
        sampling.set()
        sampler.join()
        support.stop(producer)
        pull.close(linger=0)
        context.term()
    largest = max(peaks.values(), key=lambda p: p["VmHWM"])
    return {"largest_mb": largest["VmHWM"] / 1024, "largest_anon_mb": largest["RssAnon"] / 1024,
            "largest_file_mb": largest["RssFile"] / 1024, "processes": len(peaks),
            "sum_of_peaks_mb": sum(p["VmHWM"] for p in peaks.values()) / 1024, "instances": instances,
            "seconds": time.monotonic() - start}


def seed_corpus_memory(corpus: str, cache_dir: str) -> float:
    """MB of peak RSS of a process holding the corpus the seed's way (lists of token strings)."""
    code = (
        "import sys; sys.path.insert(0, %r); import support, seed_reference\n"
        "vocab, index = support.build_index(%r, support.minilm_dir(), %r)\n"
        "docs = [[[vocab.tokens[i] for i in s.tolist()] for s in index.sentences_of(d)]"
        " for d in range(index.num_documents)]\n"
        "db = seed_reference.DocumentDatabase(docs)\n"
        "print(support.proc_status(__import__('os').getpid())['VmHWM'] / 1024)\n"
    ) % (str(Path(__file__).resolve().parent), corpus, cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=support.ENV, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="build the index during each run (fresh cache)")
    parser.add_argument("--no_seed", action="store_true", help="skip the seed's in-memory corpus")
    parser.add_argument("--timeout_s", type=float, default=600)
    args = parser.parse_args(argv)

    for path, megabytes in CORPORA:
        support.ensure_corpus(path, megabytes)
        if not args.cold:
            support.build_index(path, support.minilm_dir(), args.cache_dir)
    runs = {mb: [] for _, mb in CORPORA}
    with tempfile.TemporaryDirectory(prefix="bench_p5-") as tmp:
        for repeat in range(args.repeats):
            for path, mb in CORPORA:
                cache = str(Path(tmp) / f"cache{repeat}_{mb}") if args.cold else args.cache_dir
                runs[mb].append(stream_epoch(args, path, cache))
                if args.cold:
                    shutil.rmtree(cache, ignore_errors=True)
                r = runs[mb][-1]
                support.log(f"P5 repeat {repeat + 1}/{args.repeats} {mb} MB: largest process {r['largest_mb']:.1f} MB "
                            f"(anon {r['largest_anon_mb']:.1f}, file {r['largest_file_mb']:.1f}), "
                            f"{r['instances']} instances in {r['seconds']:.1f} s")
    seed = {} if args.no_seed else {mb: seed_corpus_memory(path, args.cache_dir) for path, mb in CORPORA}
    med = {mb: {k: support.median([r[k] for r in rs]) for k in rs[0]} for mb, rs in runs.items()}
    ratio = med[40]["largest_mb"] / med[4]["largest_mb"]
    rows = [(f"{mb} MB", f"{m['largest_mb']:.1f}", f"{m['largest_anon_mb']:.1f}", f"{m['largest_file_mb']:.1f}",
             f"{m['sum_of_peaks_mb']:.1f} ({m['processes']:.0f})", f"{seed[mb]:.1f}" if seed else "-")
            for mb, m in med.items()]
    rows.append(("40 MB / 4 MB", f"{ratio:.2f}x", "", "", "",
                 f"{seed[40] / seed[4]:.2f}x" if seed else "-"))
    print(f"P5: producer peak memory streaming one epoch ({args.workers} workers, "
          f"{'cold: index built in the run' if args.cold else 'warm index'}), median of {args.repeats}; MB")
    result = {"target": "<= 1.5x", "metric": "largest producer process VmHWM, 40 MB corpus / 4 MB corpus",
              "baseline": round(seed[40] / seed[4], 2) if seed else None, "ours": round(ratio, 3),
              "ratio": round(ratio, 3), "met": ratio <= 1.5, "medians_mb": med, "seed_corpus_mb": seed,
              "runs": runs, "workers": args.workers, "cold": args.cold}
    support.report("P5", rows, ("corpus", "largest VmHWM", "its RssAnon", "its RssFile", "sum of peaks (procs)",
                                "seed's corpus in memory"), result)
    return result


if __name__ == "__main__":
    main()
