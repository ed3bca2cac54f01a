"""The training loop's semantics: the seed's schedule, precision flags on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import write_corpus
from trainer import EXIT_OK
from trainer.cli import main
from trainer_support import (captured_log, read_metrics, real_batches, train_records, trainer_flags,
                             write_seed_epochs)


@pytest.fixture(scope="module")
def seed_data(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("loop")
    write_seed_epochs(tmp / "data", tiny_model_dir, write_corpus(tmp / "corpus.txt"), epochs=1)
    return tmp / "data"


def test_linear_warmup_then_linear_decay_to_zero(tiny_model_dir, seed_data, tmp_path):
    flags = trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(seed_data), "--max_steps", "8")
    flags[flags.index("--warmup_proportion") + 1] = "0.25"  # 2 warmup steps
    assert main(flags) == EXIT_OK
    lrs = [r["lr"] for r in train_records(tmp_path / "out")]
    # The lr after step s (what the next step uses): s / 2 while warming up, then (8 - s) / 6, times 1e-3.
    expected = [1e-3 * (s / 2 if s < 2 else (8 - s) / 6) for s in range(1, 9)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("schedule, after_warmup", [
    # The factor on the peak lr after step s of 8, 2 of them warmup (transformers' get_scheduler formulas).
    ("cosine", lambda s: 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))),
    ("constant", lambda s: 1.0),
])
def test_cosine_and_constant_schedules_after_the_warmup(tiny_model_dir, seed_data, tmp_path, schedule, after_warmup):
    """--lr_scheduler_type, here given in a --config file (the command line's --warmup_proportion wins over it)."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"lr_scheduler_type: {schedule}\nwarmup_proportion: 0.5\nmax_steps: 8\n")
    flags = trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(seed_data),
                          "--config", str(config_file))
    flags[flags.index("--warmup_proportion") + 1] = "0.25"  # 2 warmup steps
    assert main(flags) == EXIT_OK
    lrs = [r["lr"] for r in train_records(tmp_path / "out")]
    expected = [1e-3 * (s / 2 if s < 2 else after_warmup(s)) for s in range(1, 9)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == (pytest.approx(1e-3) if schedule == "constant" else pytest.approx(0.0, abs=1e-12))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_each_schedule_resumes_exactly_from_its_saved_state(tiny_model_dir, tmp_path, schedule):
    """get_scheduler's LambdaLR through a checkpoint's round trip (torch.save, weights_only load) continues
    with the learning rates of a run that never stopped."""
    import io

    import torch

    from trainer.config import TrainConfig
    from trainer.loop import build_optimizer
    from trainer.model import load_model

    train = TrainConfig(output_dir=str(tmp_path), learning_rate=1e-3, warmup_proportion=0.2,
                        lr_scheduler_type=schedule)
    model = load_model(tiny_model_dir)

    def lrs(optimizer, scheduler, steps):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(scheduler.get_last_lr()[0])
        return out

    straight = lrs(*build_optimizer(model, train, 20, torch.device("cpu"), fused=False), 20)
    optimizer, scheduler = build_optimizer(model, train, 20, torch.device("cpu"), fused=False)
    first = lrs(optimizer, scheduler, 7)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    optimizer, scheduler = build_optimizer(model, train, 20, torch.device("cpu"), fused=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert first + lrs(optimizer, scheduler, 13) == straight
    assert straight[3] == pytest.approx(1e-3)  # the warmup's end: the peak, whatever comes after
    assert len(set(straight[4:])) == (1 if schedule == "constant" else 16)


@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
def test_precision_flags_on_the_cpu(tiny_model_dir, seed_data, tmp_path, flag):
    out = tmp_path / "out"
    with captured_log() as lines:
        assert main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(seed_data), "--max_steps", "3",
                                  "--no_cuda", flag)) == EXIT_OK
    records = train_records(out)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["loss_scale"] is None for r in records)  # no GradScaler off CUDA
    fell_back = "--fp16 needs a CUDA GPU; training on the CPU in float32 instead" in lines
    assert fell_back == (flag == "--fp16")
    assert any(line.endswith(("bf16 on cpu" if flag == "--bf16" else "fp32 on cpu")) for line in lines), lines


