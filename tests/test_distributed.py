"""Data-parallel training under torchrun: two CPU ranks (gloo) fed by real producer processes on real sockets.

Each run starts `torchrun --standalone --nproc_per_node 2 -m trainer ... --no_cuda`, exactly as a user would,
and reads what the ranks say in their own lines (`rankN` in every line) and what rank 0 wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from common.wire import decode
from conftest import REPO, free_port, write_corpus
from trainer import EXIT_ERROR
from trainer.cli import main
from trainer_support import (stop, TIMEOUT_S, Sender, captured_log, message, real_batches, state_dict_of, train_records,
                             run_to_end, trainer_flags, write_seed_epochs)

RUN_TIMEOUT_S = 4 * TIMEOUT_S  # a guard against hangs (the point of these tests), never a speed assertion
FINISHED = re.compile(r"rank(\d) INFO rank \d finished at step (\d+) after (\d+) step\(s\) of its own data; "
                      r"parameter checksum ([0-9a-f]{16})")
# What a finished run leaves in --output_dir (rank 0's files); anything else was written by another rank.
FINAL_FILES = {"metrics.jsonl", "checkpoints", "config.json", "model.safetensors", "generation_config.json",
               "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("distributed_corpus") / "corpus.txt", num_documents=60)


def free_port_pair() -> int:
    """A port p with p + 1 free too: the two ranks bind p and p + 1."""
    return free_port(2)


def environment() -> dict[str, str]:
    bin_dir = Path(sys.executable).parent  # torchrun of this environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONFAULTHANDLER": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def start_torchrun(model: Path, out: Path, port: int | None, log_path: Path, *flags: str,
                   entry: tuple[str, ...] = ("-m", "trainer")) -> subprocess.Popen:
    """Two ranks on the CPU; they bind `port` and `port` + 1 (no port: the flags name another source)."""
    source = ("--bind", f"tcp://127.0.0.1:{port}") if port else ()
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", *entry,
               *trainer_flags(model, out, *source, "--no_cuda", *flags)]
    with open(log_path, "a") as log:
        return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)


def start_producer(model: Path, corpus: Path, port: int, tmp_path: Path, name: str, seed: int,
                   *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
               "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--connect", f"tcp://127.0.0.1:{port}",
               "--ranks_per_endpoint", "2", "--num_workers", "1", "--seed", str(seed), "--max_seq_len", "64",
               "--batch_size", "4", *flags]
    with open(tmp_path / f"{name}.log", "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)


def finished_lines(log: str) -> dict[int, tuple[int, int, str]]:
    """rank -> (final step, steps trained in this run, parameter checksum), from each rank's last line."""
    return {int(m[1]): (int(m[2]), int(m[3]), m[4]) for m in FINISHED.finditer(log)}


def rank_lines(log: str, rank: int) -> list[str]:
    return [line for line in log.splitlines() if f" rank{rank} " in line]


def fed_by(log: str, rank: int, producer: subprocess.Popen) -> bool:
    """Whether `rank` trained on batches of `producer` (each rank names every producer on its first batch)."""
    return any(re.search(rf"stream: batches from producer \S+:{producer.pid}$", line) for line in rank_lines(log, rank))


def wait_for_line(log_path: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if text in log_path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"never logged {text!r} (exit {process.poll()})")


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if any(r["step"] >= step for r in train_records(out)):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()})")


