"""P3: the share of the trainer's step time spent waiting for data when streamed, and its sequences per second
against the same trainer fed from memory; tiny model, on the CPU.

- streamed: a real `python -m producer --connect` and a real `python -m trainer --bind` (separate processes,
  a real socket, the producer's default worker count), the index warm.
- from memory: the same `trainer.loop.run_training` in a fresh process, with its source replaced by a
  `trainer.source.MemorySource` of batches generated beforehand from the same corpus by the same code.

Both train the same tiny BertForPreTraining (2 layers, hidden 128, the MiniLM vocabulary, so the producer's
real vocabulary matches) for `--steps` optimizer steps of 32 at max_seq_len 128; the figures are the trainer's
own metrics.jsonl (`seq_per_s`, `data_wait_frac`) per logging interval, the first interval (warm-up) left out,
median over the intervals, then over `--repeats` alternating runs. On a small machine the producer shares
the cores with the trainer; that cost is part of what is measured.

    .venv/bin/python benchmarks/bench_p3_data_wait.py        # ~5 min (2 cores)

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402


def trainer_flags(model: Path, out: Path, args) -> list[str]:
    return ["--bert_model", str(model), "--do_lower_case", "--output_dir", str(out), "--no_cuda",
            "--train_batch_size", "32", "--max_steps", str(args.steps), "--logging_steps", str(args.logging_steps),
            "--save_steps", "0", "--no_resume", "--data_timeout", "300"]


def intervals(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "seq_per_s" in r][1:]  # the first interval holds the warm-up


def streamed(args, model: Path, work: Path) -> list[dict]:
    endpoint = support.free_endpoint()
    out = work / "stream"
    producer_log, trainer_log = work / "producer.log", work / "trainer.log"
    with open(producer_log, "w") as plog, open(trainer_log, "w") as tlog:
        producer = subprocess.Popen(support.producer_command(args.corpus, model, args.cache_dir, endpoint),
                                    cwd=support.REPO, env=support.ENV, stdout=plog, stderr=subprocess.STDOUT)
        trainer = subprocess.Popen([sys.executable, "-m", "trainer", "--bind", endpoint,
                                    *trainer_flags(model, out, args)],
                                   cwd=support.REPO, env=support.ENV, stdout=tlog, stderr=subprocess.STDOUT)
        try:
            code = trainer.wait(timeout=args.timeout_s)
        finally:
            support.stop(trainer)
            support.stop(producer)
    if code != 0:
        raise SystemExit(f"streamed trainer exited {code}; see {trainer_log}")
    return intervals(out)


def from_memory(args, model: Path, work: Path) -> list[dict]:
    out = work / "memory"
    command = [sys.executable, __file__, "--_memory_trainer", "--corpus", args.corpus, "--cache_dir",
               args.cache_dir, "--steps", str(args.steps), "--logging_steps", str(args.logging_steps),
               "--model", str(model), "--out", str(out)]
    with open(work / "memory.log", "w") as log:
        code = subprocess.run(command, cwd=support.REPO, env=support.ENV, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.timeout_s).returncode
    if code != 0:
        raise SystemExit(f"memory-fed trainer exited {code}; see {work / 'memory.log'}")
    return intervals(out)


def memory_trainer(args) -> None:
    """Child mode: run_training exactly as the CLI runs it, its source swapped for batches held in memory."""
    import trainer.loop
    from common.config import GenerationConfig
    from common.progress import setup_logging
    from producer.worker import iter_worker_batches
    from trainer.cli import parse_args
    from trainer.source import MemorySource

    setup_logging()
    vocab, index = support.build_index(args.corpus, Path(args.model), args.cache_dir)
    generation = GenerationConfig()
    needed, batches = args.steps * 32, []
    for _, batch in iter_worker_batches(index, generation, vocab, 42, 0, 1, 32):
        batches.append(batch)
        if len(batches) * 32 >= needed:
            break
    config = parse_args(trainer_flags(Path(args.model), Path(args.out), args))
    trainer.loop.open_source = lambda *a, **k: MemorySource(batches, config.train.micro_batch_size)
    trainer.loop.run_training(config, __import__("threading").Event())


def median_of(records: list[dict], key: str) -> float:
    return support.median([r[key] for r in records])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--model", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-tiny"),
                        help="where the tiny model is (made there if missing)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--logging_steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout_s", type=float, default=900)
    parser.add_argument("--_memory_trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_trainer:
        memory_trainer(args)
        return {}

    support.ensure_corpus(args.corpus, 40)
    model = support.tiny_minilm_model(Path(args.model))
    support.build_index(args.corpus, model, args.cache_dir)  # warm
    runs = {"stream": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="bench_p3-") as tmp:
        for repeat in range(args.repeats):
            for kind, run in (("stream", streamed), ("memory", from_memory)):
                work = Path(tmp) / f"{kind}{repeat}"
                work.mkdir()
                records = run(args, model, work)
                runs[kind].append({"seq_per_s": median_of(records, "seq_per_s"),
                                   "data_wait_frac": median_of(records, "data_wait_frac"),
                                   "intervals": len(records)})
                support.log(f"P3 repeat {repeat + 1}/{args.repeats} {kind}: {runs[kind][-1]['seq_per_s']:.1f} "
                            f"seq/s, data wait {runs[kind][-1]['data_wait_frac']:.2%}")
    stream_sps = support.median([r["seq_per_s"] for r in runs["stream"]])
    memory_sps = support.median([r["seq_per_s"] for r in runs["memory"]])
    wait = support.median([r["data_wait_frac"] for r in runs["stream"]])
    memory_wait = support.median([r["data_wait_frac"] for r in runs["memory"]])
    ratio = stream_sps / memory_sps
    rows = [("from memory", f"{memory_sps:.1f}", f"{memory_wait:.2%}"),
            ("streamed (producer -> socket -> trainer)", f"{stream_sps:.1f}", f"{wait:.2%}"),
            ("streamed / from memory", f"{ratio:.3f}", "")]
    print(f"P3: tiny BERT (2 x 128, MiniLM vocabulary) on the CPU, batch 32, max_seq_len 128, {args.steps} steps, "
          f"median of {args.repeats} runs")
    result = {"target": "data wait < 2% and seq/s within 3% of memory-fed",
              "metric": "trainer seq/s and data_wait_frac (metrics.jsonl)", "baseline": round(memory_sps, 2),
              "ours": round(stream_sps, 2), "ratio": round(ratio, 4), "data_wait_frac": round(wait, 5),
              "met": wait < 0.02 and ratio >= 0.97, "runs": runs, "steps": args.steps, "corpus": args.corpus}
    support.report("P3", rows, ("trainer fed", "seq/s", "data wait"), result)
    return result


if __name__ == "__main__":
    main()
