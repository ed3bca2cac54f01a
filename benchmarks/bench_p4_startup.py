"""P4: seconds from starting the producer and the trainer to the trainer's first optimizer step, on the 40 MB
corpus, with a cold cache (no index: it is built while streaming starts) and a warm one (the index cached).

Each run starts `python -m producer --connect` and `python -m trainer --bind --max_steps 1 --logging_steps 1`
at the same moment (the producer's default worker count and batch size; the trainer on the CPU with the tiny
model of P3 unless `--model minilm`), and times, by polling their files every 10 ms: the trainer listening,
its first batch, and its first optimizer step (the first metrics.jsonl record). A cold run uses an empty
`--cache_dir`; the corpus file itself stays in the page cache (dropping it needs root and would disturb the
machine's other users). `--repeats` runs of each, alternating; medians.

How the cold start is met: the tokenizing processes run niced below the trainer's start-up, and while they
build the index the producer streams epoch 0 from the documents already tokenized (producer/early.py); the
log line "early stream: ..." says how much went that way.

    .venv/bin/python benchmarks/bench_p4_startup.py          # ~2 min

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

_EARLY_FIRST = re.compile(r"early stream: first batch after ([\d.]+) s")
_EARLY_DONE = re.compile(r"early stream: (\d+) instances from documents")


def one_start(args, model: Path, cache_dir: Path, work: Path) -> dict:
    endpoint = support.free_endpoint()
    out = work / "trainer_out"
    producer_log, trainer_log = work / "producer.log", work / "trainer.log"
    producer_cmd = support.producer_command(args.corpus, model, str(cache_dir), endpoint)
    trainer_cmd = [sys.executable, "-m", "trainer", "--bind", endpoint, "--bert_model", str(model), "--do_lower_case",
                   "--output_dir", str(out), "--no_cuda", "--max_steps", "1", "--logging_steps", "1",
                   "--save_steps", "0", "--no_resume", "--data_timeout", "600"]
    marks: dict[str, float] = {}
    with open(producer_log, "w") as plog, open(trainer_log, "w") as tlog:
        start = time.monotonic()
        producer = subprocess.Popen(producer_cmd, cwd=support.REPO, env=support.ENV, stdout=plog,
                                    stderr=subprocess.STDOUT)
        trainer = subprocess.Popen(trainer_cmd, cwd=support.REPO, env=support.ENV, stdout=tlog,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = start + args.timeout_s
            metrics = out / "metrics.jsonl"
            while "first_step" not in marks:
                now = time.monotonic()
                if now > deadline or trainer.poll() is not None and not metrics.exists():
                    raise SystemExit(f"no first step (trainer exit {trainer.poll()}); see {trainer_log}")
                text = trainer_log.read_text(errors="replace")
                if "listening" not in marks and "stream: listening" in text:
                    marks["listening"] = now - start
                if "first_batch" not in marks and "stream: first batch" in text:
                    marks["first_batch"] = now - start
                if metrics.exists() and '"loss"' in metrics.read_text():
                    marks["first_step"] = now - start
                time.sleep(0.01)
            trainer.wait(timeout=120)
        finally:
            support.stop(trainer)
            support.stop(producer)
    text = producer_log.read_text(errors="replace")
    first, done = _EARLY_FIRST.search(text), _EARLY_DONE.search(text)
    marks["early_first_batch_s"] = float(first.group(1)) if first else None  # after the producer's own start-up
    marks["early_instances"] = int(done.group(1)) if done else None  # None: the index was not finished yet
    marks["index_building"] = "tokenizing" in text or "tokenized" in text
    return marks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--model", default="tiny", help="tiny (P3's model), minilm, or a model directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout_s", type=float, default=300)
    args = parser.parse_args(argv)

    support.ensure_corpus(args.corpus, 40)
    if args.model == "tiny":
        model = support.tiny_minilm_model(Path(tempfile.gettempdir()) / "bertstream-bench-tiny")
    elif args.model == "minilm":
        model = support.minilm_dir()
    else:
        model = Path(args.model)
    runs = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="bench_p4-") as tmp:
        warm_cache = Path(tmp) / "warm_cache"
        support.build_index(args.corpus, model, str(warm_cache))
        for repeat in range(args.repeats):
            for kind in ("cold", "warm"):
                cache = warm_cache if kind == "warm" else Path(tmp) / f"cold_cache_{repeat}"
                work = Path(tmp) / f"{kind}{repeat}"
                work.mkdir()
                runs[kind].append(one_start(args, model, cache, work))
                if kind == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                r = runs[kind][-1]
                support.log(f"P4 repeat {repeat + 1}/{args.repeats} {kind}: first step {r['first_step']:.2f} s "
                            f"(trainer listening {r.get('listening', float('nan')):.2f} s, first batch "
                            f"{r.get('first_batch', float('nan')):.2f} s; index built here: {r['index_building']}, "
                            f"early stream's first batch: {r['early_first_batch_s']})")
    medians = {kind: {key: support.median([r[key] for r in rs if r.get(key) is not None])
                      for key in ("listening", "first_batch", "first_step")} for kind, rs in runs.items()}
    rows = [(kind, f"{m['listening']:.2f}", f"{m['first_batch']:.2f}", f"{m['first_step']:.2f}", target)
            for (kind, m), target in zip(medians.items(), ("<= 10 s", "<= 4 s"))]
    print(f"P4: start to first optimizer step, {args.corpus}, model {args.model}, CPU, median of {args.repeats}")
    cold, warm = medians["cold"]["first_step"], medians["warm"]["first_step"]
    result = {"target": "cold <= 10 s, warm <= 4 s", "metric": "seconds from launch to the first optimizer step",
              "ours": {"cold": round(cold, 2), "warm": round(warm, 2)}, "baseline": None,
              "met": cold <= 10 and warm <= 4, "medians": medians, "runs": runs, "model": args.model,
              "corpus": args.corpus}
    support.report("P4", rows, ("cache", "trainer listening s", "first batch s", "first step s", "target"), result)
    return result


if __name__ == "__main__":
    main()