def run_loop(model_dir: Path, batches, runtime, out: Path, steps: int) -> tuple[list[dict], dict]:
    """train_loop itself, fed from memory, with the given (possibly CPU-fp16) runtime."""
    import threading

    from trainer.config import TrainConfig
    from trainer.loop import TrainContext, build_optimizer, make_scaler, train_loop
    from trainer.metrics import MetricsLog
    from trainer.model import load_model
    from trainer.source import MemorySource

    model = load_model(model_dir)
    train = TrainConfig(output_dir=str(out), train_batch_size=8, logging_steps=1, learning_rate=1e-3,
                        warmup_proportion=0.0)
    optimizer, scheduler = build_optimizer(model, train, steps, runtime.device)
    out.mkdir()
    metrics = MetricsLog(out, True, None)
    try:
        train_loop(TrainContext(model, MemorySource(batches, 8), optimizer, scheduler, make_scaler(runtime), runtime,
                                train, steps, metrics, lambda step, state: None, threading.Event()))
    finally:
        metrics.close()
    return read_metrics(out), model.state_dict()


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler\.step\(\)` before")
@pytest.mark.parametrize("static_scale, overflows", [(None, False), (128.0, False), (3e38, True)])
def test_the_gradscaler_sequence(tiny_model_dir, tmp_path, static_scale, overflows):
    """fp16 with a GradScaler, run on the CPU here (the CLI only enables it on CUDA): a static scale never
    moves, and a step whose scaled gradients overflow is skipped, leaving the weights as they were."""
    import torch

    from trainer.loop import Runtime
    from trainer.model import load_model

    corpus = write_corpus(tmp_path / "corpus.txt")
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=3)
    runtime = Runtime(torch.device("cpu"), "fp16", torch.float16, static_scale)
    records, weights = run_loop(tiny_model_dir, batches, runtime, tmp_path / "out", steps=3)
    assert [r["loss_scale"] for r in records] == pytest.approx([static_scale or 2.0**16] * 3)
    before = load_model(tiny_model_dir).state_dict()
    changed = not torch.equal(before["bert.pooler.dense.weight"], weights["bert.pooler.dense.weight"])
    assert changed != overflows
    assert all((r["grad_norm"] is None) == overflows for r in records)  # inf/nan written as null


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler\.step\(\)` before")
def test_a_checkpoint_saved_in_fp16_trains_with_float32_master_weights(tiny_model_dir, tmp_path):
    """transformers 5 loads with dtype "auto", which would keep an fp16 checkpoint's weights in fp16: the GradScaler
    then refuses their fp16 gradients, and AdamW's small updates would round away. load_model asks for float32."""
    import json

    import torch

    from trainer.loop import Runtime
    from trainer.model import load_model

    half = tmp_path / "half"
    load_model(tiny_model_dir).half().save_pretrained(half)
    for name in ("vocab.txt", "tokenizer_config.json"):
        (half / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"  # saved as fp16 indeed

    assert {p.dtype for p in load_model(half).parameters()} == {torch.float32}
    corpus = write_corpus(tmp_path / "corpus.txt")
    batches = real_batches(half, corpus, tmp_path / "cache", batch_size=8, count=3)
    runtime = Runtime(torch.device("cpu"), "fp16", torch.float16, None)  # the GradScaler path, as above
    records, weights = run_loop(half, batches, runtime, tmp_path / "out", steps=3)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["loss_scale"] == 2.0**16 for r in records)  # the scaler ran, and no step overflowed
    assert {w.dtype for w in weights.values()} == {torch.float32}
    before = load_model(half).state_dict()
    assert not torch.equal(before["bert.pooler.dense.weight"], weights["bert.pooler.dense.weight"])


@pytest.mark.parametrize("padding", ["to max_seq_len", "to the longest row"])
def test_the_records_count_real_tokens_and_the_padding_computed_on(tiny_model_dir, tmp_path, padding):
    """pad_frac is the share of the positions the model computed on (rows x each micro-batch's width) that were
    padding, and tokens_per_s counts real tokens only: exact for known batches, one micro-batch a step."""
    import torch

    from common.lengths import stream_widths, trim
    from trainer.loop import Runtime

    corpus = write_corpus(tmp_path / "corpus.txt")
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=3, max_seq_len=128)
    if padding == "to the longest row":
        batches = [trim(b, stream_widths(128)) for b in batches]
    widths = [b.input_ids.shape[1] for b in batches]
    assert (min(widths) < 128) == (padding == "to the longest row")
    runtime = Runtime(torch.device("cpu"), "fp32", None, None)
    records, _ = run_loop(tiny_model_dir, batches, runtime, tmp_path / "out", steps=3)
    records = [r for r in records if "loss" in r]
    assert len(records) == 3
    for record, batch, width in zip(records, batches, widths):
        tokens = int(batch.lengths.sum())
        assert record["pad_frac"] == pytest.approx(1 - tokens / (8 * width))
        assert record["tokens_per_s"] / record["seq_per_s"] == pytest.approx(tokens / 8)
