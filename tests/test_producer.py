"""The producer end to end: real `python -m producer` processes pushing to real PULL sockets.

The corpus fixture's documents are recognisable from their tokens (document d's sentences all start
"document d"), so a received instance names the document it was generated from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from common.config import CorpusConfig, GenerationConfig
from common.index import build_or_load_index
from common.vocab import Vocabulary, load_tokenizer
from common.wire import Message, decode
from conftest import PRODUCER_WITHOUT_TORCH, REPO, source_documents, write_corpus, write_tiny_model
from producer import cli
from producer.supervisor import describe_exit
from producer.worker import WorkerJob, iter_worker_batches, worker_main

WORKER_STARTED = re.compile(r"worker (\d+) started: pid (\d+)")
TIMEOUT_S = 60  # a guard against hangs, never a speed assertion


# --- helpers ----------------------------------------------------------------------------------------------


def start_producer(model: Path, corpus: Path, tmp_path: Path, *flags: str, name: str = "producer",
                   new_session: bool = False):
    log_path = tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
               "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), *flags]
    with open(log_path, "w") as log:
        # PYTHONFAULTHANDLER: a producer that hangs is sent SIGABRT (see stop_hung) and prints where it was.
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "1"}, start_new_session=new_session)
    return process, log_path


def stop_hung(process: subprocess.Popen, log_path: Path, what: str):
    process.send_signal(signal.SIGABRT)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    raise AssertionError(f"{what}; log:\n{log_path.read_text()}")


def wait_for_log(log_path: Path, pattern: str, process: subprocess.Popen, count: int = 1) -> list:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.findall(pattern, log_path.read_text())
        if len(found) >= count:
            return found
        if process.poll() is not None:
            raise AssertionError(f"{pattern!r} not seen {count} times; log:\n{log_path.read_text()}")
        time.sleep(0.05)
    stop_hung(process, log_path, f"{pattern!r} not seen {count} times")


def worker_pids(log_path: Path, process: subprocess.Popen, num_workers: int) -> dict[int, int]:
    found = wait_for_log(log_path, WORKER_STARTED.pattern, process, num_workers)
    return {int(w): int(pid) for w, pid in found}


def process_state(pid: int) -> str | None:
    """The /proc state letter (R, S, Z, ...), or None once the process is gone and reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def finish(process: subprocess.Popen, log_path: Path) -> int:
    try:
        return process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_hung(process, log_path, "producer did not exit")


def collect(pull: zmq.Socket, process: subprocess.Popen, log_path: Path) -> list[Message]:
    """Every message until the producer has exited and nothing more arrives."""
    messages = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if pull.poll(100):
            messages.append(decode(pull.recv()))
        elif process.poll() is not None:
            while pull.poll(500):
                messages.append(decode(pull.recv()))
            return messages
    stop_hung(process, log_path, "producer did not finish")


@pytest.fixture
def pull(endpoint):
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(endpoint)
    yield socket
    socket.close(linger=0)
    context.term()


def expected_batches(model: Path, corpus: Path, tmp_path: Path, generation: GenerationConfig, *, seed: int,
                     worker: int, num_workers: int, batch_size: int, epochs: int | None):
    """The batches a worker must send, generated in this process from the index the producer cached."""
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model, True), True)
    index = build_or_load_index(CorpusConfig((str(corpus),), str(model), True, str(tmp_path / "cache")), vocab, 1)
    for epoch, batch in iter_worker_batches(index, generation, vocab, seed, worker, num_workers, batch_size,
                                            epochs=epochs):
        yield epoch, batch.instances(), batch


def assert_same_batch(got, want) -> None:
    """The same rows; a received batch is as wide as its longest row (common.wire), the rest was padding."""
    width = got.input_ids.shape[1]
    assert int(want.lengths.max()) <= width <= want.input_ids.shape[1]
    for name in got.FIELDS:
        expected = getattr(want, name)
        if name in ("input_ids", "token_type_ids"):
            assert not expected[:, width:].any(), name  # only padding was left out ([PAD] is id 0 here)
            expected = expected[:, :width]
        np.testing.assert_array_equal(getattr(got, name), expected, err_msg=name)


# --- the stream -------------------------------------------------------------------------------------------


