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
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.progress import log
from trainer import TrainerError
from trainer.compiled import CompiledStep, compile_in_place, eager_module
from trainer.config import DistributedConfig
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
    calling the model's submodules directly, as `pretraining_loss` does, would bypass them. Every trainable
    parameter takes part (the pooler feeds the NSP head; see `freeze_unused_mlm_bias` for the one that may
    not), so DDP needs no search for unused parameters.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: TensorBatch) -> PretrainingOutput:
        return pretraining_loss(self.model, batch)


def freeze_unused_mlm_bias(model, rank: int = 0) -> bool:
    """With untied word embeddings, take `cls.predictions.bias` out of training: the forward pass never uses it.

    BERT's MLM head adds an output bias, `cls.predictions.bias`. transformers 5 ties the decoder's own bias
    (`cls.predictions.decoder.bias`, the one its forward pass adds) to it only together with the word
    embeddings, when the config's `tie_word_embeddings` is true. A checkpoint with `tie_word_embeddings: false`
    therefore has two biases, and the stock forward pass and the masked-positions one alike use only the
    decoder's. The other gets no gradient, and DDP, which expects a gradient for every parameter that requires
    one, fails at the second step ("Expected to have finished reduction in the prior iteration").

    Freezing it says so and costs nothing: its values are kept (and saved) as loaded, and AdamW never stepped
    it anyway (no gradient). `find_unused_parameters=True` would also work, but DDP then walks the autograd
    graph from the loss after every forward pass to find parameters outside it, on every step, for the sake
    of one vector. Returns whether it froze the bias.
    """
    head = model.cls.predictions
    if head.decoder.bias is head.bias or not head.bias.requires_grad:
        return False
    head.bias.requires_grad_(False)
    if rank == 0:
        log.info("the model's word embeddings are untied (tie_word_embeddings false): its MLM head adds "
                 "cls.predictions.decoder.bias, so cls.predictions.bias, unused, is frozen (kept as loaded)")
    return True


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

    def wrap(self, model, compile_backend: str | None = None, widths: Sequence[int] = ()):
        """The loss as a module: plain with one process, under DDP (which averages the gradients) with several.

        With `compile_backend` (--compile), the loss module is compiled in place first (DDP then wraps it, as
        torch advises), for micro-batches of the given `widths`, and the result is a CompiledStep around it.
        """
        loss = PretrainingLoss(model)
        if self.distributed:
            freeze_unused_mlm_bias(model, self.rank)
        limit = compile_in_place(loss, widths, compile_backend) if compile_backend is not None else None
        module = self._ddp(loss) if self.distributed else loss
        return module if limit is None else CompiledStep(module, widths, limit, compile_backend, self.is_main)

    def _ddp(self, loss: PretrainingLoss) -> DistributedDataParallel:
        model = loss.model
        device = next(model.parameters()).device
        # No buffer broadcast in every forward: BERT's buffers (position and token type ids) are constants,
        # and it would be a collective outside the vote's protection. torch 2.13 renamed the flag.
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_buffer_sync)

    @staticmethod
    def accumulating(module, accumulate: bool):
        """DDP's no_sync on a micro-step whose gradients only accumulate (all but the step's last).

        `module` is what `wrap` returned: under --compile a CompiledStep, around the DDP module, whose no_sync
        stays eager (only the loss module inside it is compiled) and decides whether the backward all-reduces.
        """
        module = eager_module(module)
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

    Start-up is bounded by --dist_connect_timeout: reaching the rendezvous (MASTER_ADDR:MASTER_PORT), then
    the gloo groups' connections to every other rank. A rank that cannot get through in that time ends with
    a message naming the address it tried, instead of waiting as long as the groups' running timeouts allow.
    Those are set once every rank is connected: the control group's bounds how long a vote may wait for a
    rank that waits for data, as long as --data_timeout lets it plus room for rank 0's evaluations and
    checkpoints; with --data_timeout 0 (wait for producers forever) practically forever, as a single process.
    """
    if config.world_size == 1:
        return Ranks(config)
    backend = "nccl" if device.type == "cuda" else "gloo"
    connect = datetime.timedelta(seconds=config.connect_timeout_s)
    master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        store, _, _ = next(dist.rendezvous("env://", config.rank, config.world_size, timeout=connect))
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError: RuntimeErrors
        raise TrainerError(f"rank {config.rank}: no rendezvous with the other ranks at {master} (MASTER_ADDR:"
                           f"MASTER_PORT) within --dist_connect_timeout {config.connect_timeout_s:g} s "
                           f"({_first_line(exc)}): is every node's torchrun started, with the same "
                           "--rdzv_endpoint, and is that address reachable from this node?") from exc
    network = choose_network(config, store)
    if network.interface is not None:
        # gloo reads GLOO_SOCKET_IFNAME when it creates a group (torch's Python API takes no device for
        # new_group): set here, it applies to this process's gloo groups. The user's own value was chosen
        # unless --dist_interface overrides it.
        os.environ["GLOO_SOCKET_IFNAME"] = network.interface
    where = network.describe()
    try:
        # NCCL connects lazily, at its first collective, through its own interface choice (NCCL_SOCKET_IFNAME).
        dist.init_process_group(backend=backend, store=store, rank=config.rank, world_size=config.world_size,
                                **({"timeout": connect} if backend == "gloo" else {}))
        control = dist.new_group(backend="gloo", timeout=connect)
        dist.barrier(group=control)  # every rank connected to every other, within the bound
    except RuntimeError as exc:  # gloo: "Connection refused", "Timed out", "Unable to find address for"
        raise TrainerError(f"rank {config.rank} could not connect to the other ranks within --dist_connect_timeout "
                           f"{config.connect_timeout_s:g} s over {where} ({_first_line(exc)}): give every node "
                           "--dist_interface (or GLOO_SOCKET_IFNAME) naming the network interface the nodes "
                           "reach each other on (`ip -brief address` lists them)") from exc
    # torch's own setter of a group's timeout (private in 2.13, kept since 2.3): the running timeouts.
    if backend == "gloo":
        dist.distributed_c10d._set_pg_timeout(dist.default_pg_timeout, None)
    timeout = datetime.timedelta(seconds=data_timeout_s) + CONTROL_MARGIN if data_timeout_s else FOREVER
    dist.distributed_c10d._set_pg_timeout(timeout, control)
    log.info("rank %d of %d (local rank %d): %s process group on %s; gloo over %s", config.rank, config.world_size,
             config.local_rank, backend, device, where)
    return Ranks(config, control)


@dataclass(frozen=True)
class Network:
    """The interface the gloo groups use, and why: what start-up's messages name."""

    interface: str | None  # for GLOO_SOCKET_IFNAME; None: gloo's own choice (the host name's address)
    address: str  # that interface's address, as far as known
    reason: str  # how it was chosen

    def describe(self) -> str:
        name = self.interface or "the host name's address"
        return f"{name} ({self.address}, {self.reason})"


