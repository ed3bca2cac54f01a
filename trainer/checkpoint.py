"""Checkpoints that are either complete or absent, and the exact resume from the newest one.

Layout under `--output_dir`:

    checkpoints/step_00001000/   config.json, model.safetensors (save_pretrained), the tokenizer files,
                                 training_state.pt (optimizer, scheduler, scaler, step, RNG states (CPU,
                                 the training GPU's, Python's, numpy's; with several ranks, every rank's
                                 torch generators too), source position, the run's config)
    checkpoints/step_00001000.tmp-<pid>/   a checkpoint being written; renamed when complete
    config.json, model.safetensors, tokenizer files   the final model, moved in when the run ends

A checkpoint is written into a temporary folder and renamed into place only when every file is there, so a
crash or a full disk never leaves a half checkpoint under a final name; leftover temporary folders are
removed at the next start. `training_state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from common.progress import log
from trainer import TrainerError

STATE_FILE = "training_state.pt"
_COMPLETE = re.compile(r"^step_(\d{8})$")


class CheckpointError(TrainerError):
    """A checkpoint could not be written or read; the message names the path."""


def rng_state(device: torch.device) -> dict:
    """Every random generator this process draws from, as tensors and plain values (weights_only-loadable).

    Of the GPUs only `device`'s generator: the one training draws from (dropout). Saving every visible GPU's,
    as `torch.cuda.get_rng_state_all` does, ties the checkpoint to this machine's GPU count, and a resume
    that sees fewer GPUs (CUDA_VISIBLE_DEVICES narrowed, another node) could not replay them.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": _device_rng_state(device),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _device_rng_state(device: torch.device) -> torch.Tensor:
    """`device`'s CUDA generator state; an empty tensor on the CPU (the CPU generator is saved as "torch")."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)


def restore_rng_state(state: dict, device: torch.device) -> list[str]:
    """Put back the generators of `rng_state`; returns what could not be carried over, for the resume's log line.

    `state["cuda"]` is the training device's state (a tensor, empty when the checkpoint was written on the
    CPU), or, in checkpoints written before that, one state per GPU then visible (a list).
    """
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    saved = state["cuda"]
    if isinstance(saved, torch.Tensor):
        return _restore_device_rng(saved, device)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    restore, skipped = cuda_states_to_restore(len(saved), visible)
    for index in restore:
        torch.cuda.set_rng_state(saved[index], index)
    if skipped:
        return [f"the random states of GPU(s) {', '.join(map(str, skipped))} of the {len(saved)} the checkpoint "
                f"holds (this machine sees {visible}); those GPUs' generators keep this run's seed"]
    return []


def cuda_states_to_restore(saved: int, visible: int) -> tuple[list[int], list[int]]:
    """Of `saved` per-GPU random states (indices 0..saved-1), those this machine's `visible` GPUs can take, and
    the rest: the devices both runs have get theirs back, the others are skipped."""
    both = min(saved, visible)
    return list(range(both)), list(range(both, saved))


def _restore_device_rng(saved: torch.Tensor, device: torch.device) -> list[str]:
    if saved.numel() and device.type == "cuda":
        torch.cuda.set_rng_state(saved, device)
        return []
    if saved.numel():  # written on a GPU, resumed on the CPU
        return ["the GPU's random state (this run trains on the CPU)"]
    if device.type == "cuda":  # written on the CPU, resumed on a GPU
        return [f"a random state for {device} (the checkpoint was written on the CPU); it keeps this run's seed"]
    return []


def restore_torch_rng_state(state: dict, device: torch.device) -> list[str]:
    """One rank's torch generators (CPU, and its GPU's), as `trainer.distributed` gathers them for a checkpoint;
    returns what could not be carried over.

    With several ranks the checkpoint holds rank 0's full state (`rng`) and every rank's torch generators
    (`rank_rng`): the only ones training draws from (dropout), so each rank's stream resumes where it was.
    """
    torch.set_rng_state(state["torch"])
    return _restore_device_rng(state["cuda"], device)


class Checkpoints:
    """The `checkpoints/` folder of one output directory."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _COMPLETE.match(path.name)
            if match and path.is_dir() and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def folder(self, step: int) -> Path:
        """Where checkpoint `step` is (once complete)."""
        return self.root / f"step_{step:08d}"

    @staticmethod
    def step_of(folder: Path) -> int:
        return int(_COMPLETE.match(folder.name).group(1))

    def remove_stale(self) -> None:
        """Temporary folders of checkpoints that were never finished (a crash while saving)."""
        if self.root.is_dir():
            for leftover in self.root.glob("step_*.tmp-*"):
                log.info("checkpoint: removing unfinished %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)

    def remove_all(self) -> None:
        if self.root.is_dir():
            log.warning("--no_resume: deleting the earlier run's checkpoints in %s", self.root)
            shutil.rmtree(self.root)

    def save(self, step: int, model, tokenizer, state: dict) -> Path:
        """Write checkpoint `step` atomically, then drop the oldest beyond `keep`; returns its folder."""
        final = self.folder(step)
        tmp = self.root / f"{final.name}.tmp-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)  # last: a folder with this file has everything
            if final.exists():  # the same step saved again (a resumed run that had already finished)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except Exception as exc:  # a full disk surfaces as OSError from Python, RuntimeError from torch's writer
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({type(exc).__name__}: {exc}); the "
                                  f"partial folder was removed and earlier checkpoints are intact") from exc
        for _, old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(path: Path) -> dict:
        try:
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path / STATE_FILE} ({type(exc).__name__}: {exc}); delete that "
                                  "checkpoint folder to resume from an older one, or pass --no_resume") from exc


def save_final(output_dir: Path, model, tokenizer) -> None:
    """The final model and tokenizer in `output_dir` itself, so from_pretrained(output_dir) loads them.

    Written to a temporary folder first and then moved in file by file (each move atomic), so a reader never
    sees a half-written weights file.
    """
    output_dir = Path(output_dir)
    tmp = output_dir / f".final.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, output_dir / item.name)
    except Exception as exc:
        raise CheckpointError(f"could not write the final model to {output_dir} ({type(exc).__name__}: {exc})") \
            from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