def test_two_cpu_ranks_train_in_step_on_two_producers(tiny_model_dir, corpus, tmp_path):
    """Same steps on both ranks, identical parameters at the end, rank 0 alone writes; then a resume with
    another number of processes is refused."""
    from transformers import BertForPreTraining

    from trainer.distributed import parameter_checksum

    port, out, log_path = free_port_pair(), tmp_path / "out", tmp_path / "torchrun.log"
    producers = [start_producer(tiny_model_dir, corpus, port, tmp_path, f"producer{i}", seed=i) for i in (1, 2)]
    # 8 instances a step = 2 ranks x 2 accumulation steps x micro-batches of 2.
    trainer = start_torchrun(tiny_model_dir, out, port, log_path, "--max_steps", "8", "--logging_steps", "2",
                             "--save_steps", "4", "--gradient_accumulation_steps", "2",
                             "--data_timeout", str(TIMEOUT_S))
    code, log = run_to_end(trainer, log_path, *producers)
    assert code == 0, log[-4000:]

    finished = finished_lines(log)
    assert sorted(finished) == [0, 1], log[-4000:]
    assert finished[0][:2] == finished[1][:2] == (8, 8)  # the same number of optimizer steps on both ranks
    assert finished[0][2] == finished[1][2]  # identical parameters
    assert parameter_checksum(BertForPreTraining.from_pretrained(str(out))) == finished[0][2]  # and rank 0 saved them
    assert "micro-batch 2 x 2 accumulation x 2 rank(s)" in log
    assert all(fed_by(log, rank, producer) for rank in (0, 1) for producer in producers)  # all feed all

    records = train_records(out)
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # written once: by one process
    for record in records:
        assert len(record["rank_seq_per_s"]) == len(record["rank_data_wait_frac"]) == 2
        assert record["seq_per_s"] == pytest.approx(sum(record["rank_seq_per_s"]))
        assert record["data_wait_frac"] == max(record["rank_data_wait_frac"])
        assert record["messages_received"] > 0 and record["messages_rejected"] == 0
    assert {p.name for p in out.iterdir()} <= FINAL_FILES, sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    rank1 = "\n".join(rank_lines(log, 1))
    assert rank1 and "checkpoint:" not in rank1 and "done:" not in rank1 and "metrics" not in rank1

    with captured_log() as lines:  # one process on the checkpoint two wrote
        code = main(trainer_flags(tiny_model_dir, out, "--bind", f"tcp://127.0.0.1:{port}", "--no_cuda",
                                  "--max_steps", "10"))
    assert code == EXIT_ERROR
    assert any(f"checkpoint {out / 'checkpoints' / 'step_00000008'} was written by 2 rank(s); this run has 1"
               in line and "--no_resume" in line for line in lines), lines


def test_a_producer_leaves_and_another_joins_without_a_hang(tiny_model_dir, corpus, tmp_path):
    """The first producer is stopped early, and has at most one epoch (~120 instances) to give anyway: the run
    needs 320, so the ranks starve, unevenly, until the second producer joins and feeds both."""
    port, out, log_path = free_port_pair(), tmp_path / "out", tmp_path / "torchrun.log"
    first = start_producer(tiny_model_dir, corpus, port, tmp_path, "first", 1, "--epochs", "1")
    trainer = start_torchrun(tiny_model_dir, out, port, log_path, "--max_steps", "40", "--logging_steps", "2",
                             "--save_steps", "0", "--data_timeout", str(TIMEOUT_S),
                             entry=("--no-python", "bertstream-trainer"))  # the console script, as users run it
    second = None
    try:
        wait_for_step(out, 2, trainer)
        stop(first)  # SIGTERM (if its epoch is not sent yet): its workers stop and it exits
        time.sleep(1.0)  # the ranks drain what was queued and wait, each on its own socket
        assert trainer.poll() is None
        second = start_producer(tiny_model_dir, corpus, port, tmp_path, "second", 2)
        code = trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer, first, *([second] if second else []))
    log = log_path.read_text()
    assert code == 0, log[-4000:]
    finished = finished_lines(log)
    assert finished[0] == finished[1] and finished[0][:2] == (40, 40)
    assert all(fed_by(log, rank, producer) for rank in (0, 1) for producer in (first, second))
    assert train_records(out)[-1]["step"] == 40