def test_two_workers_source_every_document_exactly_once_per_epoch(tiny_model_dir, tiny_corpus, tmp_path, endpoint,
                                                                  pull):
    # max_seq_len 256 leaves room for any pair of these short documents, so no truncation cuts the
    # "document d" that opens segment A.
    generation = GenerationConfig(max_seq_len=256)
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--epochs", "2", "--batch_size", "4", "--max_seq_len", "256", "--seed", "42")
    messages = collect(pull, process, log)
    assert process.returncode == 0, log.read_text()
    vocab = Vocabulary.from_tokenizer(load_tokenizer(tiny_model_dir, True), True)

    assert {m.header.worker for m in messages} == {0, 1}
    assert {m.header.fingerprint for m in messages} == {vocab.fingerprint(256)}
    for epoch in (0, 1):
        owner: dict[int, int] = {}
        instances_per_document: dict[int, int] = {}
        for m in (m for m in messages if m.header.epoch == epoch):
            for doc in source_documents(m.batch, vocab):
                assert owner.setdefault(doc, m.header.worker) == m.header.worker, f"document {doc} in two workers"
                instances_per_document[doc] = instances_per_document.get(doc, 0) + 1
        assert sorted(owner) == list(range(40)), f"epoch {epoch}: documents missing"
        # Exactly once: each document gave exactly the instances that generating it once gives.
        for worker in (0, 1):
            expected: dict[int, int] = {}
            for e, instances, batch in expected_batches(tiny_model_dir, tiny_corpus, tmp_path, generation, seed=42,
                                                        worker=worker, num_workers=2, batch_size=4, epochs=2):
                if e == epoch:
                    for doc in source_documents(batch, vocab):
                        expected[doc] = expected.get(doc, 0) + 1
            assert {d: n for d, n in instances_per_document.items() if owner[d] == worker} == expected


def test_stream_is_reproducible_from_seed_and_worker_count(tiny_model_dir, tiny_corpus, tmp_path, endpoint, pull):
    generation = GenerationConfig()
    runs = []
    for seed in ("42", "42", "7"):
        process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint,
                                      "--num_workers", "2", "--epochs", "1", "--batch_size", "8", "--seed", seed,
                                      name=f"producer_{len(runs)}")
        messages = collect(pull, process, log)
        assert process.returncode == 0, log.read_text()
        runs.append({(m.header.worker, m.header.sequence): m.batch for m in messages})

    first, again, other_seed = runs
    assert first.keys() == again.keys()
    for key in first:
        assert_same_batch(again[key], first[key])
    for worker in (0, 1):
        expected = list(expected_batches(tiny_model_dir, tiny_corpus, tmp_path, generation, seed=42, worker=worker,
                                         num_workers=2, batch_size=8, epochs=1))
        assert sorted(seq for w, seq in first if w == worker) == list(range(len(expected)))
        for sequence, (_, _, batch) in enumerate(expected):
            assert_same_batch(first[worker, sequence], batch)
    differs = [key for key in first.keys() & other_seed.keys()
               if not np.array_equal(first[key].input_ids, other_seed[key].input_ids)]
    assert differs, "--seed 7 gave the same stream as --seed 42"


def test_killed_worker_is_restarted_and_resumes_after_what_it_sent(tiny_model_dir, tiny_corpus, tmp_path, endpoint,
                                                                   pull):
    generation = GenerationConfig()
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--batch_size", "2", "--hwm_batches", "1", "--progress_interval_s", "0.5",
                                  "--seed", "42")
    try:
        pids = worker_pids(log, process, 2)
        received: dict[tuple[int, int], object] = {}
        deadline = time.monotonic() + TIMEOUT_S

        def receive_until(done) -> None:
            while not done():
                assert time.monotonic() < deadline, f"stream stalled; log:\n{log.read_text()}"
                if pull.poll(100):
                    m = decode(pull.recv())
                    key = (m.header.worker, m.header.sequence)
                    assert key not in received, f"batch {key} received twice"
                    received[key] = m.batch

        receive_until(lambda: sum(w == 0 for w, _ in received) >= 5)
        os.kill(pids[0], signal.SIGKILL)
        restarted = wait_for_log(log, r"worker 0 started: pid (\d+), resuming", process)
        assert process_state(pids[0]) is None, "the killed worker was not reaped"
        before = max(seq for w, seq in received if w == 0)
        receive_until(lambda: max(seq for w, seq in received if w == 0) >= before + 60)
    finally:
        process.send_signal(signal.SIGTERM)
    assert finish(process, log) == 0
    text = log.read_text()
    assert f"worker 0 (pid {pids[0]}) killed by signal SIGKILL" in text
    assert int(restarted[0]) != pids[0]

    # Worker 1 was untouched: no gap. Worker 0 lost at most the batches queued in the dead process
    # (one run of consecutive numbers); everything received is exactly the deterministic stream.
    for worker in (0, 1):
        sequences = sorted(seq for w, seq in received if w == worker)
        missing = sorted(set(range(sequences[-1] + 1)) - set(sequences))
        if worker == 1:
            assert not missing
        elif missing:
            assert missing == list(range(missing[0], missing[-1] + 1)), missing
        batches = expected_batches(tiny_model_dir, tiny_corpus, tmp_path, generation, seed=42, worker=worker,
                                   num_workers=2, batch_size=2, epochs=None)
        for sequence, (_, _, batch) in zip(range(sequences[-1] + 1), batches):
            if (worker, sequence) in received:
                assert_same_batch(received[worker, sequence], batch)


