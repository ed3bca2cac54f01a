"""P3: the share of the trainer's step time spent waiting for data when streamed, and its sequences per second
against the same trainer fed from memory; tiny model, on the CPU.

- streamed: a real `python -m producer --connect` and a real `python -m trainer --bind` (separate processes,
  a real socket, the producer's default worker count), the index warm.
- from memory: the same `trainer.loop.run_training` in a fresh process, with its source replaced by a
  `trainer.source.MemorySource` of batches generated beforehand from the same corpus by the same code, each
  padded to its longest row as the stream's micro-batches are (where the code has length-aware batches).

Both train the same tiny BertForPreTraining (2 layers, hidden 128, the MiniLM vocabulary, so the producer's
real vocabulary matches) on one torch thread for `--steps` optimizer steps of 32 at max_seq_len 128; the figures are the trainer's
own metrics.jsonl (`seq_per_s`, `data_wait_frac`) per logging interval, the first interval (warm-up) left out,
median over the intervals, then over `--repeats` alternating runs; and sequences per CPU-second over the
same steps, counting the trainer's process and, when streamed, every producer process too (their CPU is
streaming's cost on a machine they share). On a shared machine the wall-clock seq/s of runs minutes apart
varies with other jobs by far more than 3%, so the per-CPU-second ratio is the headline.

    .venv/bin/python benchmarks/bench_p3_data_wait.py        # ~5 min (2 cores)

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
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


# One torch thread: a trainer whose OpenMP threads wait for each other spins through every turn another job
# takes on the machine, which would count as CPU time; alone on a thread it does not, so CPU-seconds
# measure the work. The other core is the producer's, as it would be on any machine with cores to spare.
TRAINER_ENV = {**support.ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def follow(trainer: subprocess.Popen, counted: list[subprocess.Popen], out: Path, args) -> dict:
    """Wait for the trainer to finish; meanwhile take the CPU time of the `counted` processes (and all their
    children) between the first logging record (the end of the warm-up interval) and the last one."""
    metrics, marks = out / "metrics.jsonl", []
    deadline = time.monotonic() + args.timeout_s
    while trainer.poll() is None and time.monotonic() < deadline:
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if (not marks and steps) or (len(marks) == 1 and args.steps in steps):
            marks.append(sum(support.cpu_seconds(p) for c in counted for p in support.process_tree(c.pid)))
            if len(marks) == 2:
                break
        time.sleep(0.05)
    code = trainer.wait(timeout=max(1.0, deadline - time.monotonic()))
    if code != 0 or len(marks) < 2:
        raise SystemExit(f"trainer exited {code}; see the logs in {out.parent}")
    measured = intervals(out)
    return {"intervals": measured, "cpu_s": marks[1] - marks[0],
            "instances": 32 * (args.steps - json.loads(metrics.read_text().splitlines()[0])["step"])}


def streamed(args, model: Path, work: Path) -> dict:
    endpoint = support.free_endpoint()
    out = work / "stream"
    producer_log, trainer_log = work / "producer.log", work / "trainer.log"
    with open(producer_log, "w") as plog, open(trainer_log, "w") as tlog:
        producer = subprocess.Popen(support.producer_command(args.corpus, model, args.cache_dir, endpoint),
                                    cwd=support.REPO, env=support.ENV, stdout=plog, stderr=subprocess.STDOUT)
        trainer = subprocess.Popen([sys.executable, "-m", "trainer", "--bind", endpoint,
                                    *trainer_flags(model, out, args)],
                                   cwd=support.REPO, env=TRAINER_ENV, stdout=tlog, stderr=subprocess.STDOUT)
        try:
            return follow(trainer, [trainer, producer], out, args)  # the producer's CPU counts as streaming's cost
        finally:
            support.stop(trainer)
            support.stop(producer)


def from_memory(args, model: Path, work: Path) -> dict:
    out = work / "memory"
    command = [sys.executable, __file__, "--_memory_trainer", "--corpus", args.corpus, "--cache_dir",
               args.cache_dir, "--steps", str(args.steps), "--logging_steps", str(args.logging_steps),
               "--model", str(model), "--out", str(out)]
    with open(work / "memory.log", "w") as log:
        trainer = subprocess.Popen(command, cwd=support.REPO, env=TRAINER_ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            return follow(trainer, [trainer], out, args)
        finally:
            support.stop(trainer)


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
    try:  # padded to their longest row, as the stream's micro-batches are (older checkouts: as generated)
        from common.lengths import stream_widths, trim
    except ImportError:
        stream_widths = trim = None
    for _, batch in iter_worker_batches(index, generation, vocab, 42, 0, 1, 32):
        batches.append(batch if trim is None else trim(batch, stream_widths(generation.max_seq_len)))
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
                run_result = run(args, model, work)
                records = run_result["intervals"]
                runs[kind].append({"seq_per_s": median_of(records, "seq_per_s"),
                                   "data_wait_frac": median_of(records, "data_wait_frac"),
                                   "seq_per_cpu_s": run_result["instances"] / run_result["cpu_s"],
                                   "intervals": len(records)})
                r = runs[kind][-1]
                support.log(f"P3 repeat {repeat + 1}/{args.repeats} {kind}: {r['seq_per_s']:.1f} seq/s, "
                            f"{r['seq_per_cpu_s']:.1f} per CPU-s, data wait {r['data_wait_frac']:.2%}")
    m = {kind: {key: support.median([r[key] for r in rs]) for key in ("seq_per_s", "seq_per_cpu_s", "data_wait_frac")}
         for kind, rs in runs.items()}
    ratio_wall = m["stream"]["seq_per_s"] / m["memory"]["seq_per_s"]
    ratio = m["stream"]["seq_per_cpu_s"] / m["memory"]["seq_per_cpu_s"]
    wait = m["stream"]["data_wait_frac"]
    rows = [("from memory", f"{m['memory']['seq_per_s']:.1f}", f"{m['memory']['seq_per_cpu_s']:.1f}",
             f"{m['memory']['data_wait_frac']:.2%}"),
            ("streamed (producer -> socket -> trainer)", f"{m['stream']['seq_per_s']:.1f}",
             f"{m['stream']['seq_per_cpu_s']:.1f}", f"{wait:.2%}"),
            ("streamed / from memory", f"{ratio_wall:.3f}", f"{ratio:.3f}", "")]
    print(f"P3: tiny BERT (2 x 128, MiniLM vocabulary) on the CPU (1 torch thread), batch 32, max_seq_len 128, "
          f"{args.steps} steps, "
          f"median of {args.repeats} runs; per CPU-s counts the trainer's and, streamed, the producer's processes")
    # Per CPU-second is the headline: with other jobs on the machine, wall-clock seq/s of runs minutes apart
    # differ by far more than 3%; the CPU the trainer and the producer spend per sequence is theirs alone.
    result = {"target": "data wait < 2% and seq/s within 3% of memory-fed",
              "metric": "data_wait_frac (metrics.jsonl); sequences per CPU-second of trainer (+ producer)",
              "baseline": round(m["memory"]["seq_per_cpu_s"], 2), "ours": round(m["stream"]["seq_per_cpu_s"], 2),
              "ratio": round(ratio, 4), "ratio_wall_clock": round(ratio_wall, 4), "data_wait_frac": round(wait, 5),
              "met": wait < 0.02 and ratio >= 0.97, "medians": m, "runs": runs, "steps": args.steps,
              "corpus": args.corpus}
    support.report("P3", rows, ("trainer fed", "seq/s", "seq per CPU-s", "data wait"), result)
    return result


if __name__ == "__main__":
    main()
