"""P4: seconds from starting the producer and the trainer to the trainer's first optimizer step, on the 40 MB
corpus, with a cold cache (no index: it is built while streaming starts) and a warm one (the index cached).

Each run starts `python -m producer --connect` and `python -m trainer --bind --max_steps 1 --logging_steps 1`
at the same moment (the producer's default worker count and batch size; the trainer on the CPU with the tiny
model of P3 unless `--model minilm`), and times, by polling their files every 10 ms: the trainer listening,
its first batch, and its first optimizer step (the first metrics.jsonl record). A cold run uses an empty
`--cache_dir`; the corpus file itself stays in the page cache (dropping it needs root and would disturb the
machine's other users). `--repeats` runs of each, alternating; medians.

The baseline is the seed's way, timed the same way (`--baseline_repeats`, default 1, as it takes a minute):
`pregenerate_training_data.py`'s algorithm in plain Python (tests/seed_reference.py, one process: tokenize
every line with the same tokenizer, generate epoch 0 with whole-word masking, write `epoch_0.json`), then
the same trainer on `--pregenerated_data`; launch to its first optimizer step.

How the cold start is met: the tokenizing processes run niced below the trainer's start-up, and while they
build the index the producer streams epoch 0 from the documents already tokenized (producer/early.py); the
log line "early stream: ..." says how much went that way.

    .venv/bin/python benchmarks/bench_p4_startup.py          # ~3 min

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

_EARLY_FIRST = re.compile(r"early stream: first batch after ([\d.]+) s")
_EARLY_DONE = re.compile(r"early stream: (\d+) instances from documents")


# The seed's pregenerate_training_data.py for one epoch: argv = benchmarks/, corpus, model, output folder.
SEED_PREGENERATE = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import support, seed_reference
    from common.vocab import Vocabulary, load_tokenizer
    corpus, model, out = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    tokenizer = load_tokenizer(model, True)
    vocab_list = list(Vocabulary.from_tokenizer(tokenizer, True).tokens)
    docs = seed_reference.read_corpus_file(corpus, lambda line: tokenizer.encode(line, add_special_tokens=False).tokens)
    records = seed_reference.generate_epoch(docs, vocab_list, random.Random(0), whole_word_mask=True)
    seed_reference.write_epoch(records, out, 0, 128)
""")


def trainer_command(model: Path, out: Path, *source: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *source, "--bert_model", str(model), "--do_lower_case",
            "--output_dir", str(out), "--no_cuda", "--max_steps", "1", "--logging_steps", "1",
            "--save_steps", "0", "--no_resume"]


def wait_for_first_step(trainer: subprocess.Popen, metrics: Path, log_file: Path, deadline: float) -> float:
    """Monotonic time of the trainer's first metrics.jsonl record (its first optimizer step)."""
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        if time.monotonic() > deadline or trainer.poll() is not None and not metrics.exists():
            raise SystemExit(f"no first step (trainer exit {trainer.poll()}); see {log_file}")
        time.sleep(0.01)
    return time.monotonic()


def seed_start(args, model: Path, work: Path) -> dict:
    """The seed's way: pregenerate epoch 0 in one process, then train on it; seconds from launch."""
    data, out, trainer_log = work / "pregenerated", work / "trainer_out", work / "trainer.log"
    data.mkdir()
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", SEED_PREGENERATE, str(Path(__file__).resolve().parent), args.corpus,
                    str(model), str(data)], cwd=support.REPO, env=support.ENV, check=True)
    pregenerated = time.monotonic() - start
    with open(trainer_log, "w") as tlog:
        trainer = subprocess.Popen(trainer_command(model, out, "--pregenerated_data", str(data), "--epochs", "1"),
                                   cwd=support.REPO, env=support.ENV, stdout=tlog, stderr=subprocess.STDOUT)
        try:
            first_step = wait_for_first_step(trainer, out / "metrics.jsonl", trainer_log, start + args.timeout_s)
        finally:
            support.stop(trainer)
    return {"pregenerated": pregenerated, "first_step": first_step - start,
            "epoch_bytes": (data / "epoch_0.json").stat().st_size}


def one_start(args, model: Path, cache_dir: Path, work: Path) -> dict:
    endpoint = support.free_endpoint()
    out = work / "trainer_out"
    producer_log, trainer_log = work / "producer.log", work / "trainer.log"
    producer_cmd = support.producer_command(args.corpus, model, str(cache_dir), endpoint)
    trainer_cmd = trainer_command(model, out, "--bind", endpoint, "--data_timeout", "600")
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
    parser.add_argument("--baseline_repeats", type=int, default=1, help="runs of the seed's way (0: none)")
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
        seed_runs = []
        for repeat in range(args.baseline_repeats):
            work = Path(tmp) / f"seed{repeat}"
            work.mkdir()
            seed_runs.append(seed_start(args, model, work))
            support.log(f"P4 the seed's way {repeat + 1}/{args.baseline_repeats}: first step "
                        f"{seed_runs[-1]['first_step']:.2f} s (epoch_0.json written after "
                        f"{seed_runs[-1]['pregenerated']:.2f} s)")
            shutil.rmtree(work)
    medians = {kind: {key: support.median([r[key] for r in rs if r.get(key) is not None])
                      for key in ("listening", "first_batch", "first_step")} for kind, rs in runs.items()}
    rows = [(f"bertstream, {kind} cache", f"{m['listening']:.2f}", f"{m['first_batch']:.2f}", f"{m['first_step']:.2f}",
             target) for (kind, m), target in zip(medians.items(), ("<= 10 s", "<= 4 s"))]
    seed = None
    if seed_runs:
        seed = {key: support.median([r[key] for r in seed_runs]) for key in ("pregenerated", "first_step")}
        rows.append(("the seed's way (pregenerate, then train)", "-", f"{seed['pregenerated']:.2f} (epoch written)",
                     f"{seed['first_step']:.2f}", "-"))
    print(f"P4: start to first optimizer step, {args.corpus}, model {args.model}, CPU, median of {args.repeats} "
          f"(the seed's way: {args.baseline_repeats})")
    cold, warm = medians["cold"]["first_step"], medians["warm"]["first_step"]
    result = {"target": "cold <= 10 s, warm <= 4 s", "metric": "seconds from launch to the first optimizer step",
              "ours": {"cold": round(cold, 2), "warm": round(warm, 2)},
              "baseline": round(seed["first_step"], 2) if seed else None, "seed_runs": seed_runs,
              "ratio": round(seed["first_step"] / cold, 1) if seed else None,  # how many times sooner, cold
              "met": cold <= 10 and warm <= 4, "medians": medians, "runs": runs, "model": args.model,
              "corpus": args.corpus}
    support.report("P4", rows, ("start", "trainer listening s", "first batch s", "first step s", "target"), result)
    return result


if __name__ == "__main__":
    main()
