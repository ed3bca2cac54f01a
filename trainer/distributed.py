"""Data-parallel training across torchrun's processes: the process group, DDP, and what the ranks agree on.

Every rank trains on its own stream: it binds `--bind`'s port + LOCAL_RANK, and every producer PUSHes
round-robin over all the ranks' endpoints, so each batch reaches exactly one rank. DDP averages the
gradients during the backward pass of a step's last micro-batch, an all-reduce that waits for every rank.
So that no rank ever waits there for one that is not coming, the ranks vote once per optimizer step, on the
CPU and before that all-reduce: go on, stop (a signal: save and exit 75) or fail (this rank cannot go on: a
data timeout, a mismatched producer). Only when every rank has its step's micro-batches and votes to go on
does any rank compute the step. Uneven producers then make the faster ranks wait at the vote, a stop lands
on the same step everywhere, and one rank's error ends every rank with a message instead of a hang.

The vote and the other small agreements (the stream's shape at the start, per-rank figures on logging steps,
barriers around rank 0's checkpoints) go over a gloo group of their own: CPU tensors, never a device sync,
about 0.1 ms per step on one host. The metrics' loss sums are all-reduced on the training backend, on
logging steps only, where the loop already syncs.

With WORLD_SIZE 1 there is no process group: `Ranks` answers every question locally and nothing is wrapped.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
from typing import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.progress import log
from trainer import TrainerError
from trainer.cli import DistributedConfig
from trainer.model import PretrainingOutput, TensorBatch, pretraining_loss
from trainer.source import StopRequested

GO, STOP, FAIL = 0, 1, 2  # a rank's vote on the next step
FOREVER = datetime.timedelta(days=30)  # the control group's timeout when --data_timeout 0 waits forever
CONTROL_MARGIN = datetime.timedelta(hours=1)  # on top of --data_timeout: room for rank 0's evaluation and saving


class PeerFailed(TrainerError):
    """Another rank failed or vanished; this rank stops too (that rank's own lines say why)."""


class PretrainingLoss(torch.nn.Module):
    """The model with `pretraining_loss` as its forward pass.

    DDP arms its gradient hooks in its own forward, so the whole masked-positions loss must run inside it:
    calling the model's submodules directly, as `pretraining_loss` does, would bypass them. Every parameter
    takes part (the pooler feeds the NSP head, the MLM decoder is tied to the word embeddings), so DDP needs
    no search for unused parameters.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: TensorBatch) -> PretrainingOutput:
        return pretraining_loss(self.model, batch)


class Ranks:
    """This process among the training processes; with one process every answer is local and immediate."""

    def __init__(self, config: DistributedConfig, control=None):
        self.rank, self.world_size, self.local_rank = config.rank, config.world_size, config.local_rank
        self._control = control  # the gloo group for CPU-side agreement; None with one process

    @classmethod
    def single(cls) -> "Ranks":
        return cls(DistributedConfig())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- agreement (CPU, the control group) ----------------------------------------------------------------

    def gather(self, values: Sequence[float], what: str) -> list[list[float]]:
        """Every rank's `values` (the same count on each), in rank order. Float64: integers up to 2**53 exact."""
        if not self.distributed:
            return [list(values)]
        mine = torch.tensor(list(values), dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective(what, dist.all_gather, every, mine, group=self._control)
        return [t.tolist() for t in every]

    def agree(self, vote: int, failure: Exception | None = None, values: Sequence[float] = (),
              what: str = "the step vote") -> list[list[float]]:
        """Every rank votes GO, STOP or FAIL; returns every rank's `values` if all voted GO.

        Otherwise raises, on every rank alike: this rank's own `failure`, PeerFailed when another rank failed,
        StopRequested when any rank is stopping (so all stop at the same step boundary).
        """
        rows = self.gather([vote, *values], what)
        votes = [int(row[0]) for row in rows]
        if failure is not None:
            raise failure
        failed = [str(r) for r, v in enumerate(votes) if v == FAIL]
        if failed:
            raise PeerFailed(f"rank {', '.join(failed)} failed (its own lines say why); rank {self.rank} stops too")
        if STOP in votes:
            raise StopRequested()
        return [row[1:] for row in rows]

    def barrier(self, what: str) -> None:
        """Wait for every rank (the others wait here while rank 0 evaluates or writes a checkpoint)."""
        if self.distributed:
            self._collective(what, dist.barrier, group=self._control)

    def gather_rng_states(self, device: torch.device) -> list[dict]:
        """Every rank's torch generator states (CPU, and its GPU's), for the checkpoint: each rank's dropout
        stream resumes where it was."""
        cpu = torch.get_rng_state()
        gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)
        if not self.distributed:
            return [{"torch": cpu, "cuda": gpu}]
        mine = torch.cat([cpu, gpu])
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective("gathering the random states", dist.all_gather, every, mine, group=self._control)
        return [{"torch": t[: cpu.numel()].clone(), "cuda": t[cpu.numel():].clone()} for t in every]

    # --- training (the training backend) ---------------------------------------------------------------------

    def wrap(self, model) -> torch.nn.Module:
        """The loss as a module: plain with one process, under DDP (which averages the gradients) with several."""
        loss = PretrainingLoss(model)
        if not self.distributed:
            return loss
        device = next(model.parameters()).device
        # No buffer broadcast in every forward: BERT's buffers (position and token type ids) are constants,
        # and it would be a collective outside the vote's protection. torch 2.13 renamed the flag.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_buffer_sync)

    @staticmethod
    def accumulating(module: torch.nn.Module, accumulate: bool):
        """DDP's no_sync on a micro-step whose gradients only accumulate (all but the step's last)."""
        if accumulate and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (on the device; logging steps only)."""
        if self.distributed:
            self._collective("summing the metrics", dist.all_reduce, tensor)
        return tensor

    def check_same_parameters(self, model) -> str:
        """A checksum of the parameters, compared across ranks: DDP keeps them equal, so a difference is a bug."""
        checksum = parameter_checksum(model)
        halves = [int(checksum[:8], 16), int(checksum[8:16], 16)]  # two 32-bit halves: exact in float64
        every = [[int(v) for v in row] for row in self.gather(halves, "comparing parameters")]
        differ = [r for r, row in enumerate(every) if row != every[0]]
        if differ:
            raise TrainerError(f"the parameters of rank {', '.join(map(str, differ))} differ from rank 0's after "
                               "training (checksums differ): a bug; rank 0's model was saved")
        return checksum

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, what: str, op, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except RuntimeError as exc:  # gloo: "Connection closed by peer"; NCCL: a DistBackendError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerFailed(f"rank {self.rank} lost the other ranks while {what} ({first}): another rank has "
                             "probably failed; its own lines say why") from exc


def start(config: DistributedConfig, device: torch.device, data_timeout_s: float) -> Ranks:
    """The process group from torchrun's environment (NCCL on GPUs, gloo on CPUs) and the control group.

    The control group's timeout bounds how long a vote may wait for a rank that waits for data: as long as
    --data_timeout lets it, plus room for rank 0's evaluations and checkpoints; with --data_timeout 0 (wait
    for producers forever) practically forever, as a single process would.
    """
    if config.world_size == 1:
        return Ranks(config)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    timeout = datetime.timedelta(seconds=data_timeout_s) + CONTROL_MARGIN if data_timeout_s else FOREVER
    control = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d of %d (local rank %d): %s process group on %s", config.rank, config.world_size,
             config.local_rank, backend, device)
    return Ranks(config, control)


def parameter_checksum(model) -> str:
    """sha256 of every parameter's name and bytes, in order (16 hex digits)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
