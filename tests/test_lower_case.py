"""Lower-casing follows the tokenizer's own setting unless --do_lower_case / --no_lower_case forces it, on both
sides, and the two sides still check each other through the fingerprint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from common.vocab import decide_lower_case, load_tokenizer
from common.wire import decode
from conftest import REPO, free_tcp_endpoint, tiny_vocab
from producer import cli as producer_cli
from trainer import EXIT_OK, EXIT_USAGE
from trainer.cli import main, parse_args
from trainer_support import TIMEOUT_S, Sender, captured_log, message, real_batches, trainer_flags


def model_files(directory: Path, *, config: dict | None = None, normalizer: dict | None | str = "absent") -> Path:
    """vocab.txt, optionally tokenizer_config.json and a real tokenizer.json with the given normalizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if normalizer != "absent":
        tokenizer = Tokenizer(WordPiece({t: i for i, t in enumerate(tiny_vocab())}, unk_token="[UNK]"))
        tokenizer.save(str(directory / "tokenizer.json"))
        saved = json.loads((directory / "tokenizer.json").read_text())
        saved["normalizer"] = normalizer
        (directory / "tokenizer.json").write_text(json.dumps(saved))
        Tokenizer.from_file(str(directory / "tokenizer.json"))  # the tokenizers library reads it back
    return directory


BERT_CASED = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
              "lowercase": False}


@pytest.mark.parametrize("config, normalizer, expected, because", [
    ({"do_lower_case": False}, "absent", False, "tokenizer_config.json says do_lower_case false"),
    ({"do_lower_case": True}, BERT_CASED, True, "tokenizer_config.json says do_lower_case true"),  # config first
    ({"model_max_length": 512}, BERT_CASED, False, "the normalizer in"),
    (None, {**BERT_CASED, "lowercase": True}, True, "the normalizer in"),
    (None, {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}, True, "lower-cases"),
    (None, {"type": "Sequence", "normalizers": [{"type": "NFC"}]}, False, "keeps case"),
    (None, None, True, "BertTokenizer's default"),  # no normalizer says nothing
    (None, "absent", True, "BertTokenizer's default"),
])
def test_the_tokenizer_decides_unless_a_flag_does(tmp_path, config, normalizer, expected, because):
    model = model_files(tmp_path / "model", config=config, normalizer=normalizer)
    decided = decide_lower_case(model, None)
    assert decided.do_lower_case is expected and because in decided.reason, decided
    for flag in (True, False):  # either flag overrides every file
        assert decide_lower_case(model, flag).do_lower_case is flag
    assert decide_lower_case(model, False).describe() == "lower-casing off (--no_lower_case)"
    # What was decided is what the tokenizer does.
    tokens = load_tokenizer(model, decided.do_lower_case).encode("Delta", add_special_tokens=False).tokens
    assert (tokens == ["delta"]) is expected


def test_the_real_models_files_say_uncased(real_model_dir):
    assert decide_lower_case(real_model_dir, None).do_lower_case is True


def test_both_command_lines_take_either_flag_or_neither(tmp_path, capsys):
    def producer(*flags):
        return producer_cli.parse_config(producer_cli.build_parser(), ["--train_corpus", "c", "--bert_model", "m",
                                                                       "--output_dir", "o", *flags])

    def trainer(*flags):
        return parse_args(["--bert_model", "m", "--output_dir", str(tmp_path / "out"), *flags])

    for parse, section in ((producer, "corpus"), (trainer, "model")):
        assert getattr(parse(), section).do_lower_case is None
        assert getattr(parse("--do_lower_case"), section).do_lower_case is True  # the seed's bare flag
        assert getattr(parse("--no_lower_case"), section).do_lower_case is False
    with pytest.raises(SystemExit) as exit_info:
        producer("--do_lower_case", "--no_lower_case")
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["--bert_model", "m", "--output_dir", str(tmp_path / "o"), "--do_lower_case",
                 "--no_lower_case"]) == EXIT_USAGE


def test_a_cased_models_producer_keeps_case_without_a_flag(tiny_model_dir, tiny_corpus, tmp_path):
    cased = Path(shutil.copytree(tiny_model_dir, tmp_path / "cased"))
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False,
                                                             "tokenizer_class": "BertTokenizer"}))
    endpoint, log_path = free_tcp_endpoint(), tmp_path / "producer.log"
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.bind(endpoint)
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "producer", "--train_corpus", str(tiny_corpus), "--bert_model", str(cased),
                 "--cache_dir", str(tmp_path / "cache"), "--connect", endpoint, "--num_workers", "1", "--epochs",
                 "1", "--batch_size", "64"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert pull.poll(TIMEOUT_S * 1000), log_path.read_text()
            first = decode(pull.recv())
        finally:
            process.kill()
            process.wait()
        pull.close(linger=0)
    assert first.header.fingerprint.do_lower_case is False
    assert f"lower-casing off ({cased / 'tokenizer_config.json'} says do_lower_case false)" in log_path.read_text()


def test_a_trainer_without_the_flag_follows_the_tokenizer_and_agrees_with_the_producer(tiny_model_dir, tiny_corpus,
                                                                                      tmp_path):
    """The tiny model's tokenizer_config.json says do_lower_case true; the producer's batches say the same."""
    batches = real_batches(tiny_model_dir, tiny_corpus, tmp_path / "cache", batch_size=8, count=2)
    out, endpoint = tmp_path / "out", free_tcp_endpoint()
    sender = Sender(endpoint, [message(tiny_model_dir, b) for b in batches], out)
    sender.start()
    flags = trainer_flags(tiny_model_dir, out, "--bind", endpoint, "--max_steps", "2", "--data_timeout", str(TIMEOUT_S))
    flags.remove("--do_lower_case")
    with captured_log() as lines:
        code = main(flags)
    sender.join(timeout=TIMEOUT_S)
    assert code == EXIT_OK, "\n".join(lines)
    assert f"lower-casing on ({tiny_model_dir / 'tokenizer_config.json'} says do_lower_case true)" in lines
