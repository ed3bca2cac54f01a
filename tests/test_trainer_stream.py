"""The trainer on a real stream: a real producer process, real sockets, garbage and mismatched producers."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import REPO, free_tcp_endpoint, write_corpus, write_tiny_model
from trainer import EXIT_ERROR, EXIT_OK
from trainer.cli import main
from trainer.metrics import TRAIN_FIELDS
from trainer_support import (stop, TIMEOUT_S, Sender, captured_log, message, read_metrics, real_batches, start_trainer,
                             state_dict_of, train_on_frames, train_records, trainer_flags, vocabulary)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("stream_corpus") / "corpus.txt", num_documents=60)


def start_producer(model: Path, corpus: Path, endpoint: str, tmp_path: Path, *flags: str) -> subprocess.Popen:
    log = open(tmp_path / "producer.log", "w")
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
               "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--connect", endpoint,
               "--num_workers", "2", "--seed", "5", *flags]
    with log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def test_trains_from_a_real_producer_and_saves_a_loadable_model(tiny_model_dir, corpus, tmp_path):
    """Two processes on a real socket: producer batches of 5 re-sliced into micro-batches of 4 (8 / 2)."""
    endpoint = free_tcp_endpoint()
    out = tmp_path / "out"
    producer = start_producer(tiny_model_dir, corpus, endpoint, tmp_path, "--batch_size", "5", "--max_seq_len", "64")
    trainer = start_trainer(trainer_flags(
        tiny_model_dir, out, "--bind", endpoint, "--max_steps", "30", "--gradient_accumulation_steps", "2",
        "--save_steps", "15", "--eval_corpus", str(corpus), "--eval_steps", "15", "--eval_instances", "48",
        "--cache_dir", str(tmp_path / "cache"), "--data_timeout", str(TIMEOUT_S)), tmp_path / "trainer.log")
    try:
        code = trainer.wait(timeout=4 * TIMEOUT_S)
    finally:
        stop(trainer)
        stop(producer)
    log = (tmp_path / "trainer.log").read_text()
    assert code == EXIT_OK, log + (tmp_path / "producer.log").read_text()

    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 31))
    for record in records:
        missing = [f for f in TRAIN_FIELDS + ("grad_norm", "loss_scale", "epoch", "messages_received",
                                              "messages_rejected") if f not in record]
        assert not missing, record
        assert 0.0 <= record["data_wait_frac"] <= 1.0 and record["seq_per_s"] > 0
        assert 0.0 <= record["pad_frac"] < 0.5 and record["tokens_per_s"] >= 5 * record["seq_per_s"]
        assert 0.0 <= record["mlm_accuracy"] <= 1.0 and 0.0 <= record["nsp_accuracy"] <= 1.0
        assert record["epoch"] > 0  # from the instances per epoch the producer announces
    assert np.mean([r["mlm_loss"] for r in records[-8:]]) < np.mean([r["mlm_loss"] for r in records[:8]])
    evals = [r for r in read_metrics(out) if "eval_mlm_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]  # at start, every --eval_steps, at the end
    assert all(r["eval_instances"] == 48 for r in evals)
    assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
    assert records[-1]["messages_rejected"] == 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("document") == vocabulary(tiny_model_dir).id_of("document")
    trained = state_dict_of(out)
    assert not np.allclose(trained["bert.pooler.dense.weight"], state_dict_of(tiny_model_dir)["bert.pooler.dense.weight"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000015", "step_00000030"]


def test_garbage_and_stray_messages_do_not_stop_training(tiny_model_dir, corpus, tmp_path):
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=6)
    valid = [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(batches)]
    ours = vocabulary(tiny_model_dir).fingerprint(64)
    other_vocab = dataclasses.replace(ours, vocab_size=30522, vocab_sha256="0" * 64)
    shorter = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=1, max_seq_len=32)[0]
    frames = [
        b"\x00 not msgpack at all",
        valid[0],  # the first valid message decides the stream
        valid[1][: len(valid[1]) // 2],  # cut short
        message(tiny_model_dir, batches[2], fingerprint=other_vocab),  # another producer's vocabulary
        message(tiny_model_dir, shorter),  # another max_seq_len
        b"",
        *valid[1:],
    ]
    out = tmp_path / "out"
    endpoint = free_tcp_endpoint()
    sender = Sender(endpoint, frames, out)
    sender.start()
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "6",
                                  "--data_timeout", str(TIMEOUT_S)))
    sender.join(timeout=TIMEOUT_S)
    assert code == EXIT_OK, "\n".join(lines)
    last = train_records(out)[-1]
    assert last["step"] == 6
    assert last["messages_rejected"] == 5 and last["messages_received"] == len(frames)
    rejected = [line for line in lines if "stream: rejected" in line]
    assert rejected and "not a valid msgpack message" in rejected[0]  # the first is reported at once


def test_a_later_mismatching_producer_is_named_in_the_log(tiny_model_dir, corpus, tmp_path):
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=3)
    shorter = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=1, max_seq_len=32)[0]
    frames = [message(tiny_model_dir, batches[0]), message(tiny_model_dir, shorter),
              *(message(tiny_model_dir, b) for b in batches[1:])]
    with captured_log() as lines:
        code = train_on_frames(tiny_model_dir, tmp_path / "out", frames, "--max_steps", "3")
    assert code == EXIT_OK
    assert any("producer test:1" in line and "max_seq_len: 64 vs 32" in line for line in lines), lines


def other_vocabulary_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_model_dir, other)
    with open(other / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("zebrafish\n")
    return other


@pytest.mark.parametrize("case", ["vocabulary", "max_seq_len"])
def test_a_mismatched_producer_is_refused_naming_both_values(tiny_model_dir, corpus, tmp_path, case):
    if case == "vocabulary":
        producer_model, trainer_model, seq = other_vocabulary_model(tiny_model_dir, tmp_path), tiny_model_dir, 64
        size = len(vocabulary(tiny_model_dir).tokens)
        expected = f"vocab_size: {size} vs {size + 1}"
    else:
        producer_model, seq = tiny_model_dir, 128
        trainer_model = write_tiny_model(tmp_path / "short_model", max_position_embeddings=64)
        expected = "max_seq_len: the model has 64 positions vs 128"
    endpoint = free_tcp_endpoint()
    producer = start_producer(producer_model, corpus, endpoint, tmp_path, "--max_seq_len", str(seq))
    try:
        with captured_log() as lines:
            code = main(trainer_flags(trainer_model, tmp_path / "out", "--bind", endpoint, "--max_steps", "3",
                                      "--data_timeout", str(TIMEOUT_S)))
    finally:
        stop(producer)
    assert code == EXIT_ERROR
    errors = [line for line in lines if line.startswith("producer fingerprint does not match the model")]
    assert errors and expected in errors[0], lines


def test_silence_is_reported_and_data_timeout_ends_the_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.source.WAIT_NOTE_S", 0.3)
    endpoint = free_tcp_endpoint()
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, tmp_path / "out", "--bind", endpoint, "--data_timeout", "1.5"))
    assert code == EXIT_ERROR
    assert any(line.startswith(f"waiting for data on {endpoint}: no batch for") for line in lines), lines
    assert any(f"no batch on {endpoint} for" in line and "(--data_timeout 1.5)" in line for line in lines), lines


def test_epochs_need_an_announced_epoch_size_or_max_steps(tiny_model_dir, corpus, tmp_path):
    (batch,) = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=1)
    out, endpoint = tmp_path / "out", free_tcp_endpoint()
    sender = Sender(endpoint, [message(tiny_model_dir, batch, epoch_instances=0)], out)
    sender.start()
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--data_timeout", str(TIMEOUT_S)))
    sender.join(timeout=TIMEOUT_S)
    assert code == EXIT_ERROR
    assert any("pass --max_steps" in line for line in lines), lines


def test_an_endpoint_in_use_is_a_clear_error(tiny_model_dir, tmp_path):
    endpoint = free_tcp_endpoint()
    with zmq.Context() as ctx, ctx.socket(zmq.PULL) as taken:
        taken.bind(endpoint)
        with captured_log() as lines:
            code = main(trainer_flags(tiny_model_dir, tmp_path / "out", "--bind", endpoint))
        taken.close(linger=0)
    assert code == EXIT_ERROR
    assert any(line.startswith(f"cannot bind --bind {endpoint}") for line in lines), lines


def test_the_trainer_records_the_blend_it_trains_on(tiny_model_dir, corpus, tmp_path):
    """A blend as trained, from the trainer's side: each record carries the shares of the instances received
    from each corpus (the headers' counts), and the progress line shows them."""
    from common.wire import Header, encode

    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=8)
    counts = [(6, 2), (7, 1), (5, 3), (8, 0)] * 2  # 52 of the 64 instances from corpus 0: 0.8125
    fingerprint = vocabulary(tiny_model_dir).fingerprint(64)
    frames = [encode(Header("blend:1", 0, 0, i, 64, fingerprint, seed=1, blend=c), b)
              for i, (c, b) in enumerate(zip(counts, batches))]
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    Sender(endpoint, frames, out).start()
    with captured_log() as lines:
        # Eight steps of eight take all 64 instances, so the last record has seen every message.
        code = main(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "8", "--logging_steps",
                                  "4", "--save_steps", "0", "--mix_rows", "0", "--data_timeout", str(TIMEOUT_S)))
    assert code == EXIT_OK, "\n".join(lines)
    last = train_records(out)[-1]
    assert last["step"] == 8 and last["blend_shares"] == pytest.approx([52 / 64, 12 / 64])
    assert any("blend 0.812/0.188" in line for line in lines)