def test_sigterm_stops_every_rank_at_one_step_and_the_run_resumes(tiny_model_dir, corpus, tmp_path):
    """A producer with one epoch (~120 instances) for a run of 320: the ranks end up waiting for data, one of
    them perhaps with its step's batches in hand. SIGTERM stops both at the same step with a checkpoint, and
    the same command, fed by a new producer, resumes there and finishes."""
    port, out, log_path = free_port_pair(), tmp_path / "out", tmp_path / "torchrun.log"
    flags = ("--max_steps", "40", "--logging_steps", "2", "--save_steps", "0", "--data_timeout", str(TIMEOUT_S))
    first = start_producer(tiny_model_dir, corpus, port, tmp_path, "first", 1, "--epochs", "1")
    trainer = start_torchrun(tiny_model_dir, out, port, log_path, *flags)
    second = None
    try:
        wait_for_step(out, 2, trainer)
        first.wait(timeout=RUN_TIMEOUT_S)  # its epoch is out: the run cannot finish on what it sent
        trainer.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        trainer.wait(timeout=RUN_TIMEOUT_S)  # torchrun's own status is 1 after a signal; the ranks say 75
        stopped = {int(m[1]): int(m[2]) for m in re.finditer(r"rank(\d) WARNING stopped at step (\d+); checkpoint",
                                                             log_path.read_text())}
        assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1], log_path.read_text()[-4000:]
        step = stopped[0]
        assert 2 <= step < 40 and (out / "checkpoints" / f"step_{step:08d}").is_dir()

        second = start_producer(tiny_model_dir, corpus, port, tmp_path, "second", 2)
        trainer = start_torchrun(tiny_model_dir, out, port, log_path, *flags)  # the same command again
        code = trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer, first, *([second] if second else []))
    log = log_path.read_text()
    assert code == 0, log[-4000:]
    finished = finished_lines(log)
    assert finished[0] == finished[1] and finished[0][:2] == (40, 40 - step)
    assert [r["step"] for r in train_records(out)] == [s for s in range(2, 41, 2) if s <= step] + \
        [s for s in range(2, 41, 2) if s > step]  # each step once, across both runs


def test_a_rank_without_data_ends_every_rank(tiny_model_dir, corpus, tmp_path):
    """Batches for rank 0 only: rank 1's --data_timeout ends it, and rank 0, waiting at the vote with its
    data in hand, ends too instead of waiting forever."""
    port, out, log_path = free_port_pair(), tmp_path / "out", tmp_path / "torchrun.log"
    batches = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=4, count=4)
    trainer = start_torchrun(tiny_model_dir, out, port, log_path, "--max_steps", "20", "--data_timeout", "2")
    try:
        wait_for_line(log_path, f"rank0 INFO stream: listening on tcp://127.0.0.1:{port}", trainer)
        sender = Sender(f"tcp://127.0.0.1:{port}", [message(tiny_model_dir, b) for b in batches], out)
        sender.start()
        trainer.wait(timeout=RUN_TIMEOUT_S)
        sender.join(timeout=TIMEOUT_S)
    finally:
        stop(trainer)
    log = log_path.read_text()
    assert any(f"no batch on tcp://127.0.0.1:{port + 1} for" in line and "--ranks_per_endpoint 2" in line
               for line in rank_lines(log, 1)), log[-4000:]
    assert any("rank 1 failed" in line for line in rank_lines(log, 0)), log[-4000:]
    assert not (out / "model.safetensors").exists()


