"""Faults done for real to real processes: kill -9 of a producer worker, of the whole producer and of the trainer
(also in the middle of a checkpoint), SIGTERM, a full disk, bad messages at a real trainer's socket, bad corpora
and bad flags at the producer command. docs/faults-and-security.md is the table of these tests and what they observe.

Covered elsewhere and not repeated here: the producer's worker restart keeps the stream exactly-once except for
the dead process's queued batches (test_producer.py), a trainer killed by SIGTERM while waiting for data
(test_trainer_checkpoint.py), a producer with another tokenizer or max_seq_len refused at its first message
naming both values (test_trainer_stream.py), decoder-level hypothesis tests (test_wire.py), corpus edge cases in
the library (test_corpus.py, test_index.py).

Each fault test prints one `fault:` line with what it measured (`pytest -s tests/test_faults.py`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from conftest import REPO, free_tcp_endpoint, tiny_vocab, write_corpus, write_tiny_model
from trainer import EXIT_ERROR, EXIT_OK, EXIT_STOPPED
from trainer.checkpoint import Checkpoints
from trainer.cli import main as trainer_main
from trainer_support import (TIMEOUT_S, Sender, captured_log, message, real_batches, start_trainer, state_dict_of,
                             trainer_flags, write_seed_epochs)

WORKER_STARTED = re.compile(r"worker (\d+) started: pid (\d+)")


# --- fixtures and helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("faults_corpus") / "corpus.txt", num_documents=60)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One index cache for the module: the corpus is tokenized once, every producer start is warm."""
    return tmp_path_factory.mktemp("faults_cache")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """The tiny vocabulary with a 2-layer, 64-wide BERT whose embedding table has 60000 rows (the tokenizer uses
    the first ones): 4M parameters, so a checkpoint takes long enough to be caught half-written, while a step
    stays cheap (the MLM head only scores the masked positions)."""
    from transformers import BertConfig, BertForPreTraining

    directory = tmp_path_factory.mktemp("wide_bert")
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        '{"do_lower_case": true, "tokenizer_class": "BertTokenizer", "model_max_length": 512}', encoding="utf-8")
    config = BertConfig(vocab_size=60000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    BertForPreTraining(config).save_pretrained(directory)
    return directory


def start_producer(model: Path, corpus: Path, cache: Path, endpoint: str, log_path: Path, *flags: str):
    """A real `python -m producer` in its own process group (so the whole producer can be killed at once)."""
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
               "--do_lower_case", "--cache_dir", str(cache), "--connect", endpoint, "--num_workers", "2",
               "--batch_size", "4", "--max_seq_len", "64", "--hwm_batches", "2", "--progress_interval_s", "0.3",
               *flags]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def wait_for(log_path: Path, pattern: str, *alive: subprocess.Popen, count: int = 1) -> list:
    """The matches of `pattern` in the log once there are `count`; fails if a process in `alive` exits first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.findall(pattern, log_path.read_text())
        if len(found) >= count:
            return found
        for process in alive:
            assert process.poll() is None, f"exited with {process.returncode}; {log_path.name}:\n{log_path.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} not seen {count} times in {log_path}:\n{log_path.read_text()}")


def wait_until(condition, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.02)


def steps(output_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl; a line still being written is left out."""
    path = output_dir / "metrics.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            found.append(record["step"])
    return found


def last_record(output_dir: Path) -> dict:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][-1]


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        done = steps(output_dir)
        if done and done[-1] >= step:
            return done[-1]
        assert process.poll() is None, f"exited with {process.returncode}:\n{log_path.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached:\n{log_path.read_text()}")


def children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def finish(process: subprocess.Popen, log_path: Path, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"did not exit:\n{log_path.read_text()}")


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def assert_loads(output_dir: Path) -> None:
    """The final model and tokenizer load as transformers loads them."""
    from transformers import AutoTokenizer, BertForPreTraining

    BertForPreTraining.from_pretrained(str(output_dir))
    AutoTokenizer.from_pretrained(str(output_dir))


# --- producer faults --------------------------------------------------------------------------------------


