"""Writing the seed's pregenerated epochs: `epoch_{i}.json` (one JSON record a line) and its metrics file.

The format is `pregenerate_training_data.py`'s, byte for byte in structure: each line is `json.dumps` of
`{"tokens", "segment_ids", "is_random_next", "masked_lm_positions", "masked_lm_labels"}` and
`epoch_{i}_metrics.json` is `{"num_training_examples": N, "max_seq_len": L}`. Reading is not here: the
trainer has its own reader.

Every file is written under a temporary name in the same directory and renamed when complete, so a reader
never sees half an epoch and an interrupted dump leaves no file that looks finished. Workers write one part
file per epoch each; the supervisor concatenates them in worker order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from common.instances import TrainingInstance, to_seed_record
from common.vocab import Vocabulary

_WRITE_BUFFER_BYTES = 1 << 20
# `.epoch_3.part1`, and the temporaries of parts, epochs and metrics (`..epoch_3.part1.x8a2.tmp`, ...).
_LEFTOVER = re.compile(r"^\.\.?epoch_\d+.*(\.part\d+|\.tmp)$")


def epoch_path(output_dir: Path, epoch: int) -> Path:
    return Path(output_dir) / f"epoch_{epoch}.json"


def metrics_path(output_dir: Path, epoch: int) -> Path:
    return Path(output_dir) / f"epoch_{epoch}_metrics.json"


def part_path(output_dir: Path, epoch: int, worker: int) -> Path:
    """One worker's complete share of an epoch; hidden, as it is not a file the seed's reader knows."""
    return Path(output_dir) / f".epoch_{epoch}.part{worker}"


def record_line(instance: TrainingInstance, vocab: Vocabulary) -> str:
    """One line of an epoch file, newline included (`json.dumps` defaults, as the seed writes it)."""
    return json.dumps(to_seed_record(instance, vocab)) + "\n"


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[str]]:
    """A text file that appears at `path` only if the block completes; otherwise nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n", buffering=_WRITE_BUFFER_BYTES) as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it, so put it straight back
    os.umask(mask)
    return mask


def write_metrics(output_dir: Path, epoch: int, num_training_examples: int, max_seq_len: int) -> Path:
    """`epoch_{i}_metrics.json`, which the seed's trainer reads for the instance count and sequence length."""
    path = metrics_path(output_dir, epoch)
    with atomic_output(path) as out:
        out.write(json.dumps({"num_training_examples": num_training_examples, "max_seq_len": max_seq_len}))
    return path


def count_lines(path: Path) -> int:
    with open(path, "rb") as stream:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(_WRITE_BUFFER_BYTES), b""))


def concatenate_parts(output_dir: Path, epoch: int, num_workers: int) -> Path:
    """`epoch_{i}.json` from the workers' parts, in worker order; the parts are removed once it exists."""
    parts = [part_path(output_dir, epoch, worker) for worker in range(num_workers)]
    path = epoch_path(output_dir, epoch)
    with atomic_output(path) as out:
        for part in parts:
            with open(part, encoding="utf-8", newline="\n") as source:
                shutil.copyfileobj(source, out, _WRITE_BUFFER_BYTES)
    for part in parts:
        part.unlink()
    return path


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Parts and temporaries of an interrupted earlier dump (a new dump must not mistake them for its own)."""
    removed = []
    for leftover in sorted(Path(output_dir).iterdir()):
        if _LEFTOVER.match(leftover.name) and leftover.is_file():
            leftover.unlink()
            removed.append(leftover)
    return removed
