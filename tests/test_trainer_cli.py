"""The trainer's command line: usage errors are refused before any work, naming the flag and the value."""

from __future__ import annotations

import json
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


# --config FILE: flags from a YAML or JSON file, the command line winning ----------------------------------


def test_config_file_gives_flags_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"""# a run's flags, kept with the experiment
bert_model: some/model
output_dir: {out}
learning_rate: 5.0e-5
train_batch_size: 16
fp16: true
no_resume: true
lr_scheduler_type: cosine
warmup_proportion: 3e-2   # YAML 1.1 reads this as a string: parsed as the flag's float
""")
    config = parse_args(["--config", str(config_file), "--learning_rate", "1e-4", "--max_steps", "7"])
    assert config.model.bert_model == "some/model" and config.train.output_dir == str(out)  # required, from the file
    assert config.train.learning_rate == 1e-4  # the command line wins
    assert config.train.train_batch_size == 16 and config.train.max_steps == 7
    assert config.train.warmup_proportion == 0.03 and config.train.lr_scheduler_type == "cosine"
    assert config.device.fp16 and not config.train.resume
    assert config.train.epochs == 3  # neither: the default


def test_config_file_in_json(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"bert_model": "m", "output_dir": str(tmp_path / "out"),
                                       "gradient_accumulation_steps": 4, "bind": "tcp://127.0.0.1:6001",
                                       "--do_lower_case": True, "local-rank": 0}))
    config = parse_args(["--config", str(config_file), "--bert_model", "other"])
    assert config.model.bert_model == "other" and config.model.do_lower_case
    assert config.train.gradient_accumulation_steps == 4 and config.train.micro_batch_size == 8
    assert config.source.bind == "tcp://127.0.0.1:6001" and config.distributed.local_rank == 0


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "learning_rat: 1.0e-4\n", "run.yaml: unknown key 'learning_rat': not a flag of bertstream-trainer "
                                          "(did you mean 'learning_rate'?)"),
    ("bad.json", '{"eval_stps": 3}', "unknown key 'eval_stps': not a flag of bertstream-trainer "
                                     "(did you mean 'eval_steps'?)"),
    ("bad.yaml", "train_batch_size: 2.5\n", "train_batch_size: expected an int, got 2.5"),
    ("bad.yaml", "fp16: yes please\n", "fp16: expected true or false, got 'yes please'"),
    ("bad.yaml", "lr_scheduler_type: step\n",
     "lr_scheduler_type: expected one of linear, cosine, constant, got 'step'"),
    ("bad.yaml", "warmup_proportion: 1.5\n", "--warmup_proportion must be in [0, 1), got 1.5"),
    ("bad.yaml", "- learning_rate\n", "expected a mapping of flag names to values, got a list"),
    ("bad.yaml", "learning_rate: [1\n", "not valid YAML"),
    ("bad.json", "{learning_rate: 1}", "not valid JSON"),
    ("bad.toml", "learning_rate = 1\n", "expected a .json, .yaml or .yml file"),
])
def test_a_bad_config_file_is_refused_by_name(name, text, message, tmp_path, capsys):
    config_file = tmp_path / name.replace("bad", "run")
    config_file.write_text(text)
    code = main(["--config", str(config_file), "--bert_model", "m", "--output_dir", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err
    if not message.startswith("--"):  # a value the config class refuses is named by its flag, as on the command line
        assert f"--config {config_file}: " in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nowhere.yaml")]) == EXIT_USAGE
    assert f"--config {tmp_path / 'nowhere.yaml'}: No such file or directory" in capsys.readouterr().err


def test_required_flags_missing_from_file_and_command_line_are_still_required(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("bert_model: m\n")
    assert main(["--config", str(config_file)]) == EXIT_USAGE
    assert "the following arguments are required: --output_dir" in capsys.readouterr().err


def test_yaml_without_pyyaml_names_the_package(tmp_path):
    """With pyyaml absent (hidden from the import system here), a YAML --config says what to install."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("bert_model: m\n")
    code = ("import sys; sys.modules['yaml'] = None; from trainer.cli import main; "
            f"sys.exit(main(['--config', {str(config_file)!r}, '--output_dir', {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert "reading YAML needs the pyyaml package (pip install pyyaml); or give the flags as a .json file" in \
        result.stderr, result.stderr


def test_every_trainer_flag_is_declared_once():
    """The parser is made from declarations: each flag but --config is a trainer.config field's, or comes from a
    helper that declares it for both programs (the corpus-reading flags); none is declared twice."""
    import argparse

    from common.config import add_lower_case_flags
    from common.flags import flag_fields
    from common.readers import add_source_flags
    from trainer import config as trainer_config
    from trainer.cli import build_parser

    fields = ["--" + (how.name or field.name)
              for cls in (trainer_config.ModelConfig, trainer_config.SourceConfig, trainer_config.TrainConfig,
                          trainer_config.DeviceConfig, trainer_config.DistributedConfig, trainer_config.EvalConfig)
              for field, how, _ in flag_fields(cls)]
    shared = argparse.ArgumentParser(add_help=False)
    add_source_flags(shared)
    add_lower_case_flags(shared, "")
    helpers = [a.option_strings[0] for a in shared._actions]
    parser = build_parser()
    # --train_corpus's flags: the producer's own, copied from its parser (trainer/local_producers.py).
    local = [a for a in parser._actions if (getattr(a.container, "title", None) or "").startswith("one command")]
    parsed = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.dest not in ("help", "config") and all(a is not b for b in local)]
    assert sorted(parsed) == sorted(fields + helpers)
    assert len(set(fields + helpers)) == len(fields + helpers)


def test_config_file_reaches_the_local_producers_flags(tmp_path, monkeypatch):
    """--train_corpus and the producer's flags it passes through come from the file too, the command line winning."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a b c.\nd e f.\n\ng h i.\nj k.\n")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"train_corpus: [{corpus}]\nmax_seq_len: 64\ndo_whole_word_mask: true\n"
                           f"bert_model: m\noutput_dir: {tmp_path / 'out'}\nnum_train_epochs: 2\n")
    config = parse_args(["--config", str(config_file), "--max_seq_len", "32"])
    assert config.local.train_corpus == (str(corpus),) and config.train.epochs == 2
    assert config.local.producer_args == ("--do_whole_word_mask", "--max_seq_len", "32")