def choose_network(config: DistributedConfig, store) -> Network:
    """The network interface this rank's gloo groups bind: --dist_interface, else GLOO_SOCKET_IFNAME, else the
    one that routes to the other ranks.

    gloo's own default is the address the host name resolves to, which default Debian and Ubuntu installs map
    to 127.0.1.1: the other nodes cannot reach it, and gloo waits for them until its timeout. The route to
    MASTER_ADDR (where this rank just reached the rendezvous) is the interface the others can reach, except on
    rank 0's node, where MASTER_ADDR is the node itself (torchrun's c10d rendezvous publishes that node's host
    name): there the route to another node's address (published by its ranks in the rendezvous store) is used.
    """
    if config.interface:
        return Network(config.interface, interface_address(config.interface) or "?", "--dist_interface")
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        name = os.environ["GLOO_SOCKET_IFNAME"]
        return Network(name, interface_address(name) or "?", "GLOO_SOCKET_IFNAME")
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    address, toward = route_to(master), f"the route to MASTER_ADDR {master}"
    # Keyed by torchrun's restart count too: the agent's store outlives a restart, and its keys with it.
    key = f"bertstream/route/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{key}{config.rank}", address)
    if ipaddress.ip_address(address).is_loopback and config.local_world_size < config.world_size:
        # The first rank of the next node (torchrun numbers a node's ranks consecutively).
        peer = (config.rank // config.local_world_size + 1) * config.local_world_size % config.world_size
        try:
            theirs = store.get(f"{key}{peer}").decode()
        except RuntimeError as exc:
            raise TrainerError(f"rank {config.rank}: rank {peer} never published its address in the rendezvous "
                               f"store within --dist_connect_timeout {config.connect_timeout_s:g} s "
                               f"({_first_line(exc)})") from exc
        address, toward = route_to(theirs), f"the route to rank {peer}'s address {theirs}"
    interface = interface_of(address)
    if interface is None:
        log.warning("rank %d: no network interface has %s (%s); gloo picks its own (set --dist_interface if the "
                    "ranks cannot connect)", config.rank, address, toward)
    return Network(interface, address, toward)


def route_to(host: str) -> str:
    """This host's address on the route to `host` (a UDP socket's connect sends nothing; it only routes)."""
    family, _, _, _, target = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(target)
        return probe.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The network interface that has `address` (IPv4, Linux), None if none is found; any 127/8 address is
    the loopback interface's."""
    loopback = ipaddress.ip_address(address).is_loopback
    for _, name in socket.if_nameindex():
        mine = interface_address(name)
        if mine == address or (loopback and mine and ipaddress.ip_address(mine).is_loopback):
            return name
    return None


def interface_address(name: str) -> str | None:
    """`name`'s IPv4 address (SIOCGIFADDR, Linux), None without one."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parameter_checksum(model) -> str:
    """sha256 of every parameter's name and bytes, in order (16 hex digits)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
