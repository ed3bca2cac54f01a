"""Resumes that change the setup: precision (a GradScaler or none), the optimizer's implementation, GPU count.

The CPU has no CUDA, so fp16 with a GradScaler runs on the CPU here as tests/test_trainer_loop.py runs it, and
the optimizer is built fused, as it is on CUDA (torch has a fused AdamW for the CPU too): the combination that
fails on a GPU without the resume's care. The checkpoints are the trainer's own, written by the CLI.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from conftest import write_corpus
from trainer import EXIT_OK
from trainer.checkpoint import STATE_FILE, Checkpoints, cuda_states_to_restore, rng_state
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.distributed import Ranks
from trainer.loop import Runtime, TrainContext, build_optimizer, make_scaler, restore_training_state, train_loop
from trainer.metrics import MetricsLog
from trainer.model import load_model
from trainer.source import MemorySource
from trainer_support import captured_log, real_batches, train_records, trainer_flags, write_seed_epochs

FP16_CPU = Runtime(torch.device("cpu"), "fp16", torch.float16, None)  # a GradScaler, as on CUDA
FP32_CPU = Runtime(torch.device("cpu"), "fp32", None, None)
# Warnings a GradScaler loop gives by design (a skipped first step) and CPU fp16 autocast's own.
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler\.step\(\)` before")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus.txt")


@pytest.fixture(scope="module")
def fp32_checkpoint(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    """The CLI's checkpoint after 2 fp32 steps on the CPU (no GradScaler: its state is {})."""
    tmp = tmp_path_factory.mktemp("fp32_run")
    write_seed_epochs(tmp / "data", tiny_model_dir, corpus, epochs=1)
    out = tmp / "out"
    assert main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(tmp / "data"), "--max_steps", "2",
                              "--no_cuda")) == EXIT_OK
    return Checkpoints(out, 3).latest()


def train_on(model, state: dict | None, runtime: Runtime, fused: bool, batches, out: Path, steps: int,
             save=lambda step, source_state: None) -> tuple[list[dict], list[str], object]:
    """`steps` steps of train_loop after restoring `state` (None: none) as run_training restores it; returns
    the records, the log lines and the optimizer."""
    train = TrainConfig(output_dir=str(out), train_batch_size=8, logging_steps=1, learning_rate=1e-3,
                        warmup_proportion=0.0)
    optimizer, scheduler = build_optimizer(model, train, steps + 10, runtime.device, fused=fused)
    scaler = make_scaler(runtime)
    out.mkdir()
    metrics = MetricsLog(out, True, None)
    start = int(state["step"]) if state else 0
    try:
        with captured_log() as lines:
            if state is not None:
                restore_training_state(state, optimizer, scheduler, scaler, runtime, Ranks.single())
            train_loop(TrainContext(model, MemorySource(batches, 8), optimizer, scheduler, scaler, runtime, train,
                                    start + steps, metrics, save, threading.Event(), start_step=start))
    finally:
        metrics.close()
    return train_records(out), lines, optimizer


def test_an_fp32_checkpoint_resumes_under_fp16_with_a_fresh_loss_scale(tiny_model_dir, corpus, fp32_checkpoint,
                                                                      tmp_path):
    state = Checkpoints.load_state(fp32_checkpoint)
    assert state["scaler"] == {}  # what a disabled GradScaler saves
    with pytest.raises(RuntimeError, match="The source state dict is empty"):  # the cause, in torch itself
        make_scaler(FP16_CPU).load_state_dict(state["scaler"])
    assert all(group["fused"] is None for group in state["optimizer"]["param_groups"])  # a CPU run's AdamW

    model = load_model(fp32_checkpoint)
    before = model.bert.pooler.dense.weight.detach().clone()
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=4)
    records, lines, optimizer = train_on(model, state, FP16_CPU, True, batches, tmp_path / "out", steps=4)

    assert any(line.startswith("resume: not carried over from the checkpoint: a loss scale (the checkpoint was "
                               "written without fp16's GradScaler): starting at 65536") for line in lines), lines
    assert all(group["fused"] is True for group in optimizer.param_groups)  # this run's choice, not the saved one
    assert [r["step"] for r in records] == [3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss_scale"] == 2.0**16  # started fresh (at most halved once per overflowing step after)
    assert not torch.equal(before, model.bert.pooler.dense.weight)  # steps were taken, not all skipped


def test_an_fp16_checkpoint_resumes_in_fp32_without_its_loss_scale(tiny_model_dir, corpus, tmp_path):
    """The reverse: an fp16 run's state (a loss scale, a fused AdamW's state) into an fp32, unfused run."""
    saved = {}

    def keep_state(step, source_state):  # what run_training's save() puts in training_state.pt
        saved.update(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), rng=rng_state(torch.device("cpu")))

    model = load_model(tiny_model_dir)
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=6)
    train = TrainConfig(output_dir=str(tmp_path / "fp16"), train_batch_size=8, logging_steps=1, learning_rate=1e-3,
                        warmup_proportion=0.0)
    optimizer, scheduler = build_optimizer(model, train, 10, FP16_CPU.device, fused=True)
    scaler = make_scaler(FP16_CPU)
    (tmp_path / "fp16").mkdir()
    metrics = MetricsLog(tmp_path / "fp16", True, None)
    try:
        train_loop(TrainContext(model, MemorySource(batches[:3], 8), optimizer, scheduler, scaler, FP16_CPU, train, 3,
                                metrics, keep_state, threading.Event()))
    finally:
        metrics.close()
    assert saved["step"] == 3 and saved["scaler"]["scale"] > 0
    assert all(group["fused"] is True for group in saved["optimizer"]["param_groups"])

    scale = saved["scaler"]["scale"]
    records, lines, optimizer = train_on(model, saved, FP32_CPU, False, batches[3:], tmp_path / "out", steps=3)
    assert any(f"the loss scale {scale:g} (this run trains in fp32, without a GradScaler)" in line
               for line in lines), lines
    assert all(group["fused"] is None for group in optimizer.param_groups)
    assert [r["step"] for r in records] == [4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["loss_scale"] is None for r in records)
    # The moments came back: AdamW's step counters continue from the checkpoint's 3, on the CPU as unfused wants.
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {6.0} and all(s["step"].device.type == "cpu" for s in optimizer.state.values())


