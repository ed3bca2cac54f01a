"""Producers' seeds: drawn fresh without --seed (and carried in every header), repeated exactly with it, and a
seed shared by two producers named by the trainer. Real producer processes and real sockets throughout."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zmq

from common.wire import Message
from conftest import free_tcp_endpoint
from test_producer import collect, start_producer
from trainer import EXIT_OK
from trainer_support import captured_log, message, real_batches, train_on_frames


def stream(model: Path, corpus: Path, tmp_path: Path, name: str, *flags: str) -> tuple[list[Message], str]:
    """Every message of one epoch from a real producer (2 workers), and its log."""
    endpoint = free_tcp_endpoint()
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.bind(endpoint)
        process, log_path = start_producer(model, corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                           "--epochs", "1", "--batch_size", "8", "--max_seq_len", "64", *flags,
                                           name=name)
        try:
            messages = collect(pull, process, log_path)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        pull.close(linger=0)
    text = log_path.read_text()
    assert process.returncode == 0 and messages, text
    return messages, text


def rows(messages: list[Message]) -> dict[tuple[int, int], bytes]:
    """Each instance (ids, masks and labels as sent) keyed by (worker, position in that worker's stream)."""
    found, position = {}, {}
    for m in sorted(messages, key=lambda m: (m.header.worker, m.header.sequence)):
        b = m.batch
        for r in range(b.size):
            p = position.get(m.header.worker, 0)
            position[m.header.worker] = p + 1
            found[m.header.worker, p] = b"|".join(np.ascontiguousarray(a[r]).tobytes() for a in (
                b.input_ids, b.token_type_ids, b.masked_positions, b.masked_labels, b.next_sentence_labels))
    return found


def test_producers_without_seed_never_repeat_each_other_and_a_logged_seed_repeats_a_stream(
        tiny_model_dir, tiny_corpus, tmp_path):
    first, first_log = stream(tiny_model_dir, tiny_corpus, tmp_path, "first")
    second, _ = stream(tiny_model_dir, tiny_corpus, tmp_path, "second")

    seeds = [{m.header.seed for m in messages} for messages in (first, second)]
    assert all(len(s) == 1 for s in seeds), seeds  # one seed per producer, in every header (workers alike)
    (seed,), (other,) = seeds
    assert seed != other
    assert f"seed: {seed}, drawn from os entropy" in first_log and f"--seed {seed}" in first_log
    # Disjoint: not one instance in common (the same corpus, flags and worker count; only the seed differs).
    assert not set(rows(first).values()) & set(rows(second).values())

    # The logged seed, passed back, repeats the first stream exactly; twice the same --seed, twice the same.
    again, again_log = stream(tiny_model_dir, tiny_corpus, tmp_path, "again", "--seed", str(seed))
    assert "drawn from os entropy" not in again_log
    assert {m.header.seed for m in again} == {seed}
    assert rows(again) == rows(first)


@pytest.mark.parametrize("same_seed", [True, False])
def test_the_trainer_names_two_producers_that_send_the_same_seed(tiny_model_dir, tiny_corpus, tmp_path, same_seed):
    batches = real_batches(tiny_model_dir, tiny_corpus, tmp_path / "cache", batch_size=8, count=4)
    frames = [message(tiny_model_dir, batches[0], producer_id="host-a:11", seed=7),
              message(tiny_model_dir, batches[1], producer_id="host-a:11", seed=7),
              message(tiny_model_dir, batches[2], producer_id="host-b:22", seed=7 if same_seed else 8),
              message(tiny_model_dir, batches[3], producer_id="host-b:22", seed=7 if same_seed else 8)]
    with captured_log() as lines:
        code = train_on_frames(tiny_model_dir, tmp_path / "out", frames, "--max_steps", "4")
    assert code == EXIT_OK, "\n".join(lines)
    warnings = [line for line in lines if re.search(r"producers \S+ and \S+ both send seed", line)]
    if same_seed:
        assert len(warnings) == 1, lines  # once, not per message
        assert "producers host-a:11 and host-b:22 both send seed 7" in warnings[0]
    else:
        assert not warnings, warnings
    assert "stream: batches from producer host-b:22" in lines, lines
