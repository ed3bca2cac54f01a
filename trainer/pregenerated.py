"""The seed's pregenerated epochs (`epoch_{i}.json` + `epoch_{i}_metrics.json`) as a training source.

Keeps the seed's rules: epoch files are looked for as `0 .. --epochs-1`; none at all is an error; fewer than
`--epochs` prints the seed's warning and loops over them (training epoch e reads data epoch e % available);
the step count is the instances of the epochs trained over `--train_batch_size`; tokens are converted with
the vocabulary, so every token must be in it; `--reduce_memory` holds an epoch in memory maps in a
temporary folder instead of RAM. Each training epoch is shuffled with a generator seeded by
(`--seed`, epoch), and the position (epoch, offset) is the source's resumable state.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.instances import IGNORE_INDEX, Batch, label_dtype
from common.lengths import Widths, stream_widths, trim
from common.progress import Every, log
from common.vocab import Vocabulary
from trainer import TrainerError
from trainer.model import TensorBatch
from trainer.source import concat_batches, to_tensors

FEWER_EPOCHS_WARNING = (
    "Warning! There are fewer epochs of pregenerated data ({found}) than training epochs ({epochs}). This script "
    "will loop over the available data, but training diversity may be negatively impacted.")


class DataExhausted(TrainerError):
    """Every epoch of the pregenerated data has been handed out."""


@dataclass(frozen=True)
class EpochFiles:
    data: Path
    num_examples: int
    max_seq_len: int


def find_epochs(directory: Path, epochs: int) -> list[EpochFiles]:
    """The data epochs to train on, by the seed's rules (with its warning when there are fewer than `epochs`)."""
    found = []
    for i in range(epochs):
        data, metrics = directory / f"epoch_{i}.json", directory / f"epoch_{i}_metrics.json"
        if not (data.is_file() and metrics.is_file()):
            if i == 0:
                raise TrainerError(f"No training data was found in {directory} (expected epoch_0.json and "
                                   "epoch_0_metrics.json, as pregenerate_training_data.py or bertstream-producer "
                                   "--output_dir write them)")
            log.warning(FEWER_EPOCHS_WARNING.format(found=i, epochs=epochs))
            break
        try:
            m = json.loads(metrics.read_text(encoding="utf-8"))
            found.append(EpochFiles(data, int(m["num_training_examples"]), int(m["max_seq_len"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainerError(f"{metrics}: expected {{\"num_training_examples\": N, \"max_seq_len\": L}} "
                               f"({type(exc).__name__}: {exc})") from exc
    lengths = {f.max_seq_len for f in found}
    if len(lengths) > 1:
        raise TrainerError(f"{directory}: epochs disagree on max_seq_len ({sorted(lengths)}); regenerate them "
                           "with one --max_seq_len")
    return found


def read_epoch(files: EpochFiles, vocab: Vocabulary, spill_dir: Path | None) -> Batch:
    """All instances of one epoch file as one Batch (memory-mapped under `spill_dir` when given)."""
    n, seq = files.num_examples, files.max_seq_len

    def array(name: str, shape: tuple, dtype, fill) -> np.ndarray:
        if spill_dir is None:
            return np.full(shape, fill, dtype=dtype)
        mapped = np.memmap(spill_dir / f"{name}.memmap", dtype=dtype, mode="w+", shape=shape)
        mapped[:] = fill
        return mapped

    input_ids = array("input_ids", (n, seq), vocab.id_dtype, vocab.pad_id)
    token_type_ids = array("token_type_ids", (n, seq), np.uint8, 0)
    lengths = array("lengths", (n,), np.uint16, 0)
    positions = array("masked_positions", (n, seq), np.uint16, 0)  # trimmed to the widest row at the end
    labels = array("masked_labels", (n, seq), label_dtype(vocab), IGNORE_INDEX)
    nsp = array("next_sentence_labels", (n,), np.uint8, 0)
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    widest = 1
    ticker = Every(5.0)
    row = -1
    with open(files.data, encoding="utf-8") as f:
        for row, line in enumerate(f):
            where = f"{files.data}:{row + 1}"
            if row >= n:
                raise TrainerError(f"{where}: more lines than num_training_examples {n} in its metrics file")
            try:
                record = json.loads(line)
                tokens, segments = record["tokens"], record["segment_ids"]
                masked, masked_tokens = record["masked_lm_positions"], record["masked_lm_labels"]
                is_random_next = record["is_random_next"]
            except (ValueError, KeyError, TypeError) as exc:
                raise TrainerError(f"{where}: not a seed record ({type(exc).__name__}: {exc})") from exc
            length = len(tokens)
            if not 5 <= length <= seq or len(segments) != length:
                raise TrainerError(f"{where}: {length} tokens and {len(segments)} segment ids; expected equal "
                                   f"counts between 5 and max_seq_len {seq}")
            if len(masked) != len(masked_tokens) or any(not 1 <= p < length for p in masked):
                raise TrainerError(f"{where}: masked_lm_positions {masked} do not fit {length} tokens or do not "
                                   f"match the {len(masked_tokens)} masked_lm_labels")
            try:
                input_ids[row, :length] = [ids[t] for t in tokens]
                labels[row, : len(masked)] = [ids[t] for t in masked_tokens]
            except KeyError as exc:
                raise TrainerError(f"{where}: token {exc.args[0]!r} is not in the vocabulary of --bert_model "
                                   "(was the data generated with another model or case setting?)") from None
            token_type_ids[row, :length] = segments
            lengths[row] = length
            positions[row, : len(masked)] = masked
            nsp[row] = bool(is_random_next)
            widest = max(widest, len(masked))
            if ticker.due():
                log.info("reading %s: %d of %d instances", files.data.name, row + 1, n)
    if row + 1 != n:
        raise TrainerError(f"{files.data}: {row + 1} lines but its metrics file says num_training_examples {n}")
    if spill_dir is None:  # keep only the prediction slots in use; a memory map just gets a narrower view
        positions, labels = np.ascontiguousarray(positions[:, :widest]), np.ascontiguousarray(labels[:, :widest])
    else:
        positions, labels = positions[:, :widest], labels[:, :widest]
    return Batch(input_ids, token_type_ids, lengths, positions, labels, nsp)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Training epoch `epoch`'s shuffled order; a function of (seed, epoch) only, so a resume recomputes it."""
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(num_examples)


class PregeneratedSource:
    finite = True  # it ends after --epochs; a stream does not

    def __init__(self, directory: str, epochs: int, vocab: Vocabulary, max_positions: int, micro_batch_size: int,
                 seed: int, *, reduce_memory: bool, pin_memory: bool, shard: tuple[int, int] = (0, 1),
                 pad_to_multiple_of: int = 0, compiled: bool = False):
        self.directory = Path(directory)
        self._epochs = epochs
        self._vocab = vocab
        self._max_positions = max_positions
        self._micro = micro_batch_size
        self._seed = seed
        self._reduce_memory = reduce_memory
        self._pin = pin_memory
        # (rank, world size): every rank reads the same shuffled order and keeps its own micro-batch of each
        # world_size micro-batches' worth of it, so no instance is trained twice in a step.
        self._rank, self._world = shard
        self._files: list[EpochFiles] = []
        self.max_seq_len: int | None = None
        self.epoch_instances: int | None = None
        self._epoch = 0  # training epoch
        self._offset = 0  # instances of it already handed out
        self._loaded: tuple[int, Batch, np.ndarray] | None = None  # (training epoch, its data, its order)
        self._spill: tempfile.TemporaryDirectory | None = None
        # Each micro-batch is padded only to its longest row's allowed width (common.lengths), known at start().
        self._widths_of = lambda max_seq_len: stream_widths(max_seq_len, pad_to_multiple_of, compiled)
        self.widths: Widths | None = None

    def start(self) -> None:
        self._files = find_epochs(self.directory, self._epochs)
        self.max_seq_len = self._files[0].max_seq_len
        self.epoch_instances = self._files[0].num_examples
        self.widths = self._widths_of(self.max_seq_len)
        if self.max_seq_len > self._max_positions:
            raise TrainerError(f"{self.directory}: max_seq_len {self.max_seq_len} exceeds the model's "
                               f"{self._max_positions} positions")
        log.info("pregenerated data: %d data epoch(s) in %s, %s instances, max_seq_len %d", len(self._files),
                 self.directory, "+".join(str(f.num_examples) for f in self._files), self.max_seq_len)

    def planned_instances(self, epochs: int) -> int:
        return sum(self._files[e % len(self._files)].num_examples for e in range(epochs))

    def next_batch(self) -> TensorBatch:
        """The next micro-batch of this rank. The shuffled order is dealt out in rounds of world_size
        micro-batches and rank r takes the r-th of each round: what one process accumulating world_size
        micro-batches takes at that place, so the runs match whatever the number of processes."""
        start, stop = self._rank * self._micro, (self._rank + 1) * self._micro  # this rank's place in a round
        parts, dealt, need = [], 0, self._micro * self._world
        while need:
            if self._epoch >= self._epochs:
                raise DataExhausted(f"{self.directory}: all {self._epochs} epochs have been trained on")
            data, order = self._epoch_data()
            rows = order[self._offset : self._offset + need]
            mine = np.sort(rows[max(0, start - dealt) : max(0, stop - dealt)])  # sorted: sequential reads from a map
            if len(mine):
                parts.append(Batch(**{name: np.asarray(getattr(data, name)[mine]) for name in Batch.FIELDS}))
            dealt += len(rows)
            need -= len(rows)
            self._offset += len(rows)
            if self._offset >= len(order):
                self._epoch, self._offset = self._epoch + 1, 0
        return to_tensors(trim(concat_batches(parts), self.widths, self._vocab.pad_id), self._pin)

    def _epoch_data(self) -> tuple[Batch, np.ndarray]:
        if self._loaded is None or self._loaded[0] != self._epoch:
            files = self._files[self._epoch % len(self._files)]
            self._loaded = None
            if self._spill is not None:
                self._spill.cleanup()
            spill_dir = None
            if self._reduce_memory:
                self._spill = tempfile.TemporaryDirectory(prefix="bertstream-epoch-")
                spill_dir = Path(self._spill.name)
            log.info("training epoch %d: reading %s", self._epoch, files.data)
            data = read_epoch(files, self._vocab, spill_dir)
            self._loaded = (self._epoch, data, epoch_order(files.num_examples, self._seed, self._epoch))
        return self._loaded[1], self._loaded[2]

    def state_dict(self) -> dict:
        return {"kind": "pregenerated", "epoch": self._epoch, "offset": self._offset}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "pregenerated":
            raise TrainerError(f"the checkpoint was trained from a {state.get('kind')} source, not from "
                               f"--pregenerated_data; pass --no_resume to start afresh")
        self._epoch, self._offset = int(state["epoch"]), int(state["offset"])

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        self._loaded = None
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None