def test_kill_9_of_one_producer_worker_training_goes_on(tiny_model_dir, corpus, cache, tmp_path):
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    plog, tlog = tmp_path / "producer.log", tmp_path / "trainer.log"
    producer = start_producer(tiny_model_dir, corpus, cache, endpoint, plog)
    trainer = start_trainer(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "120",
                                         "--save_steps", "0", "--data_timeout", str(TIMEOUT_S)), tlog)
    try:
        pids = {int(w): int(p) for w, p in wait_for(plog, WORKER_STARTED.pattern, producer, count=2)}
        wait_for_step(out, 3, trainer, tlog)
        assert pids[0] in children(producer.pid)  # the real worker process of the running producer
        os.kill(pids[0], signal.SIGKILL)
        ((_, new_pid),) = wait_for(plog, r"worker (0) started: pid (\d+), resuming", producer)
        step_at_restart = steps(out)[-1]
        assert trainer.wait(timeout=4 * TIMEOUT_S) == EXIT_OK, tlog.read_text()
        assert producer.poll() is None, "the producer must carry on by itself"
        assert int(new_pid) in children(producer.pid) and not alive(pids[0])
        wait_for(plog, r"2/2 workers up, 1 restarts", producer)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        status = finish(producer, plog)
    assert status == 0, plog.read_text()
    assert steps(out) == list(range(1, 121)), "every step trained once"
    assert last_record(out)["messages_rejected"] == 0
    assert f"worker 0 (pid {pids[0]}) killed by signal SIGKILL" in plog.read_text()
    print(f"\nfault: worker kill at step {step_at_restart} (restart logged then); the trainer went on to step 120")


def test_kill_9_of_the_whole_producer_trainer_waits_resumes_then_times_out(tiny_model_dir, corpus, cache, tmp_path,
                                                                         monkeypatch):
    """The trainer runs in this process (so its 'waiting' note can come every 0.5 s); the producers are real."""
    monkeypatch.setattr("trainer.source.WAIT_NOTE_S", 0.5)
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    observed: dict = {}
    errors: list = []

    def faults(lines: list[str]) -> None:
        def fed_by(process: subprocess.Popen) -> bool:
            return any(line.startswith("stream: batches from producer") and line.endswith(f":{process.pid}")
                       for line in lines)

        try:
            wait_until(lambda: any(line.startswith(f"stream: listening on {endpoint}") for line in lines), "bind")
            # --batch_size 8: each message is a whole step, so a producer's first message is trained on.
            first = start_producer(tiny_model_dir, corpus, cache, endpoint, tmp_path / "p1.log", "--batch_size", "8")
            try:
                # Killed as soon as its first batch arrives (what it had pushed by then is in the trainer's socket
                # buffers and still trained on: the sooner the kill, the shorter that takes), then nothing comes.
                wait_until(lambda: fed_by(first), "batches from the first producer")
                group = children(first.pid) | {first.pid}
                kill_group(first)  # kill -9 of the supervisor and every worker at once
                wait_until(lambda: not any(alive(pid) for pid in group), f"every process of {sorted(group)} gone")
                observed["killed_at"], seen = (steps(out) or [0])[-1], len(lines)
                wait_until(lambda: any(line.startswith(f"waiting for data on {endpoint}") for line in lines[seen:]),
                           "the trainer says it is waiting")
                observed["waited_at"] = (steps(out) or [0])[-1]
            finally:
                kill_group(first)
            # A producer connects again: one epoch (~118 instances), then it finishes and nothing more comes.
            second = start_producer(tiny_model_dir, corpus, cache, endpoint, tmp_path / "p2.log", "--batch_size", "8",
                                    "--epochs", "1")
            try:
                wait_until(lambda: fed_by(second), "batches from the second producer")
                assert second.wait(timeout=TIMEOUT_S) == 0
            finally:
                kill_group(second)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    with captured_log() as lines:
        driver = threading.Thread(target=faults, args=(lines,), daemon=True)
        driver.start()
        started = time.monotonic()
        code = trainer_main(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "1000000",
                                          "--save_steps", "0", "--data_timeout", "8"))
        driver.join(timeout=TIMEOUT_S)
    assert not errors, errors
    assert code == EXIT_ERROR
    resumed_to = steps(out)[-1]
    assert resumed_to > observed["waited_at"] >= observed["killed_at"]
    assert any(f"no batch on {endpoint} for 8s (--data_timeout 8)" in line for line in lines), lines
    assert steps(out) == list(range(1, resumed_to + 1))
    # The data timeout is at a step boundary: what was trained is kept for the next start (--save_steps 0 here).
    assert [step for step, _ in Checkpoints(out, 3).complete()] == [resumed_to]
    print(f"\nfault: producer killed at step {observed['killed_at']}, its buffered batches trained up to step "
          f"{observed['waited_at']}, then 'waiting for data'; a new producer took it to step {resumed_to}, then "
          f"--data_timeout ended it with a checkpoint at step {resumed_to} ({time.monotonic() - started:.0f} s)")


