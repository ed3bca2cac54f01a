"""What a run reports: `metrics.jsonl` (one JSON object per logging step), TensorBoard events, the progress line.

A training record holds at least step, loss, mlm_loss, nsp_loss, mlm_accuracy, nsp_accuracy, lr,
seq_per_s and data_wait_frac, and what the model computed on: tokens_per_s (real tokens, padding left out) and
pad_frac (the share of the positions computed on that were padding). docs/trainer.md, "What it writes", lists
every field; with several ranks the figures are the whole step's and rank_seq_per_s / rank_data_wait_frac list
each rank's. An evaluation adds eval_* fields to the record of its step. The evaluation before the first step is a record of its own with only step, lr and
eval_*. Values that are not finite (an fp16 overflow's grad norm) are written as null, so the file stays
strict JSON.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.progress import log

METRICS_FILE = "metrics.jsonl"
TRAIN_FIELDS = ("step", "loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "lr", "seq_per_s",
                "data_wait_frac")
# The sums the training loop keeps on the device over an interval (one tensor, so a logging step syncs once),
# in this order: loss, its parts and the accuracy counts over micro-batches, the gradient norm over steps.
DEVICE_SUMS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "grad_norm")


@dataclass
class Interval:
    """One logging interval's host-side counts on this rank: the loop adds to them, `training_record` reads them."""

    instances: int = 0
    micro_batches: int = 0
    tokens: int = 0  # real tokens of the micro-batches
    positions: int = 0  # positions computed on: rows x the width each micro-batch was padded to
    steps: int = 0
    wait_s: float = 0.0  # blocked on the source
    excluded_s: float = 0.0  # evaluating and saving: left out of the throughput
    start_s: float = field(default_factory=time.perf_counter)

    def rank_figures(self, stats: dict) -> list[float]:
        """This rank's [sequences/s, share of time waiting for data, real tokens/s, tokens, positions, *source
        counters], for gathering."""
        wall = time.perf_counter() - self.start_s - self.excluded_s
        return [self.instances / wall, min(1.0, self.wait_s / wall), self.tokens / wall, self.tokens, self.positions,
                *stats.values()]


def training_record(step: int, sums: list[float], interval: Interval, per_rank: list[list[float]],
                    stat_keys: list[str], *, world_size: int, lr: float, loss_scale: float | None,
                    instances_per_step: int, epoch_instances: int | None, elapsed_s: float) -> dict:
    """The record of a logging step: `sums` (DEVICE_SUMS, every rank's added) over this rank's `interval`, which
    every rank has alike, and `per_rank`, each rank's `Interval.rank_figures`."""
    totals = dict(zip(DEVICE_SUMS, sums))
    all_instances, all_micro_batches = interval.instances * world_size, interval.micro_batches * world_size
    record = {
        "step": step,
        "epoch": (step * instances_per_step / epoch_instances) if epoch_instances else None,
        "loss": totals["loss"] / all_micro_batches, "mlm_loss": totals["mlm_loss"] / all_micro_batches,
        "nsp_loss": totals["nsp_loss"] / all_micro_batches,
        "mlm_accuracy": totals["mlm_correct"] / max(totals["mlm_count"], 1.0),
        "nsp_accuracy": totals["nsp_correct"] / all_instances,
        "lr": lr,
        "grad_norm": totals["grad_norm"] / (interval.steps * world_size),  # equal on every rank
        "loss_scale": loss_scale,
        # The run goes at its slowest rank's pace, so its data wait is the largest rank's.
        "seq_per_s": sum(r[0] for r in per_rank), "data_wait_frac": max(r[1] for r in per_rank),
        "tokens_per_s": sum(r[2] for r in per_rank),
        "pad_frac": 1.0 - sum(r[3] for r in per_rank) / max(sum(r[4] for r in per_rank), 1.0),
        "elapsed_s": elapsed_s,
        **{key: int(sum(r[5 + i] for r in per_rank)) for i, key in enumerate(stat_keys)},
    }
    if world_size > 1:
        record["rank_seq_per_s"] = [r[0] for r in per_rank]
        record["rank_data_wait_frac"] = [r[1] for r in per_rank]
    return record


def evaluation_record(step: int, lr: float, result: dict) -> dict:
    """The record of an evaluation outside a logging step (the one before training): step, lr and eval_*."""
    return {"step": step, "lr": lr, **result}


class MetricsLog:
    """Appends records to output_dir/metrics.jsonl and, when the tensorboard package is there, to TensorBoard.

    `resume_step`: the step a resumed run starts from; records of later steps (written by the interrupted
    run after its last checkpoint) are dropped, so the file has each step once. None starts a new file.
    Only the main process writes; the others get a log that does nothing.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None):
        self._enabled = enabled
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        path = Path(output_dir) / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:  # a line cut short by a crash
                    continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._file = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        except ImportError:
            log.info("metrics: the tensorboard package is not installed; writing %s only", path)

    def write(self, record: dict) -> None:
        if not self._enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            step = record["step"]
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    group = "eval" if key.startswith("eval_") else "train"
                    self._tensorboard.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def progress_line(record: dict, total_steps: int) -> str:
    """One dense line: loss and its parts, accuracies, lr, grad norm, loss scale, throughput, data wait, eval."""
    parts = [f"step {record['step']}/{total_steps}"]
    if record.get("epoch") is not None:
        parts[0] += f" (epoch {record['epoch']:.2f})"
    if "loss" in record:
        parts += [
            f"loss {record['loss']:.4f} (mlm {record['mlm_loss']:.4f} nsp {record['nsp_loss']:.4f})",
            f"acc mlm {record['mlm_accuracy']:.3f} nsp {record['nsp_accuracy']:.3f}",
            f"lr {record['lr']:.3g}",
            f"grad {record['grad_norm']:.3g}",
        ]
        if record.get("loss_scale") is not None:
            parts.append(f"scale {record['loss_scale']:g}")
        parts += [f"{record['seq_per_s']:.1f} seq/s {record['tokens_per_s']:.0f} tok/s",
                  f"pad {100 * record['pad_frac']:.0f}%", f"data wait {100 * record['data_wait_frac']:.0f}%"]
        if record.get("rank_seq_per_s"):  # several ranks: each one's throughput and data wait
            parts.append("by rank " + " ".join(f"{s:.1f}" for s in record["rank_seq_per_s"]) + " seq/s, wait "
                         + " ".join(f"{100 * w:.0f}%" for w in record["rank_data_wait_frac"]))
        if record.get("blend_shares"):
            parts.append("blend " + "/".join(f"{share:.3f}" for share in record["blend_shares"]))
        if record.get("messages_rejected"):
            parts.append(f"rejected {record['messages_rejected']}")
    if "eval_loss" in record:
        parts.append(f"eval mlm {record['eval_mlm_loss']:.4f} acc {record['eval_mlm_accuracy']:.3f} "
                     f"nsp acc {record['eval_nsp_accuracy']:.3f}")
    return " | ".join(parts)
