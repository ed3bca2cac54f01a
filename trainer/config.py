"""The trainer's configuration: one frozen dataclass per concern, each field that is a flag declared with it.

`flag(help, default, group=...)` (common/flags.py) makes a field a command-line flag: `trainer.cli` builds its
parser, `--help` and the flag tables in docs/flags.md from these declarations, and validation lives in each class's
`__post_init__`, so a config built in a test is checked as the command line's is. Nothing heavy is imported
here (no torch), and `cli`, `loop` and `distributed` all import this module rather than each other.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import security
from common.flags import flag
from common.shuffle import DEFAULT_MIX_ROWS
from common.wire import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:  # only the annotation: this module imports nothing of the trainer's at run time
    from trainer.local_producers import LocalProducersConfig

DEFAULT_BIND = "tcp://127.0.0.1:5555"
LR_SCHEDULES = ("linear", "cosine", "constant")  # after the warmup; see TrainConfig.lr_scheduler_type
_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")

# The parser's argument groups (the flags' `group`), in the order `--help` shows them.
GROUPS = {
    "seed": "the seed's flags (finetune_on_pregenerated.py)",
    "stream": "stream",
    "run": "run",
    "ranks": "several processes (torchrun)",
    "eval": "held-out evaluation",
}


@dataclass(frozen=True)
class ModelConfig:
    """The model to start from and how its tokenizer cases text."""

    bert_model: str = flag("hub name or local model directory", group="seed")
    # --do_lower_case / --no_lower_case, declared for both programs by common.config.add_lower_case_flags.
    do_lower_case: bool | None = None  # None: follow the tokenizer's own setting (decided once the model is resolved)


@dataclass(frozen=True)
class SourceConfig:
    """Where batches come from: seed-format files when `pregenerated_data` is set, else the stream at `bind`."""

    pregenerated_data: str | None = flag(
        "read the seed's epoch_{i}.json files from this folder instead of the stream", None, group="seed")
    reduce_memory: bool = flag("pregenerated data: keep an epoch in memory maps on disk instead of RAM", False,
                               group="seed")
    # The flag's own default is None ("not given"), so the CLI can refuse it beside --pregenerated_data.
    bind: str = flag(f"PULL endpoint producers connect to (default {DEFAULT_BIND}); not with --pregenerated_data",
                     DEFAULT_BIND, group="stream", cli_default=None)
    data_timeout_s: float = flag("seconds without a batch before giving up (0 = wait forever)", 0.0,
                                 group="stream", name="data_timeout")
    prefetch_batches: int = flag("decoded micro-batches held ready ahead of the training loop", 4, group="stream")
    # Rows pooled from received messages; micro-batches are drawn from the pool at random.
    mix_rows: int = flag(
        "rows pooled from the received messages; each micro-batch is drawn at random from the pool (seeded by --seed "
        "and the rank), so it mixes documents, workers and producers; raised to the micro-batch if smaller; 0: "
        "arrival order (default %(default)s)", DEFAULT_MIX_ROWS, group="stream")
    # Micro-batches of rows of similar length (common.shuffle.RowPool), so padding each to its longest row leaves
    # little padding; off, rows are drawn from the pool regardless of length.
    group_by_length: bool = flag(
        "draw each micro-batch from the mixing pool at random regardless of length (default: rows of similar "
        "length, drawn so the lengths trained on follow the stream's)", True, group="stream",
        name="no_group_by_length", negated=True)
    # 0: PAD_MULTIPLE (8), or with --compile the ladder of common.lengths.compile_widths.
    pad_to_multiple_of: int = flag(
        "pad each micro-batch to its longest row rounded up to a multiple of this (0: 8, or with --compile a "
        "ladder of 8 widths at seq 128, 14 at 512); max_seq_len or more pads every batch to max_seq_len", 0,
        group="run")
    max_message_bytes: int = flag("larger frames are dropped unread (ZMQ_MAXMSGSIZE and the decoder's limit)",
                                  DEFAULT_MAX_MESSAGE_BYTES, group="stream")
    curve_secret_key: str | None = flag(
        "the trainer's NAME.key_secret (from bertstream-keys, mode 0600): CURVE-encrypt the stream and admit only "
        "the producers in --curve_authorized_keys", None, group="stream", metavar="FILE")
    curve_authorized_keys: str | None = flag(
        "folder of the producers' public NAME.key files; a producer with any other key (or none) never gets a "
        "batch through; needs --curve_secret_key", None, group="stream", metavar="DIR")

    def __post_init__(self) -> None:
        if self.pregenerated_data is None and not _ENDPOINT.match(self.bind):
            raise ValueError(f"--bind {self.bind!r}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
        if self.pregenerated_data is not None and not Path(self.pregenerated_data).is_dir():
            raise ValueError(f"--pregenerated_data {self.pregenerated_data}: not a directory")
        if self.data_timeout_s < 0:
            raise ValueError(f"--data_timeout must be >= 0 seconds (0 = wait forever), got {self.data_timeout_s}")
        if self.prefetch_batches < 1:
            raise ValueError(f"--prefetch_batches must be >= 1, got {self.prefetch_batches}")
        if self.mix_rows < 0:
            raise ValueError(f"--mix_rows must be >= 0 (0 = arrival order), got {self.mix_rows}")
        if self.pad_to_multiple_of < 0:
            raise ValueError(f"--pad_to_multiple_of must be >= 0 (0 = the default widths), got "
                             f"{self.pad_to_multiple_of}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"--max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        security.both_or_neither(("--curve_secret_key", self.curve_secret_key),
                                 ("--curve_authorized_keys", self.curve_authorized_keys))
        if self.curve_secret_key is not None:
            if self.pregenerated_data is not None:
                raise ValueError("--curve_secret_key and --curve_authorized_keys secure the stream (--bind), "
                                 "not --pregenerated_data")
            self.curve_keys()  # read now: a bad key file is a usage error, not a failure after the model loads

    def curve_keys(self) -> security.ServerKeys | None:
        """The keys behind the two CURVE flags (read from the files each call), or None without them."""
        if self.curve_secret_key is None:
            return None
        return security.server_keys(self.curve_secret_key, self.curve_authorized_keys)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation (the seed's semantics) and what the run writes."""

    output_dir: str = flag("metrics.jsonl, checkpoints/ and the final model + tokenizer; rerunning resumes here",
                           group="seed")
    epochs: int = flag("steps = epochs x instances of an epoch / --train_batch_size, unless --max_steps", 3,
                       group="seed")
    gradient_accumulation_steps: int = flag(
        "micro-batches per optimizer step; the micro-batch is --train_batch_size / this / ranks", 1, group="seed")
    # Instances per optimizer step, all accumulation steps and ranks together.
    train_batch_size: int = flag("total batch per optimizer step", 32, group="seed")
    warmup_proportion: float = flag(
        "linear warmup over this share of the steps, then --lr_scheduler_type (linear decay to 0)", 0.1, group="seed")
    learning_rate: float = flag(
        "AdamW peak learning rate (weight decay 0.01, none on biases and LayerNorm weights)", 3e-5, group="seed")
    seed: int = flag("seeds torch, numpy, random and the pregenerated data's per-epoch shuffle", 42, group="seed")
    max_steps: int = flag("optimizer steps (0 = from --epochs)", 0, group="run")
    lr_scheduler_type: str = flag(
        "the learning rate after the warmup (transformers' get_scheduler): linear decay to 0, cosine decay to 0, "
        "or constant", "linear", group="run", choices=LR_SCHEDULES)
    logging_steps: int = flag("a metrics record and a progress line every this many steps (and at the last)", 50,
                              group="run")
    save_steps: int = flag("0 = checkpoint only at the end", 1000, group="run")
    keep_checkpoints: int = flag("the newest this many checkpoints are kept", 3, group="run")
    # Continue from the newest complete checkpoint in output_dir.
    resume: bool = flag("start afresh: delete the checkpoints and metrics of an earlier run in --output_dir", True,
                        group="run", name="no_resume", negated=True)
    allow_max_seq_len_change: bool = flag(
        "resume from a checkpoint trained at another max_seq_len (BERT's two phases: most steps at 128, then 512); "
        "the schedule and optimizer continue", False, group="run")
    weight_decay: float = 0.01  # AdamW decay, except on biases and LayerNorm weights
    max_grad_norm: float = 1.0
    world_size: int = 1  # training processes (torchrun's WORLD_SIZE); each takes an equal share of every step

    def __post_init__(self) -> None:
        positive = {"--epochs": self.epochs, "--train_batch_size": self.train_batch_size,
                    "--gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "--logging_steps": self.logging_steps, "--keep_checkpoints": self.keep_checkpoints}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in {"--max_steps": self.max_steps, "--save_steps": self.save_steps}.items():
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"--train_batch_size {self.train_batch_size} is not divisible by --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} (the micro-batch is their quotient)")
        if self.train_batch_size % (self.gradient_accumulation_steps * self.world_size):
            raise ValueError(
                f"--train_batch_size {self.train_batch_size} is not divisible by --gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} x {self.world_size} processes (WORLD_SIZE): it stays the total "
                "batch of a step, and each process's micro-batch is train_batch_size / (gradient_accumulation_steps "
                "x WORLD_SIZE)")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise ValueError(f"--warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"--lr_scheduler_type {self.lr_scheduler_type!r}: expected one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output_dir {self.output_dir}: exists and is not a directory")

    @property
    def micro_batch_size(self) -> int:
        """Instances per forward/backward pass of one process."""
        return self.train_batch_size // (self.gradient_accumulation_steps * self.world_size)


@dataclass(frozen=True)
class DeviceConfig:
    """Where and in which precision to train."""

    no_cuda: bool = flag("train on the CPU even when a GPU is there", False, group="seed")
    fp16: bool = flag("float16 autocast with a GradScaler (CUDA; on the CPU it warns and trains in float32)", False,
                      group="seed")
    loss_scale: float = flag("fp16: 0 = dynamic, else a static scale", 0.0, group="seed")
    bf16: bool = flag("bfloat16 autocast, no loss scaling", False, group="run")
    compile: bool = flag("torch.compile the model's training step: one graph per width (see --pad_to_multiple_of)",
                         False, group="run")

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 exclude each other; pass one")
        if self.loss_scale < 0:
            raise ValueError(f"--loss_scale must be >= 0 (0 = dynamic), got {self.loss_scale}")
        if self.loss_scale and not self.fp16:
            raise ValueError(f"--loss_scale {self.loss_scale} applies only with --fp16")


@dataclass(frozen=True)
class DistributedConfig:
    """This process's place among the training processes: the one place rank and world size are decided.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; with WORLD_SIZE above 1 every process
    trains with DDP on its own stream (see docs/scaling.md). Only rank 0
    writes (metrics, checkpoints, the final model).
    """

    # The seed's flag; torchrun sets LOCAL_RANK instead (see from_env).
    local_rank: int = flag("the GPU of this process (torchrun sets LOCAL_RANK instead; both must agree if given)",
                           -1, group="seed", aliases=("--local-rank",))
    rank: int = 0  # this process among all training processes, 0 .. world_size-1
    world_size: int = 1  # training processes in all, on every node
    local_world_size: int = 1  # training processes on this node (they bind consecutive ports)
    interface: str | None = flag(
        "network interface the ranks' gloo groups use (as GLOO_SOCKET_IFNAME); default: the one that routes to "
        "the other nodes", None, group="ranks", name="dist_interface", metavar="NAME")
    connect_timeout_s: float = flag(
        "seconds a rank may take to reach the rendezvous and every other rank before it stops, naming the address "
        "it tried", 300.0, group="ranks", name="dist_connect_timeout")

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"--dist_connect_timeout must be > 0 seconds, got {self.connect_timeout_s}")
        if self.interface is not None:
            names = [name for _, name in socket.if_nameindex()]
            if self.interface not in names:
                raise ValueError(f"--dist_interface {self.interface}: no such network interface on this host (it "
                                 f"has {', '.join(names)}); name the one the nodes reach each other on")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} WORLD_SIZE={self.world_size}: expected 0 <= RANK < WORLD_SIZE")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(f"LOCAL_WORLD_SIZE={self.local_world_size}: expected 1 .. WORLD_SIZE "
                             f"({self.world_size})")
        if self.world_size > 1 and self.local_rank == -1:
            raise ValueError(f"WORLD_SIZE={self.world_size} without LOCAL_RANK: start the processes with torchrun, "
                             "which sets both")
        if self.world_size > 1 and not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"LOCAL_RANK={self.local_rank}: expected 0 .. LOCAL_WORLD_SIZE-1 "
                             f"({self.local_world_size - 1}); start several processes with torchrun")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def endpoint(self, bind: str) -> str:
        """The stream endpoint this process binds: `--bind` for the node's first process, then one per process.

        tcp://HOST:PORT -> PORT + LOCAL_RANK, what producers' `--ranks_per_endpoint` expects. With several
        processes on a node, ipc://PATH and inproc://NAME get `-LOCAL_RANK` appended (ipc:///tmp/s ->
        ipc:///tmp/s-0, ipc:///tmp/s-1, ...).
        """
        if self.local_world_size == 1:
            return bind
        local = max(self.local_rank, 0)
        if not bind.startswith("tcp://"):
            return f"{bind}-{local}"
        match = re.match(r"^(tcp://[^\s:]+:)(\d+)$", bind)
        if not match:
            raise ValueError(f"--bind {bind}: {self.local_world_size} processes on this node bind consecutive "
                             "ports from the one given, so it needs a port number (not *)")
        port = int(match[2]) + local
        if port > 65535:
            raise ValueError(f"--bind {bind}: with {self.local_world_size} processes on this node the ports run "
                             f"past 65535")
        return f"{match[1]}{port}"

    @classmethod
    def from_env(cls, local_rank: int, interface: str | None = None,
                 connect_timeout_s: float = 300.0) -> "DistributedConfig":
        """torchrun's environment, plus the seed's --local_rank (which must agree with LOCAL_RANK if both are set)."""
        def env_int(name: str, default: int) -> int:
            value = os.environ.get(name)
            if value is None or value == "":
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected an integer (set by torchrun)") from None

        env_local = env_int("LOCAL_RANK", -1)
        if local_rank != -1 and env_local != -1 and local_rank != env_local:
            raise ValueError(f"--local_rank {local_rank} but LOCAL_RANK={env_local}: they select the GPU and must "
                             "agree (under torchrun, leave --local_rank out)")
        world_size = env_int("WORLD_SIZE", 1)
        return cls(local_rank=local_rank if local_rank != -1 else env_local, rank=env_int("RANK", 0),
                   world_size=world_size, local_world_size=env_int("LOCAL_WORLD_SIZE", world_size),
                   interface=interface, connect_timeout_s=connect_timeout_s)


@dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation set and how often it is scored."""

    # A corpus source (text, JSONL, Parquet, dataset, hf:NAME); None = no evaluation.
    eval_corpus: str | None = flag(
        "held-out text (corpus format; also JSONL, Parquet, datasets): MLM loss/accuracy and NSP accuracy at start, "
        "every --eval_steps, end", None, group="eval")
    eval_steps: int = flag("0 = only at start and end", 500, group="eval")
    eval_instances: int = flag("size of the fixed evaluation set", 512, group="eval")
    # The CLI fills in common.vocab.default_cache_dir() when the flag is absent.
    cache_dir: str = flag("where the eval corpus's (and with --train_corpus the training corpus's) token index is "
                          "kept", "", group="eval", cli_default=None)
    # How --eval_corpus is read: the producer's flags of the same names (common.readers.add_source_flags
    # declares them for both programs).
    text_field: str = "text"
    dataset_split: str = "train"
    split_sentences: bool = False

    def __post_init__(self) -> None:
        corpus = self.eval_corpus
        if corpus is not None and not corpus.startswith("hf:") and not Path(corpus).exists():
            raise ValueError(f"--eval_corpus {corpus}: no such file")
        if self.eval_steps < 0:
            raise ValueError(f"--eval_steps must be >= 0, got {self.eval_steps}")
        if self.eval_instances < 1:
            raise ValueError(f"--eval_instances must be >= 1, got {self.eval_instances}")


@dataclass(frozen=True)
class TrainerConfig:
    """Every section, as logged at start-up and stored in every checkpoint."""

    model: ModelConfig
    source: SourceConfig
    train: TrainConfig
    device: DeviceConfig
    distributed: DistributedConfig
    eval: EvalConfig
    local: LocalProducersConfig | None = None  # issue 14: --train_corpus; None: producers connect

    def to_dict(self) -> dict:
        return asdict(self)
