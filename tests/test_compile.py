"""--compile: the training step through torch.compile trains as the eager one, with one graph per width.

Backends. inductor (the product's) builds C++ kernels with gcc: on this 2-core machine a width of the tiny BERT
(forward and backward) takes it 20-50 s to build the first time (seconds once its on-disk cache holds them), so
the tests that need several widths or several runs compile with "aot_eager" instead: the same dynamo capture
(the same graphs, guards and recompilations) and the same AOTAutograd forward/backward split, with the graphs
run by eager kernels instead of generated ones. What graphs are made, and how many, is decided before the
backend is called, so the graph counts hold for inductor too. inductor itself runs end to end in one test,
the CLI's, on a single width. The file takes about 60 s here with inductor's cache warm, 90 s cold.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from common.lengths import compile_widths
from conftest import write_corpus
from trainer import EXIT_OK
from trainer.cli import main
from trainer_support import (captured_log, read_metrics, real_batches, state_dict_of, train_records, trainer_flags,
                             write_seed_epochs)

CHEAP = "aot_eager"  # see the module's docstring
MICRO = 8
CPU = torch.device("cpu")
WIDTHS = compile_widths(64)  # (32, 40, 48, 56, 64): the --compile ladder of a seq-64 stream
USED = (64, 32, 48)  # the widths of the micro-batches the runs below train on, in turn


@pytest.fixture(scope="module")
def still_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: eager and compiled runs draw dropout masks differently (inductor has its
    own random kernels), so only a model without dropout can match step for step."""
    model = tmp_path_factory.mktemp("compile") / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def mixed_widths(still_model, tmp_path_factory) -> list:
    """Micro-batches of real instances, cycling through the widths of USED (each made at its max_seq_len, so
    every row fits)."""
    tmp = tmp_path_factory.mktemp("compile_data")
    corpus = write_corpus(tmp / "corpus.txt")
    per_width = {w: real_batches(still_model, corpus, tmp / "cache", batch_size=MICRO, count=4, max_seq_len=w,
                                 seed=w) for w in USED}
    return [per_width[w][i] for i in range(4) for w in USED]


def fresh_dynamo() -> None:
    """Forget earlier compilations of this process, and zero the counters read below."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compiled_graphs() -> int:
    """Graphs dynamo captured (and handed to the backend) since `fresh_dynamo`."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_loop(model_dir: Path, batches: list, runtime, out: Path, steps: int, accumulation: int = 2):
    """train_loop itself on `batches` in order (micro-batches of MICRO): the metrics records, the final weights
    and the log lines."""
    from trainer.config import TrainConfig
    from trainer.loop import TrainContext, build_optimizer, make_scaler, train_loop
    from trainer.metrics import MetricsLog
    from trainer.model import load_model
    from trainer.source import MemorySource

    torch.manual_seed(0)
    model = load_model(model_dir)
    train = TrainConfig(output_dir=str(out), train_batch_size=MICRO * accumulation,
                        gradient_accumulation_steps=accumulation, logging_steps=1, learning_rate=1e-3,
                        warmup_proportion=0.0)
    optimizer, scheduler = build_optimizer(model, train, steps, runtime.device, fused=False)
    out.mkdir()
    metrics = MetricsLog(out, True, None)
    try:
        with captured_log() as lines:
            train_loop(TrainContext(model, MemorySource(batches, MICRO), optimizer, scheduler, make_scaler(runtime),
                                    runtime, train, steps, metrics, lambda step, state: None, threading.Event(),
                                    widths=WIDTHS))
    finally:
        metrics.close()
    return read_metrics(out), model.state_dict(), lines


def cpu_runtime(precision: str = "fp32", backend: str | None = None):
    from trainer.loop import Runtime

    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    return Runtime(torch.device("cpu"), precision, dtype, None, compile_backend=backend)