# --- trainer faults ---------------------------------------------------------------------------------------


def test_sigterm_saves_and_a_restarted_trainer_resumes_while_producers_keep_running(tiny_model_dir, corpus, cache,
                                                                                  tmp_path):
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    plog = tmp_path / "producer.log"
    flags = trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "30", "--save_steps", "0",
                          "--data_timeout", str(TIMEOUT_S))
    producer = start_producer(tiny_model_dir, corpus, cache, endpoint, plog)
    first = second = None
    try:
        first = start_trainer(flags, tmp_path / "first.log")
        wait_for_step(out, 10, first, tmp_path / "first.log")
        first.send_signal(signal.SIGTERM)  # preemption
        assert first.wait(timeout=TIMEOUT_S) == EXIT_STOPPED, (tmp_path / "first.log").read_text()
        (stopped_at, _), = Checkpoints(out, 3).complete()
        assert f"stopped at step {stopped_at}" in (tmp_path / "first.log").read_text()
        assert steps(out)[-1] == stopped_at  # nothing trained past the checkpoint

        # No trainer: the workers fill their queues and wait at the high-water mark.
        blocked_before = plog.read_text().count("blocked on socket 100%")
        wait_for(plog, r"blocked on socket 100%", producer, count=blocked_before + 2)

        second = start_trainer(flags, tmp_path / "second.log")
        assert second.wait(timeout=4 * TIMEOUT_S) == EXIT_OK, (tmp_path / "second.log").read_text()
        assert producer.poll() is None
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
        status = finish(producer, plog)
    assert status == 0
    assert f"resuming from {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in (tmp_path / "second.log").read_text()
    assert steps(out) == list(range(1, 31)), "each step exactly once across the two runs"
    assert len(WORKER_STARTED.findall(plog.read_text())) == 2, "no producer worker was restarted"
    assert_loads(out)
    print(f"\nfault: SIGTERM at step {stopped_at}: exit 75, checkpoint step {stopped_at}, 0 steps lost; producer "
          "blocked at its high-water mark, then fed the restarted trainer")


