"""Training from the seed's file format, written here by the plain reference (tests/seed_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.instances import IGNORE_INDEX
from conftest import write_corpus
from trainer import EXIT_ERROR, EXIT_OK
from trainer.cli import main
from trainer.pregenerated import FEWER_EPOCHS_WARNING, PregeneratedSource, epoch_order
from trainer_support import captured_log, state_dict_of, train_records, trainer_flags, vocabulary, write_seed_epochs


@pytest.fixture(scope="module")
def seed_data(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[int], Path]:
    tmp = tmp_path_factory.mktemp("seed_data")
    corpus = write_corpus(tmp / "corpus.txt", num_documents=40)
    counts = write_seed_epochs(tmp / "data", tiny_model_dir, corpus, epochs=2, max_seq_len=64)
    return tmp / "data", counts, corpus


def source(data: Path, model_dir: Path, *, epochs: int = 2, micro: int = 5, reduce_memory: bool = False):
    s = PregeneratedSource(str(data), epochs, vocabulary(model_dir), 512, micro, seed=7,
                           reduce_memory=reduce_memory, pin_memory=False)
    s.start()
    return s


def test_trains_from_fewer_data_epochs_than_epochs_with_the_seeds_warning(seed_data, tiny_model_dir, tmp_path):
    data, counts, _ = seed_data
    out = tmp_path / "out"
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(data), "--epochs", "3"))
    assert code == EXIT_OK, "\n".join(lines)
    assert FEWER_EPOCHS_WARNING.format(found=2, epochs=3) in lines
    # The third training epoch reads data epoch 0 again, and the step count is the seed's.
    assert any(line.endswith("training epoch 2: reading " + str(data / "epoch_0.json")) for line in lines)
    records = train_records(out)
    assert records[-1]["step"] == (counts[0] + counts[1] + counts[0]) // 8
    assert np.mean([r["mlm_loss"] for r in records[-5:]]) < np.mean([r["mlm_loss"] for r in records[:5]])
    assert records[-1]["epoch"] == pytest.approx(records[-1]["step"] * 8 / counts[0])
    loaded = state_dict_of(out)
    assert "cls.predictions.transform.dense.weight" in loaded


def test_source_hands_out_every_record_once_with_the_vocabularys_ids(seed_data, tiny_model_dir):
    data, counts, _ = seed_data
    vocab = vocabulary(tiny_model_dir)
    expected = sorted(
        (tuple(r["tokens"]), tuple(r["segment_ids"]), tuple(r["masked_lm_positions"]),
         tuple(r["masked_lm_labels"]), r["is_random_next"])
        for r in map(json.loads, (data / "epoch_0.json").read_text().splitlines()))
    s = source(data, tiny_model_dir, micro=1)
    got = []
    for _ in range(counts[0]):
        b = s.next_batch()
        n = int(b.attention_mask.sum())
        used = b.masked_labels[0] != IGNORE_INDEX
        got.append((tuple(vocab.tokens[i] for i in b.input_ids[0, :n].tolist()),
                    tuple(b.token_type_ids[0, :n].tolist()), tuple(b.masked_positions[0][used].tolist()),
                    tuple(vocab.tokens[i] for i in b.masked_labels[0][used].tolist()),
                    bool(b.next_sentence_labels[0])))
        assert b.input_ids[0, n:].eq(vocab.pad_id).all()
    assert sorted(got) == expected
    assert s.state_dict() == {"kind": "pregenerated", "epoch": 1, "offset": 0}
    s.close()


def test_reduce_memory_gives_the_same_batches(seed_data, tiny_model_dir):
    data, counts, _ = seed_data
    in_ram, mapped = source(data, tiny_model_dir), source(data, tiny_model_dir, reduce_memory=True)
    for _ in range((counts[0] + counts[1]) // 5):  # across the epoch boundary
        a, b = in_ram.next_batch(), mapped.next_batch()
        for field in a.ARRAYS:
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.tokens == b.tokens
    in_ram.close(), mapped.close()


def test_source_resumes_mid_epoch_and_reshuffles_each_epoch(seed_data, tiny_model_dir):
    data, counts, _ = seed_data
    straight = source(data, tiny_model_dir, epochs=3)
    batches = [straight.next_batch().input_ids for _ in range(3 * counts[0] // 5)]
    first = source(data, tiny_model_dir, epochs=3)
    for _ in range(9):
        first.next_batch()
    resumed = source(data, tiny_model_dir, epochs=3)
    resumed.load_state_dict(first.state_dict())
    for expected in batches[9:]:
        assert torch.equal(resumed.next_batch().input_ids, expected)
    # Training epochs 0 and 2 read the same data epoch, in different orders.
    assert not np.array_equal(epoch_order(counts[0], 7, 0), epoch_order(counts[0], 7, 2))


def test_missing_data_is_an_error_naming_the_folder(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(tmp_path / "empty")))
    assert code == EXIT_ERROR
    assert any(f"No training data was found in {tmp_path / 'empty'}" in line for line in lines)


def test_a_token_outside_the_vocabulary_names_file_and_line(seed_data, tiny_model_dir, tmp_path):
    data, _, _ = seed_data
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (data / "epoch_0.json").read_text().splitlines()
    record = json.loads(lines[2])
    record["tokens"][1] = "zebrafish"
    lines[2] = json.dumps(record)
    (bad / "epoch_0.json").write_text("\n".join(lines) + "\n")
    (bad / "epoch_0_metrics.json").write_text((data / "epoch_0_metrics.json").read_text())
    with captured_log() as log_lines:
        code = main(trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(bad), "--epochs", "1"))
    assert code == EXIT_ERROR
    assert any(f"{bad / 'epoch_0.json'}:3: token 'zebrafish' is not in the vocabulary" in line
               for line in log_lines), log_lines


def test_a_metrics_file_that_miscounts_is_an_error(seed_data, tiny_model_dir, tmp_path):
    data, counts, _ = seed_data
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "epoch_0.json").write_text((data / "epoch_0.json").read_text())
    (bad / "epoch_0_metrics.json").write_text(json.dumps({"num_training_examples": counts[0] + 5,
                                                          "max_seq_len": 64}))
    s = source(bad, tiny_model_dir, epochs=1)
    with pytest.raises(Exception, match=f"{counts[0]} lines but its metrics file says num_training_examples"):
        s.next_batch()


def test_max_steps_beyond_the_data_is_refused_up_front(seed_data, tiny_model_dir, tmp_path):
    data, counts, _ = seed_data
    with captured_log() as lines:
        code = main(trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(data), "--epochs", "1",
                                  "--max_steps", "1000"))
    assert code == EXIT_ERROR
    assert f"--max_steps 1000 needs 8000 instances but --epochs 1 of the data give {counts[0]}" in "\n".join(lines)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
