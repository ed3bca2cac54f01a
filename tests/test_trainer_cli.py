"""The trainer's command line: usage errors are refused before any work, naming the flag and the value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from trainer import EXIT_OK, EXIT_USAGE
from trainer.cli import DEFAULT_BIND, main, parse_args


@pytest.mark.parametrize("flags, message", [
    (["--train_batch_size", "30", "--gradient_accumulation_steps", "4"],
     "--train_batch_size 30 is not divisible by --gradient_accumulation_steps 4"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--loss_scale", "128"], "--loss_scale 128.0 applies only with --fp16"),
    (["--pregenerated_data", "/nonexistent/folder"], "--pregenerated_data /nonexistent/folder: not a directory"),
    (["--pregenerated_data", ".", "--bind", "tcp://127.0.0.1:6000"], "are two sources; give one"),
    (["--bind", "127.0.0.1:6000"], "--bind '127.0.0.1:6000': expected tcp://HOST:PORT"),
    (["--warmup_proportion", "1.5"], "--warmup_proportion must be in [0, 1), got 1.5"),
    (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--max_steps", "-1"], "--max_steps must be >= 0, got -1"),
    (["--data_timeout", "-2"], "--data_timeout must be >= 0 seconds"),
    (["--eval_corpus", "/nonexistent.txt"], "--eval_corpus /nonexistent.txt: no such file"),
    (["--eval_instances", "0"], "--eval_instances must be >= 1, got 0"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1, got 0"),
    (["--prefetch_batches", "0"], "--prefetch_batches must be >= 1, got 0"),
])
def test_bad_flags_exit_2_naming_flag_and_value(flags, message, tmp_path, capsys):
    code = main(["--bert_model", "unused", "--output_dir", str(tmp_path / "out"), *flags])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("env, flags, message", [
    ({"WORLD_SIZE": "2"}, [], "WORLD_SIZE=2 without LOCAL_RANK: start the processes with torchrun"),
    ({"LOCAL_RANK": "0"}, ["--local_rank", "1"], "--local_rank 1 but LOCAL_RANK=0: they select the GPU"),
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}, ["--train_batch_size", "32"],
     "--train_batch_size 32 is not divisible by --gradient_accumulation_steps 1 x 3 processes (WORLD_SIZE)"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, ["--bind", "tcp://127.0.0.1:*"],
     "--bind tcp://127.0.0.1:*: 2 processes on this node bind consecutive ports"),
])
def test_torchrun_environments_that_cannot_work_are_refused(env, flags, message, tmp_path, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["--bert_model", "m", "--output_dir", str(tmp_path), *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_each_rank_binds_its_own_endpoint(tmp_path, monkeypatch):
    """Rank l on a node binds --bind's port + l (what producers' --ranks_per_endpoint connects to)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = parse_args(["--bert_model", "m", "--output_dir", str(tmp_path), "--train_batch_size", "32",
                         "--gradient_accumulation_steps", "2"])
    assert config.train.micro_batch_size == 4  # 32 in all = 2 accumulation steps x 4 ranks x 4
    place = config.distributed
    assert (place.rank, place.world_size, place.local_rank, place.local_world_size) == (3, 4, 1, 2)
    assert place.endpoint("tcp://0.0.0.0:5555") == "tcp://0.0.0.0:5556"
    assert place.endpoint("ipc:///tmp/bertstream") == "ipc:///tmp/bertstream-1"


def test_the_seeds_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = parse_args(["--bert_model", "m", "--output_dir", str(tmp_path)])
    train = config.train
    assert (train.train_batch_size, train.learning_rate, train.warmup_proportion, train.epochs,
            train.gradient_accumulation_steps, train.seed) == (32, 3e-5, 0.1, 3, 1, 42)
    assert config.device.loss_scale == 0 and config.distributed.local_rank == -1
    assert config.source.bind == DEFAULT_BIND == "tcp://127.0.0.1:5555" and config.source.pregenerated_data is None
    assert train.micro_batch_size == 32 and train.resume


def test_torchrun_local_rank_is_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parse_args(["--bert_model", "m", "--output_dir", str(tmp_path)]).distributed.local_rank == 3


def test_the_cli_imports_no_torch_before_the_flags_are_checked():
    code = "import sys, trainer.cli; print(sorted({'torch', 'transformers', 'zmq'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_help_lists_the_exit_codes():
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == EXIT_OK
    assert "75 stopped by SIGTERM/SIGINT" in result.stdout and "--pregenerated_data" in result.stdout


def test_an_output_dir_that_cannot_be_made_is_an_error_naming_it(tiny_model_dir, tmp_path):
    from trainer import EXIT_ERROR
    from trainer_support import captured_log

    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out"
    with captured_log() as lines:
        code = main(["--bert_model", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "1"])
    assert code == EXIT_ERROR
    assert any(str(out) in line for line in lines if line.startswith("NotADirectoryError")), lines
