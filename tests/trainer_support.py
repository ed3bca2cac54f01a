"""Helpers shared by the trainer's tests: real batches from the tiny corpus, seed-format folders, log capture."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

import seed_reference
from common.config import CorpusConfig, GenerationConfig
from common.index import build_or_load_index
from common.instances import Batch, collate, iter_instances
from common.vocab import Fingerprint, Vocabulary, load_tokenizer
from common.wire import Header, encode
from conftest import REPO, tiny_vocab

TIMEOUT_S = 120  # a guard against hangs, never a speed assertion


def vocabulary(model_dir: Path) -> Vocabulary:
    return Vocabulary.from_tokenizer(load_tokenizer(model_dir, True), True)


def real_batches(model_dir: Path, corpus: Path, cache_dir: Path, *, batch_size: int, count: int,
                 max_seq_len: int = 64, seed: int = 0) -> list[Batch]:
    """`count` batches of real instances generated from `corpus` (documents cycled as needed)."""
    vocab = vocabulary(model_dir)
    index = build_or_load_index(CorpusConfig((str(corpus),), str(model_dir), True, str(cache_dir)), vocab, 1)
    config = GenerationConfig(max_seq_len=max_seq_len)
    rng = np.random.default_rng(seed)

    def documents():
        while True:
            yield from rng.permutation(index.num_documents)

    instances = iter_instances(index, documents(), config, vocab, rng)
    return [collate([next(instances) for _ in range(batch_size)], config, vocab) for _ in range(count)]


def message(model_dir: Path, batch: Batch, *, epoch_instances: int = 0, sequence: int = 0,
            fingerprint: Fingerprint | None = None, producer_id: str = "test:1", seed: int = 1) -> bytes:
    """`batch` encoded as a producer would send it, with the model's fingerprint unless another is given."""
    fingerprint = fingerprint or vocabulary(model_dir).fingerprint(batch.input_ids.shape[1])
    header = Header(producer_id=producer_id, worker=0, epoch=0, sequence=sequence, epoch_instances=epoch_instances,
                    fingerprint=fingerprint, seed=seed)
    return encode(header, batch)


def write_seed_epochs(out: Path, model_dir: Path, corpus: Path, epochs: int, max_seq_len: int = 64) -> list[int]:
    """Seed-format epochs written by the plain reference (not the producer); returns instances per epoch."""
    tokenizer = load_tokenizer(model_dir, True)
    docs = seed_reference.read_corpus_file(corpus, lambda s: tokenizer.encode(s, add_special_tokens=False).tokens)
    out.mkdir(parents=True, exist_ok=True)
    counts = []
    for epoch in range(epochs):
        records = seed_reference.generate_epoch(docs, tiny_vocab(), random.Random(epoch), max_seq_len=max_seq_len)
        seed_reference.write_epoch(records, out, epoch, max_seq_len)
        counts.append(len(records))
    return counts


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_records(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


@contextlib.contextmanager
def captured_log():
    """The trainer's log lines (logger "bertstream", which does not propagate to pytest's caplog)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("bertstream")
    handler = Collect(logging.INFO)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def trainer_flags(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Small, fast settings: tiny batches, a log record every step, a high learning rate so loss moves."""
    return ["--bert_model", str(model_dir), "--do_lower_case", "--output_dir", str(output_dir),
            "--train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--warmup_proportion", "0", *extra]


def start_trainer(flags: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "trainer", *flags], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def state_dict_of(output_dir: Path) -> dict:
    from transformers import BertForPreTraining

    return BertForPreTraining.from_pretrained(str(output_dir)).state_dict()


class Sender(threading.Thread):
    """Pushes `frames` to the trainer over a real PUSH socket, then (optionally) SIGTERMs this process once the
    trainer's metrics show `signal_at_step`: it can go no further, having no more data."""

    def __init__(self, endpoint: str, frames: list[bytes], output_dir: Path, signal_at_step: int | None = None):
        super().__init__(daemon=True)
        self.endpoint, self.frames, self.output_dir, self.signal_at_step = endpoint, frames, output_dir, \
            signal_at_step

    def run(self):
        with zmq.Context() as ctx, ctx.socket(zmq.PUSH) as push:
            push.setsockopt(zmq.LINGER, 5000)
            push.connect(self.endpoint)
            for frame in self.frames:
                push.send(frame)
            if self.signal_at_step is None:
                return
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                if any(r.get("step") == self.signal_at_step for r in train_records(self.output_dir)):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                time.sleep(0.05)


def train_on_frames(model: Path, out: Path, frames: list[bytes], *flags: str, signal_at_step: int | None = None,
                    lower_case: str = "--do_lower_case") -> int:
    """The trainer's `main` in this process, bound on a fresh tcp endpoint, fed `frames` by a Sender; its exit code."""
    from conftest import free_tcp_endpoint
    from trainer.cli import main

    endpoint = free_tcp_endpoint()
    sender = Sender(endpoint, frames, out, signal_at_step)
    sender.start()
    command = trainer_flags(model, out, "--bind", endpoint, "--data_timeout", str(TIMEOUT_S), *flags)
    command[command.index("--do_lower_case")] = lower_case
    try:
        return main(command)
    finally:
        sender.join(timeout=TIMEOUT_S)


def run_to_end(process: subprocess.Popen, log_path: Path, *others: subprocess.Popen,
               timeout_s: float = 4 * TIMEOUT_S) -> tuple[int, str]:
    """`process`'s exit code and its log, once it ends; after `timeout_s` (a guard against hangs, never a speed
    assertion) it and `others` are stopped whatever happened, so a failing test leaves no process behind."""
    try:
        code = process.wait(timeout=timeout_s)
    finally:
        stop(process, *others)
    return code, log_path.read_text()


def stop(*processes: subprocess.Popen) -> None:
    """Terminate, then kill after TIMEOUT_S, and always reap: a failing test leaves no process behind."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
