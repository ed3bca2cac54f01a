"""Resuming a stream run: the step plan is the checkpoint's, and a resume that would change what the weights were
trained on (the model, lower-casing, the stream's max_seq_len) is refused by name. Real sockets throughout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_corpus
from trainer import EXIT_ERROR, EXIT_OK, EXIT_STOPPED
from trainer.checkpoint import STATE_FILE, Checkpoints
from trainer_support import captured_log, message, real_batches, train_on_frames, train_records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("resume_corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def batches(tiny_model_dir, corpus, tmp_path_factory) -> list:
    """Batches of 8 real instances at max_seq_len 64, one per optimizer step."""
    return real_batches(tiny_model_dir, corpus, tmp_path_factory.mktemp("resume_cache"), batch_size=8, count=8,
                        seed=5)


def run(model: Path, out: Path, frames: list[bytes], *flags: str, signal_at_step: int | None = None,
        lower_case: str = "--do_lower_case") -> int:
    """A checkpoint only at the end (or at the SIGTERM), so the step a resume starts from is known."""
    return train_on_frames(model, out, frames, "--save_steps", "0", *flags, signal_at_step=signal_at_step,
                           lower_case=lower_case)


def test_a_resumed_stream_run_keeps_the_step_plan_of_its_checkpoint(tiny_model_dir, batches, tmp_path):
    """--epochs 1 of an announced 64 instances is 8 steps of 8. The producers that feed the resumed run announce
    400 (a new estimate; another producer): re-planning would make it 50 steps and move the whole schedule."""
    out = tmp_path / "out"
    first = [message(tiny_model_dir, b, sequence=i, epoch_instances=64) for i, b in enumerate(batches[:3])]
    assert run(tiny_model_dir, out, first, "--epochs", "1", signal_at_step=3) == EXIT_STOPPED
    (step, folder), = Checkpoints(out, 3).complete()
    assert step == 3 and torch.load(folder / STATE_FILE, weights_only=True)["total_steps"] == 8

    later = [message(tiny_model_dir, b, sequence=i, epoch_instances=400) for i, b in enumerate(batches[3:])]
    with captured_log() as lines:
        assert run(tiny_model_dir, out, later, "--epochs", "1") == EXIT_OK, "\n".join(lines)
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["lr"] == 0.0  # the schedule ended where the checkpoint planned it
    assert not any("steps instead of" in line for line in lines), lines
    (_, final), = Checkpoints(out, 3).complete()[-1:]
    assert torch.load(final / STATE_FILE, weights_only=True)["total_steps"] == 8


def test_max_steps_on_resume_replans(tiny_model_dir, batches, tmp_path):
    out = tmp_path / "out"
    frames = [message(tiny_model_dir, b, sequence=i, epoch_instances=64) for i, b in enumerate(batches[:2])]
    assert run(tiny_model_dir, out, frames, "--epochs", "1", signal_at_step=2) == EXIT_STOPPED
    more = [message(tiny_model_dir, b, sequence=i, epoch_instances=64) for i, b in enumerate(batches[2:3])]
    with captured_log() as lines:
        assert run(tiny_model_dir, out, more, "--max_steps", "3") == EXIT_OK
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    assert any("the run now has 3 steps instead of 8" in line for line in lines), lines


@pytest.fixture(scope="module")
def finished(tiny_model_dir, batches, tmp_path_factory) -> Path:
    """The output folder of a finished 2-step stream run (its last checkpoint is what a rerun resumes from)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    frames = [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(batches[:2])]
    assert run(tiny_model_dir, out, frames, "--max_steps", "2") == EXIT_OK
    return out


@pytest.mark.parametrize("change", ["bert_model", "lower_case", "max_seq_len"])
def test_a_resume_that_changes_the_inputs_is_refused_by_name(tiny_model_dir, corpus, finished, tmp_path, change):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    checkpoint = Checkpoints(out, 3).latest()
    model, lower_case, frames = tiny_model_dir, "--do_lower_case", []
    if change == "bert_model":
        model = Path(shutil.copytree(tiny_model_dir, tmp_path / "another_model"))
        expected = [f"--bert_model '{tiny_model_dir.resolve()}'", f"this run has '{model.resolve()}'",
                    f"Resume with --bert_model {tiny_model_dir.resolve()}"]
    elif change == "lower_case":
        lower_case = "--no_lower_case"
        expected = ["lower-casing True", "this run has False", "Resume with --do_lower_case"]
    else:
        (short,) = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=1, max_seq_len=32)
        frames = [message(tiny_model_dir, short)]
        expected = ["the stream's max_seq_len 64", "this run has 32", "producers with --max_seq_len 64"]
    with captured_log() as lines:
        code = run(model, out, frames, "--max_steps", "4", lower_case=lower_case)
    assert code == EXIT_ERROR, "\n".join(lines)
    errors = [line for line in lines if line.startswith(f"checkpoint {checkpoint} was trained with")]
    assert len(errors) == 1, lines
    for part in expected + ["start afresh with --no_resume"]:
        assert part in errors[0], errors[0]
    assert [r["step"] for r in train_records(out)] == [1, 2]  # nothing trained


def test_a_two_phase_run_continues_at_512_after_128_with_the_flag(tiny_model_dir, corpus, tmp_path):
    """BERT's recipe: steps 1-3 at max_seq_len 128, stopped; resumed with producers at 512 and the flag, steps 4-6
    train on 512-token instances under the same plan and schedule (the learning rate keeps falling from where it
    was, to 0 at step 6), and the new length is what the next checkpoint holds."""
    out = tmp_path / "out"
    phase1 = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=3, max_seq_len=128)
    frames = [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(phase1)]
    assert run(tiny_model_dir, out, frames, "--max_steps", "6", signal_at_step=3) == EXIT_STOPPED
    (step, folder), = Checkpoints(out, 3).complete()
    assert step == 3 and torch.load(folder / STATE_FILE, weights_only=True)["inputs"]["max_seq_len"] == 128

    phase2 = real_batches(tiny_model_dir, corpus, tmp_path / "cache", batch_size=8, count=3, max_seq_len=512)
    assert max(int(b.lengths.max()) for b in phase2) > 128  # the second phase's instances are longer
    frames = [message(tiny_model_dir, b, sequence=i) for i, b in enumerate(phase2)]
    with captured_log() as lines:
        assert run(tiny_model_dir, out, frames, "--allow_max_seq_len_change") == EXIT_OK, "\n".join(lines)
    assert any("max_seq_len 128 -> 512 (--allow_max_seq_len_change)" in line and "from step 3 of 6" in line
               for line in lines), lines
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    lrs = [r["lr"] for r in records]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == 0.0  # one schedule over both phases
    (_, final), = Checkpoints(out, 3).complete()[-1:]
    state = torch.load(final / STATE_FILE, weights_only=True)
    assert state["inputs"]["max_seq_len"] == 512 and state["total_steps"] == 6 and state["step"] == 6