def test_one_graph_per_width_and_the_eager_run_s_losses_and_weights(still_model, mixed_widths, tmp_path):
    """12 micro-batches of 3 widths (each width 4 times, 2 micro-batches a step), compiled: 3 graphs, not 12,
    and what an eager run on the same batches computes.

    Every micro-batch carries a different count of real tokens (`TensorBatch.tokens`, a Python int): a guard on
    it would recompile at every batch, and the count below would show it. The tolerance: aot_eager runs the
    graphs with the eager kernels, and on torch 2.13 the two runs agree to the bit; 1e-6 (relative on the
    losses, absolute on weights of order 0.1) leaves room for a float32 sum that another torch's
    decompositions order differently (rounding of 1e-7 a step, carried by six AdamW steps) while staying far
    below what a wrong gradient does: an AdamW step moves a weight by up to the learning rate, 1e-3.
    """
    steps = 6
    eager, eager_weights, eager_lines = run_loop(still_model, mixed_widths, cpu_runtime(), tmp_path / "eager", steps)
    fresh_dynamo()
    compiled, compiled_weights, lines = run_loop(still_model, mixed_widths, cpu_runtime(backend=CHEAP),
                                                 tmp_path / "compiled", steps)

    assert compiled_graphs() == len(USED)
    announced = [line for line in lines if line.startswith("--compile: compiling the training step for width")]
    assert [int(line.split()[7]) for line in announced] == list(USED)
    assert any(line.startswith("--compile: the training step (forward, loss, backward) compiles with aot_eager")
               and line.endswith("5 width(s) at most: 32 40 48 56 64") for line in lines), lines
    assert not any(line.startswith("--compile") for line in eager_lines)

    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, steps + 1))
    for key in ("loss", "mlm_loss", "nsp_loss", "grad_norm"):
        assert [r[key] for r in compiled] == pytest.approx([r[key] for r in eager], rel=1e-6), key
    for name, weights in eager_weights.items():
        assert torch.allclose(compiled_weights[name], weights, rtol=0, atol=1e-6), name
    before = state_dict_of(still_model)
    assert not torch.equal(before["bert.pooler.dense.weight"], eager_weights["bert.pooler.dense.weight"])


def test_more_widths_than_dynamo_s_default_limit_all_compile_and_one_too_many_stops(still_model, tmp_path):
    """dynamo keeps 8 graphs per function by default and then runs it eagerly with no more than a warning, and a
    seq-512 ladder has 14 widths. Promised 5 widths, the step compiles up to 5 + RECOMPILE_MARGIN = 9 (more
    than 8), and a 10th width, which no source of those 5 widths sends, stops with torch's error instead of
    training on eagerly."""
    import torch._dynamo
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from trainer.compiled import RECOMPILE_MARGIN
    from trainer.distributed import Ranks
    from trainer.model import load_model
    from trainer.source import to_tensors

    promised = (24, 32, 40, 48, 56)
    sent = tuple(range(24, 104, 8))  # 10 widths
    assert len(promised) + RECOMPILE_MARGIN == len(sent) - 1 > torch._dynamo.config.recompile_limit
    corpus = write_corpus(tmp_path / "corpus.txt")
    batches = [to_tensors(real_batches(still_model, corpus, tmp_path / "cache", batch_size=2, count=1,
                                       max_seq_len=w)[0], False).to(CPU) for w in sent]
    fresh_dynamo()
    step = Ranks.single().wrap(load_model(still_model), CHEAP, promised)
    assert step.recompile_limit == len(sent) - 1
    for batch in batches[:-1] + batches[:3]:
        step(batch).loss.backward()
    assert compiled_graphs() == len(sent) - 1
    with pytest.raises(FailOnRecompileLimitHit):
        step(batches[-1])