def test_kill_9_in_the_middle_of_a_checkpoint_resumes_from_the_last_complete_one(wide_model_dir, corpus, cache,
                                                                               tmp_path):
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    plog = tmp_path / "producer.log"
    flags = trainer_flags(wide_model_dir, out, "--bind", endpoint, "--max_steps", "8", "--save_steps", "2",
                          "--keep_checkpoints", "2", "--data_timeout", str(TIMEOUT_S))
    producer = start_producer(wide_model_dir, corpus, cache, endpoint, plog)
    first = second = None
    try:
        first = start_trainer(flags, tmp_path / "first.log")
        root = out / "checkpoints"
        partial = None
        deadline = time.monotonic() + TIMEOUT_S
        while partial is None:  # the first checkpoint folder seen half-written after a complete one exists
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            if root.is_dir() and any(p.name.startswith("step_") and ".tmp-" not in p.name for p in root.iterdir()):
                partial = next(iter(root.glob("step_*.tmp-*")), None)
            if partial is None:
                time.sleep(0.0005)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
        assert partial.is_dir(), "the kill landed after the checkpoint was complete"
        left = sorted(p.name for p in partial.iterdir())
        last_complete = Checkpoints(out, 2).complete()[-1][0]
        trained = steps(out)[-1]

        second = start_trainer(flags, tmp_path / "second.log")
        assert second.wait(timeout=4 * TIMEOUT_S) == EXIT_OK, (tmp_path / "second.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
        finish(producer, plog)
    log = (tmp_path / "second.log").read_text()
    assert f"removing unfinished {partial}" in log
    assert f"resuming from {root / f'step_{last_complete:08d}'}" in log
    assert not list(root.glob("*.tmp-*"))
    assert steps(out) == list(range(1, 9))
    assert_loads(out)
    print(f"\nfault: kill -9 while writing {partial.name} (it held {left}): resumed from step {last_complete}; "
          f"{trained - last_complete} trained step(s) redone")


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A small filesystem of its own at `path`, if this user may mount one (root may); else False, said why."""
    path.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        problem = result.stderr.strip() or f"exit status {result.returncode}" if result.returncode else None
    except OSError as exc:  # no mount command
        problem = str(exc)
    if problem:
        print(f"\ncannot mount a tmpfs ({problem}): using RLIMIT_FSIZE instead")
    return problem is None


def test_disk_full_while_writing_a_checkpoint(tiny_model_dir, corpus, tmp_path):
    data = tmp_path / "data"
    write_seed_epochs(data, tiny_model_dir, corpus, epochs=1)
    small = tmp_path / "small"
    mounted = _mount_tmpfs(small, "16m")
    out = small / "out"
    flags = trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(data), "--epochs", "1", "--save_steps", "2")
    try:
        assert trainer_main([*flags, "--max_steps", "2"]) == EXIT_OK  # a good checkpoint at step 2
        limit = None
        if mounted:  # fill the disk, leaving room for a few metrics lines but not for a checkpoint
            stats = os.statvfs(small)
            with open(small / "filler", "wb") as filler:
                filler.write(b"\0" * (stats.f_bavail * stats.f_frsize - (32 << 10)))
        else:  # the same OSError path: files beyond 64 KiB cannot be written (Python ignores SIGXFSZ)
            limit = 64 << 10

        def limited():
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        log_path = tmp_path / "full.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "trainer", *flags, "--max_steps", "6"], cwd=REPO,
                                       stdout=log, stderr=subprocess.STDOUT, preexec_fn=limited)
        assert process.wait(timeout=4 * TIMEOUT_S) == EXIT_ERROR, log_path.read_text()
        text = log_path.read_text()
        errno = "No space left on device" if mounted else "File too large"
        failed = [line for line in text.splitlines()
                  if f"could not write checkpoint {out / 'checkpoints' / 'step_00000004'}" in line]
        assert failed and errno in failed[0] and "earlier checkpoints are intact" in failed[0], text
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
        assert Checkpoints.load_state(out / "checkpoints" / "step_00000002")["step"] == 2
        from transformers import BertForPreTraining

        BertForPreTraining.from_pretrained(str(out / "checkpoints" / "step_00000002"))

        (small / "filler").unlink(missing_ok=True)  # space again: the same command resumes from step 2
        with captured_log() as lines:
            assert trainer_main([*flags, "--max_steps", "6"]) == EXIT_OK
        assert any("resuming from" in line and "step_00000002" in line for line in lines)
        assert steps(out) == [1, 2, 3, 4, 5, 6]
        assert_loads(out)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], check=False)
    print(f"\nfault: disk full ({'tmpfs' if mounted else 'RLIMIT_FSIZE'}) at the step-4 checkpoint: exit 1 naming "
          "the path; step 2 intact and resumed from; 2 trained steps redone")


# --- bad input at a real trainer's socket ---------------------------------------------------------------------


def _fields(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False)


def _packed(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _with_array(frame: bytes, name: str, change) -> bytes:
    fields = copy.deepcopy(_fields(frame))
    dtype, shape, data = fields["arrays"][name]
    array = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    array = change(array)
    fields["arrays"][name] = [array.dtype.str, list(array.shape), np.ascontiguousarray(array).tobytes()]
    return _packed(fields)


def _with(frame: bytes, key: str, value) -> bytes:
    fields = copy.deepcopy(_fields(frame))
    fields[key] = value
    return _packed(fields)


def _set(array: np.ndarray, index, value) -> np.ndarray:
    array[index] = value
    return array


def bad_messages(template: bytes, vocab_size: int) -> dict[str, bytes]:
    """One of every kind of bad message, each made from a valid one."""
    rng = np.random.default_rng(0)
    return {
        "random bytes": rng.bytes(1000),
        "empty frame": b"",
        "truncated msgpack": template[: len(template) // 2],
        "one byte short": template[:-1],
        "protocol version 1": _with(template, "v", 1),
        "float input_ids": _with_array(template, "input_ids", lambda a: a.astype("<f4")),
        "int64 labels": _with_array(template, "masked_labels", lambda a: a.astype("<i8")),
        "shape: one row short": _with_array(template, "token_type_ids", lambda a: a[:-1]),
        "shape: a column more": _with_array(template, "input_ids", lambda a: np.pad(a, ((0, 0), (0, 1)))),
        "token id = vocab size": _with_array(template, "input_ids", lambda a: _set(a, (0, 1), vocab_size)),
        "token id 65535": _with_array(template, "input_ids", lambda a: _set(a, (3, 2), 65535)),
        "label = vocab size": _with_array(template, "masked_labels", lambda a: _set(a, (0, 0), vocab_size)),
        "label -5": _with_array(template, "masked_labels", lambda a: _set(a, (1, 0), -5)),
        "absurd: token type 7": _with_array(template, "token_type_ids", lambda a: _set(a, (0, 2), 7)),
        "absurd: NSP label 9": _with_array(template, "next_sentence_labels", lambda a: _set(a, 0, 9)),
        "absurd: length 0": _with_array(template, "lengths", lambda a: _set(a, 0, 0)),
        "absurd: length 60000": _with_array(template, "lengths", lambda a: _set(a, 0, 60000)),
        "absurd: position on [CLS]": _with_array(template, "masked_positions", lambda a: _set(a, (0, 0), 0)),
        "absurd: worker 2^40": _with(template, "worker", 1 << 40),
        "absurd: epoch -1": _with(template, "epoch", -1),
    }


def test_bad_messages_at_a_real_trainer_are_rejected_and_training_is_unaffected(tiny_model_dir, corpus, tmp_path):
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=8)
    valid = [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(batches)]
    bad = bad_messages(valid[1], len(tiny_vocab()))
    limit = 64 << 10  # --max_message_bytes, and so the trainer socket's ZMQ_MAXMSGSIZE

    # The reference: the same trainer, in this process, fed only the valid messages. --mix_rows 0 in both runs:
    # micro-batches in arrival order, so the valid messages train the same way however the bad ones are timed
    # (the mixing pool's draws depend on when the stream pauses).
    reference, endpoint = tmp_path / "reference", free_tcp_endpoint()
    sender = Sender(endpoint, valid, reference)
    sender.start()
    assert trainer_main(trainer_flags(tiny_model_dir, reference, "--bind", endpoint, "--max_steps", str(len(valid)),
                                      "--data_timeout", str(TIMEOUT_S), "--mix_rows", "0")) == EXIT_OK
    sender.join(TIMEOUT_S)

    out, endpoint, log_path = tmp_path / "out", free_tcp_endpoint(), tmp_path / "trainer.log"
    trainer = start_trainer(trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", str(len(valid)),
                                          "--max_message_bytes", str(limit), "--data_timeout", str(TIMEOUT_S),
                                          "--mix_rows", "0"),
                            log_path)
    context = zmq.Context()
    try:
        wait_for(log_path, rf"listening on {re.escape(endpoint)}", trainer)
        # A frame above the limit, on a connection of its own: ZeroMQ drops it unread and closes the connection;
        # the sending socket reconnects by itself, and a valid message sent after that is trained on.
        side = context.socket(zmq.PUSH)
        side.setsockopt(zmq.LINGER, 5000)
        monitor = side.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        side.connect(endpoint)
        events = []

        def next_event() -> str:
            assert monitor.poll(TIMEOUT_S * 1000), f"no socket event after {events}"
            events.append(zmq.Event(recv_monitor_message(monitor)["event"]).name)
            return events[-1]

        assert next_event() == "HANDSHAKE_SUCCEEDED"
        side.send(np.random.default_rng(1).bytes(limit + 1))
        assert next_event() == "DISCONNECTED"
        assert next_event() == "HANDSHAKE_SUCCEEDED"
        side.send(valid[0])
        wait_for_step(out, 1, trainer, log_path)

        # Every kind of bad message, each among valid ones, on another connection.
        started = time.monotonic()
        frames, rest = [], list(valid[1:])
        for i, frame in enumerate(bad.values()):
            frames.append(frame)
            if i % 3 == 2 and rest:
                frames.append(rest.pop(0))
        frames += rest  # the last frame is valid: when it has trained, every bad one was read
        main = context.socket(zmq.PUSH)
        main.setsockopt(zmq.LINGER, 5000)
        main.connect(endpoint)
        for frame in frames:
            main.send(frame)
        assert trainer.wait(timeout=4 * TIMEOUT_S) == EXIT_OK, log_path.read_text()
        elapsed = time.monotonic() - started
        for socket in (side, main, monitor):
            socket.close(linger=0)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        context.term()

    last = last_record(out)
    assert last["step"] == len(valid)
    assert last["messages_rejected"] == len(bad)
    assert last["messages_received"] == len(valid) + len(bad), "the oversized frame never reached the trainer"
    text = log_path.read_text()
    notes = re.findall(r"stream: rejected (\d+) message\(s\) \((\d+) in all\)", text)
    assert notes and int(notes[0][0]) >= 1
    assert len(notes) <= 1 + elapsed / 5.0, notes  # REJECT_NOTE_S: a bounded rate, not one line per message
    trained, expected = state_dict_of(out), state_dict_of(reference)
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    print(f"\nfault: {len(bad)} bad messages among {len(valid)} valid: {len(bad)} rejected, {len(notes)} log "
          f"line(s) in {elapsed:.1f} s; the oversized frame dropped by ZeroMQ ({' -> '.join(events)}); the model "
          "equals the one trained on the valid messages alone")


# --- bad corpora and flags at the producer command ----------------------------------------------------------


def run_producer(model: Path, corpus: Path | str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
         "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
         "--epochs_to_generate", "1", "--num_workers", "1", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("bertstream-producer: error: ")]
    return line


LONG = " ".join(["alpha bravo charlie delta echo foxtrot golf hotel"] * 20)  # 160 words: far beyond 32 tokens

CORPORA = {
    "empty file": (b"", "error"),
    "one document": (b"first sentence here\nsecond sentence here\n", "error"),
    "non-UTF-8 bytes": ("one two\n\nthree four\ncaf\xe9 au lait\n".encode("latin-1"), "error"),
    "one-sentence documents": (b"".join(f"document {d} alpha bravo\n\n".encode() for d in range(6)), "ok"),
    "sentence longer than max_seq_len": (f"{LONG}\nshort one\n\nalpha bravo\n\n{LONG}\n".encode(), "ok"),
}


@pytest.mark.parametrize("case", list(CORPORA) + ["a directory"])
def test_corpus_edge_cases_at_the_producer_command(case, tiny_model_dir, tmp_path):
    if case == "a directory":
        path = tmp_path / "folder"
        path.mkdir()
        assert f"{path}: is a directory" in one_error_line(run_producer(tiny_model_dir, path, tmp_path))
        return
    content, outcome = CORPORA[case]
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    result = run_producer(tiny_model_dir, path, tmp_path, "--max_seq_len", "32")
    if outcome == "error":
        line = one_error_line(result)
        assert str(path) in line, line
        if case == "non-UTF-8 bytes":
            assert f"{path}:4:" in line and "0xe9" in line, line
        else:
            assert "next-sentence prediction" in line and "blank line" in line, line
        assert not list((tmp_path / "cache").glob("index-*")), "a refused corpus leaves no index"
        return
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "epoch_0.json").read_text().splitlines()]
    assert records and all(len(r["tokens"]) <= 32 for r in records)
    if case == "one-sentence documents":
        assert all(r["is_random_next"] for r in records)


@pytest.mark.parametrize("command, flags, message", [
    ("producer", ["--masked_lm_prob", "1.5"], "--masked_lm_prob 1.5: must be in (0, 1]"),
    ("producer", ["--max_seq_len", "4"], "--max_seq_len 4: must be between 8 and 512"),
    ("producer", ["--max_seq_len", "128"], "--max_seq_len 128: above the model's max_position_embeddings 64"),
    ("trainer", ["--train_batch_size", "30", "--gradient_accumulation_steps", "4"],
     "--train_batch_size 30 is not divisible by --gradient_accumulation_steps 4"),
])
def test_out_of_range_flags_are_refused_before_any_work(command, flags, message, tiny_model_dir, tiny_corpus,
                                                        tmp_path):
    if "--max_seq_len" in flags and "128" in flags:  # a model with fewer positions than the producer's sequences
        tiny_model_dir = write_tiny_model(tmp_path / "short_model", max_position_embeddings=64, with_weights=False)
    if command == "producer":
        argv = ["--train_corpus", str(tiny_corpus), "--bert_model", str(tiny_model_dir), "--cache_dir",
                str(tmp_path / "cache"), "--connect", "tcp://127.0.0.1:9", *flags]
    else:
        argv = ["--bert_model", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), *flags]
    result = subprocess.run([sys.executable, "-m", command, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("cache/index-*")), "work was started"
