"""Checkpoints: exact resume (after SIGTERM and after a crash), atomic writes, pruning, starting afresh."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import free_tcp_endpoint, write_corpus
from trainer import EXIT_ERROR, EXIT_OK, EXIT_STOPPED
from trainer.checkpoint import STATE_FILE, Checkpoints
from trainer.cli import main
from trainer_support import (TIMEOUT_S, Sender, captured_log, message, read_metrics, real_batches, start_trainer,
                             state_dict_of, train_records, trainer_flags, write_seed_epochs)

N = 4  # steps before the stop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("ckpt_corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def messages(tiny_model_dir, corpus, tmp_path_factory) -> list[bytes]:
    """2N fixed batches of 8 real instances, one per optimizer step: a deterministic stream."""
    cache = tmp_path_factory.mktemp("ckpt_cache")
    batches = real_batches(tiny_model_dir, corpus, cache, batch_size=8, count=2 * N, seed=3)
    return [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(batches)]


@pytest.fixture(scope="module")
def seed_data(tiny_model_dir, corpus, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("ckpt_seed") / "data"
    write_seed_epochs(data, tiny_model_dir, corpus, epochs=1)
    return data


def stream_run(model: Path, out: Path, frames: list[bytes], *, signal_at_step: int | None = None) -> int:
    endpoint = free_tcp_endpoint()
    sender = Sender(endpoint, frames, out, signal_at_step)
    sender.start()
    # --mix_rows 0: micro-batches in arrival order, so a run split at a message boundary can equal one straight
    # through (the mixing pool draws across the split, and its rows are not part of a checkpoint).
    flags = trainer_flags(model, out, "--bind", endpoint, "--max_steps", str(2 * N), "--gradient_accumulation_steps",
                          "2", "--save_steps", "0", "--data_timeout", str(TIMEOUT_S), "--mix_rows", "0")
    try:
        return main(flags)
    finally:
        sender.join(timeout=TIMEOUT_S)


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sigterm_then_resume_equals_training_straight_through(tiny_model_dir, messages, tmp_path):
    straight = tmp_path / "straight"
    assert stream_run(tiny_model_dir, straight, messages) == EXIT_OK

    stopped = tmp_path / "stopped"
    with captured_log() as lines:
        code = stream_run(tiny_model_dir, stopped, messages[:N], signal_at_step=N)
    assert code == EXIT_STOPPED, "\n".join(lines)
    (step, path), = Checkpoints(stopped, 3).complete()
    assert step == N
    state = torch.load(path / STATE_FILE, weights_only=True)
    assert state["step"] == N and state["scheduler"]["last_epoch"] == N
    assert not (stopped / "model.safetensors").exists()  # not finished: no final model yet

    assert stream_run(tiny_model_dir, stopped, messages[N:]) == EXIT_OK
    assert [r["step"] for r in train_records(stopped)] == list(range(1, 2 * N + 1))
    assert_same_parameters(state_dict_of(stopped), state_dict_of(straight))
    # ... and the comparison can fail: the model did move.
    before = state_dict_of(tiny_model_dir)
    assert not torch.equal(before["bert.embeddings.word_embeddings.weight"],
                           state_dict_of(straight)["bert.embeddings.word_embeddings.weight"])


def test_resume_after_a_crash_continues_mid_epoch(tiny_model_dir, seed_data, tmp_path):
    flags = ["--pregenerated_data", str(seed_data), "--epochs", "1", "--max_steps", str(2 * N),
             "--gradient_accumulation_steps", "2", "--save_steps", str(N)]
    straight = tmp_path / "straight"
    assert main(trainer_flags(tiny_model_dir, straight, *flags)) == EXIT_OK

    # A run that crashed after its step-N checkpoint: that checkpoint, a metrics file that went further, and an
    # unfinished checkpoint folder.
    crashed = tmp_path / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / f"step_{N:08d}", crashed / "checkpoints" / f"step_{N:08d}")
    shutil.copy(straight / "metrics.jsonl", crashed / "metrics.jsonl")
    (crashed / "checkpoints" / f"step_{N + 2:08d}.tmp-12345").mkdir()
    with captured_log() as lines:
        assert main(trainer_flags(tiny_model_dir, crashed, *flags)) == EXIT_OK
    assert any("resuming from" in line and f"step_{N:08d}" in line for line in lines)
    assert not list((crashed / "checkpoints").glob("*.tmp-*"))
    assert [r["step"] for r in train_records(crashed)] == list(range(1, 2 * N + 1))  # each step once
    assert_same_parameters(state_dict_of(crashed), state_dict_of(straight))


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous(tiny_model_dir, seed_data, tmp_path,
                                                                         monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_on_second(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second)
    out = tmp_path / "out"
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(seed_data), "--epochs", "1",
                                  "--max_steps", "6", "--save_steps", "2"))
    assert code == EXIT_ERROR
    assert any(f"could not write checkpoint {out / 'checkpoints' / 'step_00000004'}" in line
               and "No space left on device" in line for line in lines), lines
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    assert Checkpoints.load_state(out / "checkpoints" / "step_00000002")["step"] == 2


def test_keeps_the_newest_checkpoints_and_no_resume_starts_afresh(tiny_model_dir, seed_data, tmp_path):
    out = tmp_path / "out"
    flags = ["--pregenerated_data", str(seed_data), "--epochs", "1", "--save_steps", "1", "--keep_checkpoints", "2"]
    assert main(trainer_flags(tiny_model_dir, out, *flags, "--max_steps", "5")) == EXIT_OK
    assert [s for s, _ in Checkpoints(out, 2).complete()] == [4, 5]

    # The same command again: the run is complete, nothing more is trained.
    assert main(trainer_flags(tiny_model_dir, out, *flags, "--max_steps", "5")) == EXIT_OK
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5]

    assert main(trainer_flags(tiny_model_dir, out, *flags, "--max_steps", "3", "--no_resume")) == EXIT_OK
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert [s for s, _ in Checkpoints(out, 2).complete()] == [2, 3]


def test_sigterm_to_a_waiting_trainer_process_exits_75(tiny_model_dir, tmp_path):
    endpoint = free_tcp_endpoint()
    log_path = tmp_path / "trainer.log"
    process = start_trainer(trainer_flags(tiny_model_dir, tmp_path / "out", "--bind", endpoint, "--max_steps", "5"),
                            log_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while f"listening on {endpoint}" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT_S) == EXIT_STOPPED, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped at step 0" in log_path.read_text()