def test_a_fused_fp16_resume_keeps_the_scale_it_saved(tiny_model_dir, corpus, tmp_path):
    """fp16 -> fp16 is unchanged: the checkpoint's loss scale and growth tracker come back, and nothing is
    reported as lost."""
    model = load_model(tiny_model_dir)
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a loss scale that is not the initial one
    train = TrainConfig(output_dir=str(tmp_path), train_batch_size=8)
    optimizer, scheduler = build_optimizer(model, train, 10, torch.device("cpu"), fused=True)
    state = {"step": 0, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": rng_state(torch.device("cpu"))}
    records, lines, _ = train_on(model, state, FP16_CPU, True, batches, tmp_path / "out", steps=1)
    assert not any(line.startswith("resume: not carried over") for line in lines), lines
    assert records[0]["loss_scale"] in (1024.0, 512.0)  # 512 if that step overflowed


def test_random_states_are_restored_for_the_gpus_both_runs_have():
    assert cuda_states_to_restore(saved=4, visible=1) == ([0], [1, 2, 3])
    assert cuda_states_to_restore(saved=2, visible=8) == ([0, 1], [])
    assert cuda_states_to_restore(saved=3, visible=0) == ([], [0, 1, 2])


def test_a_checkpoint_with_more_gpus_random_states_than_this_machine_resumes(tiny_model_dir, corpus,
                                                                             fp32_checkpoint, tmp_path):
    """The rng section as a checkpoint of the previous format holds it on a 3-GPU machine (every visible GPU's
    generator): this machine sees none, so the run resumes and says which it skipped."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(fp32_checkpoint.parent.parent, out)  # the whole output dir: checkpoints and metrics
    folder = Checkpoints(out, 3).latest()
    state = Checkpoints.load_state(folder)
    assert state["rng"]["cuda"].numel() == 0  # the new format: the training device's state only (none: the CPU)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox generator's state: seed and offset, 16 bytes
    state["rng"]["cuda"] = [cuda_state.clone() for _ in range(3)]
    torch.save(state, folder / STATE_FILE)

    data = tmp_path / "data"
    write_seed_epochs(data, tiny_model_dir, corpus, epochs=1)
    with captured_log() as lines:
        assert main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(data), "--max_steps", "4",
                                  "--no_cuda")) == EXIT_OK
    assert any("not carried over from the checkpoint: the random states of GPU(s) 0, 1, 2 of the 3 the "
               "checkpoint holds (this machine sees 0)" in line for line in lines), lines
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]


def test_bf16_on_the_cpu_says_what_autocast_does_there(tiny_model_dir, corpus, tmp_path):
    from trainer.config import DeviceConfig, DistributedConfig
    from trainer.loop import resolve_runtime

    with captured_log() as lines:
        runtime = resolve_runtime(DeviceConfig(no_cuda=True, bf16=True), DistributedConfig())
    assert runtime.precision == "bf16" and runtime.device.type == "cpu"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert lines == ["--bf16 on the CPU: autocast runs matrix products in bfloat16, " +
                     ("natively (this CPU has AVX512-BF16 or AMX)" if native else
                      "emulated (this CPU has neither AVX512-BF16 nor AMX: expect no speed-up over fp32)")]
