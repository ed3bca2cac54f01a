"""Length-aware batches against batches padded to max_seq_len: padding, speed and learning, side by side.

For each corpus (long documents: the KJV, one chapter a document; short documents: the same text three sentences
a document, like notes, tickets or abstracts), each max_seq_len (128, 512) and each path, one real run of a
producer (`--seed 42`, 1 worker) streaming into `bertstream-trainer` (all-MiniLM-L6-v2 on the CPU, micro-batch
16, lr 1e-4, the same seeds), reading its metrics.jsonl:

- padded (before): `--no_group_by_length --pad_to_multiple_of MAX_SEQ_LEN`, every batch as wide as max_seq_len,
  what the trainer did before length-aware batches;
- length-aware: the defaults (rows of similar length per micro-batch, each padded to its longest row rounded up
  to 8);
- length-aware + `--compile` (with `--compile`; the first interval, which compiles, is left out of the speed).

Figures: pad_frac (share of the positions computed on that were padding), sequences/s and real tokens/s after
the first logging interval (warm-up, and compilation with --compile), and the held-out MLM loss before training
and after the last step on the same held-out instances (every 11th chapter), so a faster path is seen to learn
the same.

    .venv/bin/python benchmarks/bench_lengths.py                       # every configuration (~40 min, 2 cores)
    .venv/bin/python benchmarks/bench_lengths.py --corpora short --seqs 512 --paths padded aware
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as kjv  # noqa: E402
import support  # noqa: E402  (puts the repository on sys.path)

HELD_OUT_EVERY = 11  # chapters 5, 16, 27, ... (and their short documents) are the evaluation corpus
SHORT_SENTENCES = 3  # sentences per document of the short-document corpus
PATHS = {
    "padded": ("padded (before)", lambda seq: ["--no_group_by_length", "--pad_to_multiple_of", str(seq)]),
    "aware": ("length-aware", lambda seq: []),
    "compile": ("length-aware --compile", lambda seq: ["--compile"]),
}


def write_corpora(work: Path) -> dict[str, tuple[Path, Path]]:
    """{name: (train, held_out)} for the long- and short-document corpora (written once, then reused)."""
    out = {name: (work / f"{name}_train.txt", work / f"{name}_heldout.txt") for name in ("long", "short")}
    if all(path.exists() for pair in out.values() for path in pair):
        return out
    chapters = kjv.source_documents(by="chapter")
    split = {"train": [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY != 5],
             "heldout": [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY == 5]}
    for part, documents in split.items():
        short = [doc[i : i + SHORT_SENTENCES] for doc in documents for i in range(0, len(doc), SHORT_SENTENCES)]
        for name, docs in (("long", documents), ("short", short)):
            path = out[name][0 if part == "train" else 1]
            path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n", encoding="utf-8")
    return out


def one_run(args, work: Path, name: str, train: Path, held_out: Path, seq: int, path: str) -> dict:
    out, endpoint = work / f"{name}_{seq}_{path}", support.free_endpoint()
    producer = [sys.executable, "-m", "producer", "--train_corpus", str(train), "--bert_model", str(args.model),
                "--do_lower_case", "--cache_dir", args.cache_dir, "--seed", "42", "--max_seq_len", str(seq),
                "--num_workers", "1", "--connect", endpoint]
    logging_steps = max(1, args.steps // 4)
    trainer = [sys.executable, "-m", "trainer", "--bind", endpoint, "--bert_model", str(args.model),
               "--do_lower_case", "--output_dir", str(out), "--no_cuda", "--train_batch_size", str(args.batch),
               "--learning_rate", "1e-4", "--max_steps", str(args.steps), "--logging_steps", str(logging_steps),
               "--save_steps", "0", "--no_resume", "--seed", "42", "--eval_corpus", str(held_out), "--eval_steps",
               "0", "--eval_instances", str(args.eval_instances), "--cache_dir", args.cache_dir, "--data_timeout",
               "600", *PATHS[path][1](seq)]
    support.log(f"{name} documents, max_seq_len {seq}, {PATHS[path][0]}: {out}")
    with open(out.with_suffix(".producer.log"), "w") as plog, open(out.with_suffix(".trainer.log"), "w") as tlog:
        process = subprocess.Popen(producer, cwd=support.REPO, env=support.ENV, stdout=plog, stderr=subprocess.STDOUT)
        try:
            code = subprocess.run(trainer, cwd=support.REPO, env=support.ENV, stdout=tlog, stderr=subprocess.STDOUT,
                                  timeout=args.timeout_s).returncode
        finally:
            process.send_signal(signal.SIGTERM)
            support.stop(process)
    if code != 0:
        raise SystemExit(f"the trainer exited {code}; see {out.with_suffix('.trainer.log')}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    later = steps[1:] or steps  # after the first interval: warm-up, and with --compile the compilation
    evaluations = [r for r in records if "eval_mlm_loss" in r]
    return {"corpus": name, "max_seq_len": seq, "path": path, "steps": steps[-1]["step"],
            "pad_frac": sum(r["pad_frac"] for r in steps) / len(steps),
            "seq_per_s": sum(r["seq_per_s"] for r in later) / len(later),
            "tokens_per_s": sum(r["tokens_per_s"] for r in later) / len(later),
            "first_interval_seq_per_s": steps[0]["seq_per_s"],
            "eval_mlm_loss_start": evaluations[0]["eval_mlm_loss"], "eval_mlm_loss": evaluations[-1]["eval_mlm_loss"],
            "eval_mlm_accuracy": evaluations[-1]["eval_mlm_accuracy"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-lengths"))
    parser.add_argument("--model", default=None, help="model directory (default: the all-MiniLM-L6-v2 package)")
    parser.add_argument("--corpora", nargs="+", default=["long", "short"], choices=["long", "short"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval_instances", type=int, default=256)
    parser.add_argument("--timeout_s", type=float, default=3600)
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.model = Path(args.model) if args.model else support.minilm_dir()
    args.cache_dir = str(work / "cache")
    corpora = write_corpora(work)
    results = [one_run(args, work, name, *corpora[name], seq, path)
               for name in args.corpora for seq in args.seqs for path in args.paths]
    rows = [(r["corpus"], r["max_seq_len"], PATHS[r["path"]][0], f"{r['pad_frac']:.3f}", f"{r['seq_per_s']:.2f}",
             f"{r['tokens_per_s']:.0f}", f"{r['first_interval_seq_per_s']:.2f}",
             f"{r['eval_mlm_loss_start']:.3f} -> {r['eval_mlm_loss']:.3f}") for r in results]
    print(f"all-MiniLM-L6-v2 on the CPU, {args.steps} steps of {args.batch}, held-out MLM loss on "
          f"{args.eval_instances} instances")
    support.report("lengths", rows, ("corpus", "max_seq_len", "path", "pad_frac", "seq/s", "tokens/s",
                                     "first interval seq/s", "held-out MLM loss"),
                   {"steps": args.steps, "batch": args.batch, "runs": results})


if __name__ == "__main__":
    main()
