"""One command from a corpus (`--train_corpus`): the trainer starts the producer's program itself, trains, stops it.

Every test runs the real trainer as a process, whose real producer child streams over a real ipc socket, and
checks what a user would see: the model in --output_dir, the exit status, and no producer process left
(read from /proc by the producer's process group, so workers that outlived their supervisor count too).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_tcp_endpoint, write_corpus
from trainer import EXIT_STOPPED, EXIT_USAGE
from trainer.cli import main
from trainer_support import TIMEOUT_S, run_to_end, start_trainer, stop, train_records

RUN_TIMEOUT_S = 4 * TIMEOUT_S  # a guard against hangs, never a speed assertion
STARTED = re.compile(r"local producer: pid (\d+) streaming")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads processes from /proc and relies on PR_SET_PDEATHSIG (Linux)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("local_corpus") / "corpus.txt", num_documents=40)


def seed_command(corpus: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """simple_lm_finetuning.py's command line, unchanged, then a small run's flags (and a private index cache)."""
    return ["--train_corpus", str(corpus), "--bert_model", str(model), "--do_lower_case", "--output_dir", str(out),
            "--do_train",
            "--max_steps", "3", "--train_batch_size", "4", "--no_cuda", "--max_seq_length", "64",
            "--num_workers", "1", "--batch_size", "8", "--logging_steps", "1", "--save_steps", "0",
            "--cache_dir", str(out.parent / "cache"), *extra]


def live_in_group(pgid: int) -> list[int]:
    """Pids of this process group that are not zombies (an orphan's zombie waits for a reaper and is no process)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:  # ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def producer_pid(log_path: Path, process: subprocess.Popen) -> int:
    """The pid the trainer logs for the producer it started (its process group has the same id)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        match = STARTED.search(log_path.read_text())
        if match:
            return int(match[1])
        time.sleep(0.1)
    raise AssertionError(f"the trainer never started a producer (exit {process.poll()}): "
                         f"{log_path.read_text()[-3000:]}")


def wait_for_step(out: Path, step: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if any(r["step"] >= step for r in train_records(out)):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()}): {log_path.read_text()[-3000:]}")


def wait_gone(pgid: int) -> list[int]:
    """The group's live pids once it has emptied, or when the guard runs out (then the test fails naming them)."""
    deadline = time.monotonic() + TIMEOUT_S
    while (left := live_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_seed_command_line_trains_and_leaves_a_loadable_model(tiny_model_dir, corpus, tmp_path):
    from transformers import BertForPreTraining

    out, log_path = tmp_path / "out", tmp_path / "trainer.log"
    trainer = start_trainer(seed_command(corpus, tiny_model_dir, out), log_path)
    code, log = run_to_end(trainer, log_path)
    assert code == 0, log[-4000:]
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    model = BertForPreTraining.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    pid = int(STARTED.search(log)[1])
    assert re.search(rf"stream: batches from producer \S+:{pid}$", log, re.MULTILINE), log[-4000:]
    assert "stream: first batch: max_seq_len 64" in log  # --max_seq_length reached the producer
    assert live_in_group(pid) == []


def test_sigterm_stops_the_trainer_with_a_checkpoint_and_its_producer(tiny_model_dir, corpus, tmp_path):
    out, log_path = tmp_path / "out", tmp_path / "trainer.log"
    trainer = start_trainer(seed_command(corpus, tiny_model_dir, out, "--max_steps", "100000"), log_path)
    try:
        pid = producer_pid(log_path, trainer)
        wait_for_step(out, 2, trainer, log_path)
        assert live_in_group(pid), "the producer's group should be running while the trainer trains"
        trainer.send_signal(signal.SIGTERM)
        code = trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer)
    assert code == EXIT_STOPPED, log_path.read_text()[-4000:]
    assert wait_gone(pid) == []


def test_a_killed_trainer_leaves_no_producer_behind(tiny_model_dir, corpus, tmp_path):
    """SIGKILL runs no `finally`: PR_SET_PDEATHSIG stops the producer, which stops its workers."""
    out, log_path = tmp_path / "out", tmp_path / "trainer.log"
    trainer = start_trainer(seed_command(corpus, tiny_model_dir, out, "--max_steps", "100000"), log_path)
    try:
        pid = producer_pid(log_path, trainer)
        wait_for_step(out, 1, trainer, log_path)
        workers = [p for p in live_in_group(pid) if p != pid]
        assert workers, "the producer should have its worker processes while the trainer trains"
        trainer.kill()
        trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer)
    left = wait_gone(pid)
    for leftover in left:  # a failing run must not leave processes for the next test
        os.kill(leftover, signal.SIGKILL)
    assert left == [], f"producer processes outlived the killed trainer: {left}"