# --- stopping ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["supervisor", "process group"])
def test_sigterm_while_streaming_leaves_no_process_behind(target, tiny_model_dir, tiny_corpus, tmp_path, endpoint,
                                                          pull):
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--batch_size", "4", new_session=True)
    pids = worker_pids(log, process, 2)
    assert pull.poll(TIMEOUT_S * 1000), log.read_text()
    decode(pull.recv())
    assert all(process_state(pid) is not None for pid in pids.values())
    if target == "supervisor":  # docker stop, kill PID
        process.send_signal(signal.SIGTERM)
    else:  # systemd, kill -- -PGID: the workers get it too and must stop as cleanly
        os.killpg(process.pid, signal.SIGTERM)
    assert finish(process, log) == 0, log.read_text()
    text = log.read_text()
    assert "SIGTERM received" in text and "ERROR" not in text, text
    assert {pid: process_state(pid) for pid in pids.values()} == {pid: None for pid in pids.values()}


def test_worker_stopped_alone_is_restarted(tiny_model_dir, tiny_corpus, tmp_path, endpoint, pull):
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--batch_size", "4")
    try:
        pids = worker_pids(log, process, 2)
        os.kill(pids[1], signal.SIGTERM)
        wait_for_log(log, r"worker 1 started: pid (\d+)", process, count=2)
    finally:
        process.send_signal(signal.SIGTERM)
    assert finish(process, log) == 0
    assert f"worker 1 (pid {pids[1]}) exited before finishing" in log.read_text()


def test_absent_trainer_never_hangs_shutdown(tiny_model_dir, tiny_corpus, tmp_path, endpoint):
    # Nobody binds `endpoint`. With --epochs the workers queue what fits, then must give up on the rest
    # after --linger_ms; stopped by SIGTERM while blocked, they must stop as well.
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--epochs", "1", "--linger_ms", "300", name="epochs")
    pids = worker_pids(log, process, 2)
    assert finish(process, log) == 0, log.read_text()
    assert all(process_state(pid) is None for pid in pids.values())

    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--batch_size", "1", "--linger_ms", "300", "--progress_interval_s", "0.2",
                                  name="forever")
    pids = worker_pids(log, process, 2)
    wait_for_log(log, r"blocked on socket 100%", process)
    process.send_signal(signal.SIGINT)
    assert finish(process, log) == 0, log.read_text()
    assert all(process_state(pid) is None for pid in pids.values())