def test_a_producer_deals_its_batches_out_to_every_rank_once(tiny_model_dir, corpus, tmp_path):
    """--ranks_per_endpoint 2 against two PULL sockets bound as two ranks bind them: every batch of the epoch
    reaches exactly one of them, and both get a share."""
    port = free_port_pair()
    with zmq.Context() as ctx:
        sockets = []
        for rank in range(2):
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(f"tcp://127.0.0.1:{port + rank}")
            sockets.append(pull)
        command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model",
                   str(tiny_model_dir), "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--connect",
                   f"tcp://127.0.0.1:{port}", "--ranks_per_endpoint", "2", "--num_workers", "2", "--epochs", "1",
                   "--max_seq_len", "64", "--batch_size", "4"]
        producer = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        received: list[list[tuple]] = [[], []]
        poller = zmq.Poller()
        for pull in sockets:
            poller.register(pull, zmq.POLLIN)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        quiet_since = None
        while time.monotonic() < deadline:
            ready = dict(poller.poll(200))
            for rank, pull in enumerate(sockets):
                if pull in ready:
                    header = decode(pull.recv()).header
                    received[rank].append((header.worker, header.epoch, header.sequence))
            if ready or producer.poll() is None:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:  # the producer is done and nothing more arrives
                break
        for pull in sockets:
            pull.close()
        stop(producer)
    assert producer.returncode == 0, producer.stderr.read().decode()[-2000:]
    ours, theirs = set(received[0]), set(received[1])
    assert ours and theirs and not ours & theirs
    assert len(ours) == len(received[0]) and len(theirs) == len(received[1])  # no batch twice on one rank
    workers = {w for w, _, _ in ours | theirs}
    assert {0, 1} <= workers
    for worker in workers:  # nothing lost either: each worker's sequence numbers run 0 .. n-1 over both ranks
        sequences = sorted(s for w, _, s in ours | theirs if w == worker)
        assert sequences == list(range(len(sequences)))


def test_ipc_endpoints_expand_as_the_ranks_bind_them(tmp_path, monkeypatch):
    from producer import cli as producer_cli

    parser = producer_cli.build_parser()
    config = producer_cli.parse_config(parser, ["--train_corpus", "c.txt", "--bert_model", "m", "--connect",
                                                f"ipc://{tmp_path}/s", "--ranks_per_endpoint", "2"])
    assert config.stream.endpoints == (f"ipc://{tmp_path}/s-0", f"ipc://{tmp_path}/s-1")
    from trainer.config import DistributedConfig

    ranks = [DistributedConfig(local_rank=r, rank=r, world_size=2, local_world_size=2) for r in range(2)]
    assert tuple(r.endpoint(f"ipc://{tmp_path}/s") for r in ranks) == config.stream.endpoints


def test_two_ranks_train_as_one_process_accumulating_the_same_batches(tiny_model_dir, corpus, tmp_path):
    """--train_batch_size stays the total: on the same pregenerated data, two ranks with micro-batches of 4
    take the same steps as one process accumulating two micro-batches of 4 (dropout off, so they can match)."""
    import json

    import numpy as np

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    write_seed_epochs(tmp_path / "data", model, corpus, epochs=1)
    flags = ("--pregenerated_data", str(tmp_path / "data"), "--max_steps", "10", "--logging_steps", "5",
             "--save_steps", "0", "--no_cuda")

    assert main(trainer_flags(model, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2")) == 0
    trainer = start_torchrun(model, tmp_path / "two", None, tmp_path / "torchrun.log", *flags)
    try:
        code = trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer)
    assert code == 0, (tmp_path / "torchrun.log").read_text()[-4000:]

    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [5, 10]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["lr"] == pytest.approx(a["lr"])
    alone, together = state_dict_of(tmp_path / "one"), state_dict_of(tmp_path / "two")
    before = state_dict_of(model)
    for name, weights in alone.items():
        assert np.allclose(together[name], weights, atol=1e-5), name
    assert not np.allclose(alone["bert.pooler.dense.weight"], before["bert.pooler.dense.weight"])


@pytest.mark.parametrize("spelling", ["--local_rank", "--local-rank"])  # the seed's, and torch.distributed.launch's
def test_the_seeds_local_rank_flag_is_accepted(spelling, tmp_path, monkeypatch):
    from trainer.cli import parse_args

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = parse_args(["--bert_model", "m", "--output_dir", str(tmp_path), spelling, "0"])
    assert config.distributed.local_rank == 0 and config.distributed.world_size == 1
    monkeypatch.setenv("LOCAL_RANK", "0")  # the same value from torchrun's environment is no conflict
    assert parse_args(["--bert_model", "m", "--output_dir", str(tmp_path), spelling, "0"]).distributed.local_rank == 0