def test_remote_producers_may_still_connect(tiny_model_dir, corpus, tmp_path):
    """With --bind as well, one PULL socket takes the local producer's batches and a separate producer's."""
    endpoint = free_tcp_endpoint()
    out, log_path = tmp_path / "out", tmp_path / "trainer.log"
    remote_log = open(tmp_path / "remote.log", "w")
    remote = subprocess.Popen(
        [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(tiny_model_dir),
         "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--connect", endpoint, "--num_workers", "1",
         "--seed", "7", "--max_seq_len", "64", "--batch_size", "4"],
        cwd=REPO, stdout=remote_log, stderr=subprocess.STDOUT)
    # 40 steps of 4: enough batches that both producers' arrive (the PULL socket takes from each in turn).
    trainer = start_trainer(seed_command(corpus, tiny_model_dir, out, "--max_steps", "40", "--bind", endpoint,
                                         "--batch_size", "4"), log_path)
    try:
        code = trainer.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop(trainer, remote)
        remote_log.close()
    log = log_path.read_text()
    assert code == 0, log[-4000:]
    local = int(STARTED.search(log)[1])
    for pid in (local, remote.pid):
        assert re.search(rf"stream: batches from producer \S+:{pid}$", log, re.MULTILINE), (pid, log[-4000:])


@pytest.mark.parametrize("flags, message", [
    (["--max_seq_len", "64"], "--max_seq_len is a producer flag: it applies with --train_corpus"),
    (["--train_corpus", "CORPUS", "--max_seq_len", "4"], "--max_seq_len 4: must be between 8 and 512"),
    (["--train_corpus", "CORPUS", "--masked_lm_prob", "1.5"], "--masked_lm_prob 1.5: must be in (0, 1]"),
    (["--train_corpus", "/nonexistent.txt"], "--train_corpus /nonexistent.txt: no such file"),
    (["--train_corpus", "CORPUS", "--pregenerated_data", "."], "--train_corpus and --pregenerated_data . are two"),
])
def test_bad_producer_flags_are_refused_by_name(flags, message, corpus, tmp_path, capsys):
    flags = [str(corpus) if flag == "CORPUS" else flag for flag in flags]
    code = main(["--bert_model", "unused", "--output_dir", str(tmp_path / "out"), *flags])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"bertstream-trainer: error: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_two_cpu_ranks_under_torchrun_train_from_one_node_producer(tiny_model_dir, corpus, tmp_path):
    """Local rank 0 starts one producer for the node's two ranks (ipc PATH-0, PATH-1); both train to the end."""
    from test_distributed import finished_lines, rank_lines, start_torchrun

    out, log_path = tmp_path / "out", tmp_path / "torchrun.log"
    trainer = start_torchrun(tiny_model_dir, out, None, log_path, "--train_corpus", str(corpus), "--max_steps", "4",
                             "--num_workers", "1", "--max_seq_len", "64", "--batch_size", "4",
                             "--cache_dir", str(tmp_path / "cache"), "--save_steps", "0")
    code, log = run_to_end(trainer, log_path)
    assert code == 0, log[-4000:]
    assert sorted(finished_lines(log)) == [0, 1], log[-4000:]
    starts = STARTED.findall(log)
    assert len(starts) == 1, log[-4000:]  # one producer for the node, started by local rank 0
    pid = int(starts[0])
    for rank in (0, 1):
        assert any(re.search(rf"stream: batches from producer \S+:{pid}$", line)
                   for line in rank_lines(log, rank)), (rank, log[-4000:])
    assert wait_gone(pid) == []


def test_generation_and_source_flags_reach_the_producer_as_given(corpus, tmp_path):
    """Copied producer flags, the seed's spellings and the shared source flags; defaults are left to the producer."""
    from trainer.cli import parse_args

    base = ["--bert_model", "unused", "--output_dir", str(tmp_path / "out")]
    config = parse_args([*base, "--train_corpus", str(corpus), "--do_train", "--do_whole_word_mask",
                         "--max_seq_length", "64", "--masked_lm_prob", "0.15", "--text_field", "body",
                         "--num_train_epochs", "2"])
    assert config.local.producer_args == ("--do_whole_word_mask", "--max_seq_len", "64", "--text_field", "body")
    assert config.local.train_corpus == (str(corpus),)
    assert config.train.epochs == 2
    assert config.eval.text_field == "body"  # still the trainer's own flag for --eval_corpus
    argv = config.local.producer_argv("ipc:///tmp/x", 2)
    assert "--seed" not in argv  # the producer draws a fresh seed: a resumed run or another node never replays
    assert argv[argv.index("--ranks_per_endpoint") + 1] == "2"
    assert parse_args([*base, "--text_field", "body"]).local is None  # a shared flag alone is the trainer's