def test_bf16_autocast_around_the_compiled_step(still_model, mixed_widths, tmp_path):
    """torch.autocast entered around the compiled call is traced into its graphs: under bf16 autocast the
    compiled step computes what the eager one does, and not what it computes in float32.

    For this tiny model the bf16 losses differ from the float32 ones by only 2e-6 to 5e-6 (relative); aot_eager
    reproduces eager to the bit on torch 2.13. A tolerance of 2e-7, float32's rounding of the loss, separates
    the two by a factor of 10: a graph that had dropped the autocast would fail it.
    """
    steps = 3
    eager, _, _ = run_loop(still_model, mixed_widths, cpu_runtime("bf16"), tmp_path / "eager", steps)
    fp32, _, _ = run_loop(still_model, mixed_widths, cpu_runtime("fp32"), tmp_path / "fp32", steps)
    fresh_dynamo()
    compiled, _, _ = run_loop(still_model, mixed_widths, cpu_runtime("bf16", CHEAP), tmp_path / "compiled", steps)
    assert compiled_graphs() == len(USED)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=2e-7)
    assert all(abs(c["loss"] - f["loss"]) > 2e-7 * f["loss"] for c, f in zip(compiled, fp32))


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: enough for a real DDP module, its reducer and its comm hooks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_s_no_sync_is_reached_through_the_compiled_step(still_model, mixed_widths, process_group):
    """Compiled, the DDP module still skips its all-reduce on accumulating micro-batches (Ranks.accumulating
    finds no_sync behind the compiled step) and runs it on the step's last; the gradients are the eager ones.

    A comm hook counts the buckets DDP reduces (with one process the reduction changes nothing, but it runs;
    the tiny model fits one bucket, and DDPOptimizer refuses buckets under 1 MiB).
    """
    from torch.nn.parallel import DistributedDataParallel

    from trainer.compiled import CompiledStep, compile_in_place
    from trainer.distributed import PretrainingLoss, Ranks
    from trainer.model import load_model
    from trainer.source import to_tensors

    reduced = []

    def counting_hook(state, bucket):
        reduced.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    def gradients(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = load_model(still_model)
        loss = PretrainingLoss(model)
        limit = compile_in_place(loss, WIDTHS, CHEAP) if compiled else None  # as Ranks.wrap does, before DDP
        ddp = DistributedDataParallel(loss)
        ddp.register_comm_hook(None, counting_hook)
        forward = CompiledStep(ddp, WIDTHS, limit, CHEAP, announce=False) if compiled else ddp
        for i, batch in enumerate(mixed_widths[:2]):
            before = len(reduced)
            with Ranks.accumulating(forward, i == 0):
                out = forward(to_tensors(batch, False).to(CPU))
            (out.loss / 2).backward()
            assert (len(reduced) > before) == (i == 1), f"micro-batch {i}: {len(reduced) - before} buckets reduced"
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = gradients(compiled=False)
    fresh_dynamo()
    compiled = gradients(compiled=True)
    assert compiled_graphs() == 2  # two widths, one bucket: DDPOptimizer splits no graph
    assert eager.keys() == compiled.keys()
    for name, grad in eager.items():
        assert torch.allclose(compiled[name], grad, rtol=1e-4, atol=1e-6), name


def test_the_cli_trains_with_compile_on_the_cpu(still_model, tmp_path):
    """`bertstream-trainer --compile --no_cuda`, end to end on seed-format files, with inductor (the real backend):
    the same losses and weights as the eager command on the same files. The held-out evaluation (before the
    first step, at step 2 and at the end) stays eager: no graph of its own.

    max_seq_len 32 is the ladder's smallest width, so every micro-batch is 32 wide whatever the source trims:
    one graph (its forward and backward take inductor about 20 s to build here the first time, a few seconds
    from its on-disk cache). inductor's fused, vectorised kernels order float32 sums unlike eager's: measured,
    the losses differ by 8e-8 (relative) and the weights by 7e-7 after four steps. 1e-5 on both leaves an order
    of magnitude of room and is still a hundredth of the learning rate (1e-3), what one AdamW step on a wrong
    gradient moves a weight by.
    """
    corpus = write_corpus(tmp_path / "corpus.txt")
    write_seed_epochs(tmp_path / "data", still_model, corpus, epochs=1, max_seq_len=32)
    flags = ("--pregenerated_data", str(tmp_path / "data"), "--max_steps", "4", "--save_steps", "0", "--no_cuda",
             "--eval_corpus", str(corpus), "--eval_steps", "2", "--eval_instances", "16")
    assert main(trainer_flags(still_model, tmp_path / "eager", *flags)) == EXIT_OK
    fresh_dynamo()
    with captured_log() as lines:
        assert main(trainer_flags(still_model, tmp_path / "compiled", *flags, "--compile")) == EXIT_OK
    assert compiled_graphs() == 1
    assert any(line.startswith("--compile: the training step (forward, loss, backward) compiles with inductor")
               and line.endswith("1 width(s) at most: 32") for line in lines), lines

    eager, compiled = train_records(tmp_path / "eager"), train_records(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3, 4]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    evaluated = [(r["step"], r["eval_loss"]) for r in read_metrics(tmp_path / "compiled") if "eval_loss" in r]
    assert [step for step, _ in evaluated] == [0, 2, 4]
    assert [loss for _, loss in evaluated] == pytest.approx(
        [r["eval_loss"] for r in read_metrics(tmp_path / "eager") if "eval_loss" in r], rel=1e-5)
    alone, compiled_weights = state_dict_of(tmp_path / "eager"), state_dict_of(tmp_path / "compiled")
    for name, weights in alone.items():
        assert np.allclose(compiled_weights[name], weights, rtol=0, atol=1e-5), name
    assert not np.allclose(alone["bert.pooler.dense.weight"], state_dict_of(still_model)["bert.pooler.dense.weight"])