def test_producer_exits_once_the_trainer_is_gone(tiny_model_dir, tiny_corpus, tmp_path, endpoint):
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    process, log = start_producer(tiny_model_dir, tiny_corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--trainer_gone_timeout_s", "1", "--linger_ms", "200")
    try:
        assert pull.poll(TIMEOUT_S * 1000), log.read_text()
        decode(pull.recv())
    finally:
        pull.close(linger=0)  # the trainer goes away
        context.term()
    assert finish(process, log) == 0, log.read_text()
    assert "no trainer on any endpoint" in log.read_text()


def test_worker_that_keeps_dying_stops_the_producer(tiny_model_dir, tmp_path, endpoint, pull):
    # The index file is truncated under the running producer: every worker that reads it dies of SIGBUS,
    # and so does every restart, until the supervisor gives up.
    corpus = write_corpus(tmp_path / "corpus.txt", num_documents=200)
    process, log = start_producer(tiny_model_dir, corpus, tmp_path, "--connect", endpoint, "--num_workers", "2",
                                  "--batch_size", "1", "--hwm_batches", "1")
    pids = worker_pids(log, process, 2)
    assert pull.poll(TIMEOUT_S * 1000), log.read_text()
    (tokens,) = (tmp_path / "cache").glob("index-*/tokens.npy")
    os.truncate(tokens, 128)
    deadline = time.monotonic() + TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if pull.poll(50):
            pull.recv()  # keep reading, so the workers keep generating
    assert finish(process, log) == 1, log.read_text()
    text = log.read_text()
    assert "killed by signal SIGBUS" in text
    assert "died 4 times within 60 s: giving up" in text
    assert all(process_state(pid) is None for pid in pids.values())


def _failing_body(job, config, stop, conn):
    raise RuntimeError(f"worker {job.worker} cannot go on")


def test_worker_exception_reaches_the_supervisor_with_its_traceback(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    job = WorkerJob(worker=3, num_workers=4, seed=0, generation=GenerationConfig(), vocab=None, index=None,
                    supervisor_pid=os.getpid())
    process = context.Process(target=worker_main, args=(_failing_body, job, None, context.RawValue("b", 0), writer))
    process.start()
    writer.close()
    process.join(TIMEOUT_S)
    assert process.exitcode == 1
    kind, worker, text = reader.recv()
    assert (kind, worker) == ("error", 3)
    assert "Traceback" in text and "RuntimeError: worker 3 cannot go on" in text
    assert describe_exit(1) == "exited with status 1"
    assert describe_exit(-9) == "killed by signal SIGKILL"


# --- the command line -------------------------------------------------------------------------------------


def parse(*argv: str) -> cli.ProducerConfig:
    return cli.parse_config(cli.build_parser(), ["--train_corpus", "c.txt", "--bert_model", "m", *argv])


@pytest.mark.parametrize("flags, message", [
    (["--connect", "tcp://127.0.0.1:5555", "--masked_lm_prob", "1.5"], "--masked_lm_prob 1.5: must be in (0, 1]"),
    (["--connect", "tcp://127.0.0.1:5555", "--max_seq_len", "4"], "--max_seq_len 4: must be between 8 and 512"),
    (["--connect", "tcp://127.0.0.1:5555", "--num_workers", "0"], "--num_workers 0: must be between 1 and 1024"),
    (["--connect", "tcp://127.0.0.1:5555", "--hwm_batches", "0"], "--hwm_batches 0: must be at least 1"),
    (["--connect", "localhost:5555"], "--connect localhost:5555: expected tcp://HOST:PORT or ipc://PATH"),
    ([], "give exactly one of --output_dir DIR"),
    (["--connect", "tcp://127.0.0.1:5555", "--output_dir", "out"], "give exactly one of --output_dir DIR"),
    (["--output_dir", "out", "--epochs", "2"], "--epochs 2: applies to streaming"),
])
def test_bad_flags_are_usage_errors_naming_flag_and_value(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_endpoint_expansion():
    config = parse("--connect", "tcp://trainer:5555", "--connect", "ipc:///tmp/x", "--ranks_per_endpoint", "1")
    assert config.generation == GenerationConfig(128, 0.1, 0.15, 20, False)
    assert (config.stream.batch_size, config.stream.hwm_batches, config.stream.linger_ms) == (512, 8, 2000)
    assert config.stream.epochs is None and config.pool.num_workers >= 1
    # Without --seed each parse draws its own seed (and says so); --seed N and --seed host stay as given.
    again = parse("--connect", "tcp://trainer:5555")
    assert config.pool.seed_drawn and again.pool.seed_drawn and config.pool.seed != again.pool.seed
    assert 0 <= config.pool.seed < 1 << 63
    assert parse("--connect", "tcp://t:1", "--seed", "42").pool == dataclasses.replace(config.pool, seed=42,
                                                                                       seed_drawn=False)
    assert parse("--connect", "tcp://t:1", "--seed", "host").pool.seed == cli.parse_seed("host")
    assert parse("--output_dir", "out").dump.epochs_to_generate == 3
    wide = parse("--connect", "tcp://trainer:5555", "--ranks_per_endpoint", "3")
    assert wide.stream.endpoints == ("tcp://trainer:5555", "tcp://trainer:5556", "tcp://trainer:5557")


def test_max_seq_len_above_the_model_positions_is_refused(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "short_model", max_position_embeddings=64, with_weights=False)
    parser = cli.build_parser()
    config = cli.parse_config(parser, ["--train_corpus", "c.txt", "--bert_model", str(model), "--output_dir", "o"])
    with pytest.raises(SystemExit) as exit_info:
        cli.check_against_model(parser, config, model)
    assert exit_info.value.code == 2
    assert "--max_seq_len 128: above the model's max_position_embeddings 64" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["corpus", "model"])
def test_missing_corpus_or_model_is_one_clear_line(what, tiny_model_dir, tiny_corpus, tmp_path):
    corpus = tmp_path / "nope.txt" if what == "corpus" else tiny_corpus
    model = tmp_path / "no_model" if what == "model" else tiny_model_dir
    result = subprocess.run(
        [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(corpus if what == "corpus" else model) in errors[0], result.stderr


def test_producer_never_imports_torch_or_transformers(tiny_model_dir, tiny_corpus, tmp_path):
    check = PRODUCER_WITHOUT_TORCH
    result = subprocess.run(
        [sys.executable, "-c", check, "--train_corpus", str(tiny_corpus), "--bert_model", str(tiny_model_dir),
         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--epochs_to_generate", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
