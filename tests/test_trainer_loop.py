"""The training loop's semantics: the seed's schedule, precision flags on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import write_corpus
from trainer import EXIT_OK
from trainer.cli import main
from trainer_support import captured_log, train_records, trainer_flags, write_seed_epochs


@pytest.fixture(scope="module")
def seed_data(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("loop")
    write_seed_epochs(tmp / "data", tiny_model_dir, write_corpus(tmp / "corpus.txt"), epochs=1)
    return tmp / "data"


def test_linear_warmup_then_linear_decay_to_zero(tiny_model_dir, seed_data, tmp_path):
    flags = trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(seed_data), "--max_steps", "8")
    flags[flags.index("--warmup_proportion") + 1] = "0.25"  # 2 warmup steps
    assert main(flags) == EXIT_OK
    lrs = [r["lr"] for r in train_records(tmp_path / "out")]
    # The lr after step s (what the next step uses): s / 2 while warming up, then (8 - s) / 6, times 1e-3.
    expected = [1e-3 * (s / 2 if s < 2 else (8 - s) / 6) for s in range(1, 9)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("flag", ["--bf16", "--fp16"])
def test_precision_flags_on_the_cpu(tiny_model_dir, seed_data, tmp_path, flag):
    out = tmp_path / "out"
    with captured_log() as lines:
        assert main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(seed_data), "--max_steps", "3",
                                  "--no_cuda", flag)) == EXIT_OK
    records = train_records(out)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert all(r["loss_scale"] is None for r in records)  # no GradScaler off CUDA
    fell_back = "--fp16 needs a CUDA GPU; training on the CPU in float32 instead" in lines
    assert fell_back == (flag == "--fp16")
    assert any(line.endswith(("bf16 on cpu" if flag == "--bf16" else "fp32 on cpu")) for line in lines), lines
