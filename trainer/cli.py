"""Command line -> frozen, validated configs, one per concern; then run, and turn the outcome into an exit code.

The flags are the seed's `finetune_on_pregenerated.py` flags with the seed's defaults, plus the stream's and
the run's. Everything the user can get wrong is refused here, before any model is loaded, with a message that
names the flag and the value (exit 2). Nothing heavy (torch, transformers, zmq) is imported at module level,
so `--help` and usage errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from common import security
from common.config import add_lower_case_flags
from common.progress import log, setup_logging
from common.shuffle import DEFAULT_MIX_ROWS
from common.wire import DEFAULT_MAX_MESSAGE_BYTES
from trainer import local_producers  # issue 14: --train_corpus, the trainer starting its own producer
from trainer import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE, StoppedEarly, TrainerError

DEFAULT_BIND = "tcp://127.0.0.1:5555"
_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")


@dataclass(frozen=True)
class ModelConfig:
    """The model to start from and how its tokenizer cases text."""

    bert_model: str  # hub name or local directory holding a BERT and its tokenizer
    do_lower_case: bool | None  # None: follow the tokenizer's own setting (decided once the model is resolved)


@dataclass(frozen=True)
class SourceConfig:
    """Where batches come from: seed-format files when `pregenerated_data` is set, else the stream at `bind`."""

    pregenerated_data: str | None = None  # folder of epoch_{i}.json + epoch_{i}_metrics.json
    reduce_memory: bool = False  # pregenerated: hold an epoch in memory maps in a temporary folder
    bind: str = DEFAULT_BIND  # stream: the PULL socket's endpoint (producers connect here)
    data_timeout_s: float = 0.0  # stream: error after this long without a batch; 0 waits forever
    prefetch_batches: int = 4  # stream: decoded micro-batches held ready ahead of the loop
    mix_rows: int = DEFAULT_MIX_ROWS  # stream: rows pooled from received messages, micro-batches drawn at random
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # stream: larger messages are rejected unread
    curve_secret_key: str | None = None  # stream: the trainer's NAME.key_secret; turns CURVE on
    curve_authorized_keys: str | None = None  # stream: folder of the producers' public NAME.key files

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

    output_dir: str
    epochs: int = 3
    max_steps: int = 0  # optimizer steps; 0 = epochs x the instances of an epoch / train_batch_size
    train_batch_size: int = 32  # instances per optimizer step, all accumulation steps together
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-5
    warmup_proportion: float = 0.1  # share of the steps with a linearly rising learning rate
    weight_decay: float = 0.01  # AdamW decay, except on biases and LayerNorm weights
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 50  # a metrics record and a progress line every this many steps
    save_steps: int = 1000  # a checkpoint every this many steps (0 = only at the end)
    keep_checkpoints: int = 3  # the newest this many checkpoints are kept
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
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
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output_dir {self.output_dir}: exists and is not a directory")

    @property
    def micro_batch_size(self) -> int:
        """Instances per forward/backward pass of one process."""
        return self.train_batch_size // (self.gradient_accumulation_steps * self.world_size)


@dataclass(frozen=True)
class DeviceConfig:
    """Where and in which precision to train."""

    no_cuda: bool = False
    fp16: bool = False  # float16 autocast with a GradScaler (CUDA only; the CPU trains in float32)
    bf16: bool = False  # bfloat16 autocast, no scaler
    loss_scale: float = 0.0  # fp16: 0 = dynamic loss scaling, else this static scale

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
    trains with DDP on its own stream (see the README, "Several GPUs and several producer hosts"). Only rank 0 writes (metrics, checkpoints, the
    final model).
    """

    local_rank: int = -1  # the seed's flag; torchrun sets LOCAL_RANK instead. Selects the GPU
    rank: int = 0  # this process among all training processes, 0 .. world_size-1
    world_size: int = 1  # training processes in all, on every node
    local_world_size: int = 1  # training processes on this node (they bind consecutive ports)
    interface: str | None = None  # network interface of the gloo groups; None: the one routing to the others
    connect_timeout_s: float = 300.0  # start-up's bound: reaching the rendezvous and every other rank

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

    eval_corpus: str | None = None  # a corpus source (text, JSONL, Parquet, dataset, hf:NAME); None = no evaluation
    eval_steps: int = 500  # evaluate every this many steps (0 = only at start and end)
    eval_instances: int = 512  # instances in the fixed evaluation set
    cache_dir: str = ""  # where the evaluation corpus's token index is kept
    text_field: str = "text"  # how --eval_corpus is read: as the producer's flags of the same names
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
    model: ModelConfig
    source: SourceConfig
    train: TrainConfig
    device: DeviceConfig
    distributed: DistributedConfig
    eval: EvalConfig
    local: local_producers.LocalProducersConfig | None = None  # issue 14: --train_corpus; None: producers connect

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bertstream-trainer",
        description="Fine-tune BertForPreTraining (MLM + NSP) on a bertstream stream or on seed-format files.",
        epilog="Exit codes: 0 done; 1 error; 2 bad flags; 75 stopped by SIGTERM/SIGINT with a checkpoint saved "
               "(run the same command again to resume); 130 a second signal stopped it without one.")
    seed = p.add_argument_group("the seed's flags (finetune_on_pregenerated.py)")
    seed.add_argument("--pregenerated_data", type=str, default=None,
                      help="read the seed's epoch_{i}.json files from this folder instead of the stream")
    seed.add_argument("--output_dir", type=str, required=True,
                      help="metrics.jsonl, checkpoints/ and the final model + tokenizer; rerunning resumes here")
    seed.add_argument("--bert_model", type=str, required=True, help="hub name or local model directory")
    add_lower_case_flags(seed, "must match the producer's, it is in the fingerprint")
    seed.add_argument("--reduce_memory", action="store_true",
                      help="pregenerated data: keep an epoch in memory maps on disk instead of RAM")
    seed.add_argument("--epochs", type=int, default=3,
                      help="steps = epochs x instances of an epoch / --train_batch_size, unless --max_steps")
    seed.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                      help="the GPU of this process (torchrun sets LOCAL_RANK instead; both must agree if given)")
    seed.add_argument("--no_cuda", action="store_true", help="train on the CPU even when a GPU is there")
    seed.add_argument("--gradient_accumulation_steps", type=int, default=1,
                      help="micro-batches per optimizer step; the micro-batch is --train_batch_size / this / ranks")
    seed.add_argument("--train_batch_size", type=int, default=32, help="total batch per optimizer step")
    seed.add_argument("--fp16", action="store_true",
                      help="float16 autocast with a GradScaler (CUDA; on the CPU it warns and trains in float32)")
    seed.add_argument("--loss_scale", type=float, default=0.0, help="fp16: 0 = dynamic, else a static scale")
    seed.add_argument("--warmup_proportion", type=float, default=0.1,
                      help="linear warmup over this share of the steps, then linear decay to 0")
    seed.add_argument("--learning_rate", type=float, default=3e-5,
                      help="AdamW peak learning rate (weight decay 0.01, none on biases and LayerNorm weights)")
    seed.add_argument("--seed", type=int, default=42,
                      help="seeds torch, numpy, random and the pregenerated data's per-epoch shuffle")

    stream = p.add_argument_group("stream")
    stream.add_argument("--bind", type=str, default=None, help=f"PULL endpoint producers connect to "
                        f"(default {DEFAULT_BIND}); not with --pregenerated_data")
    stream.add_argument("--data_timeout", type=float, default=0.0,
                        help="seconds without a batch before giving up (0 = wait forever)")
    stream.add_argument("--prefetch_batches", type=int, default=4,
                        help="decoded micro-batches held ready ahead of the training loop")
    stream.add_argument("--mix_rows", type=int, default=DEFAULT_MIX_ROWS,
                        help="rows pooled from the received messages; each micro-batch is drawn at random from "
                        "the pool (seeded by --seed and the rank), so it mixes documents, workers and producers; "
                        "raised to the micro-batch if smaller; 0: arrival order (default %(default)s)")
    stream.add_argument("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="larger frames are dropped unread (ZMQ_MAXMSGSIZE and the decoder's limit)")
    stream.add_argument("--curve_secret_key", type=str, default=None, metavar="FILE",
                        help="the trainer's NAME.key_secret (from bertstream-keys, mode 0600): CURVE-encrypt the "
                        "stream and admit only the producers in --curve_authorized_keys")
    stream.add_argument("--curve_authorized_keys", type=str, default=None, metavar="DIR",
                        help="folder of the producers' public NAME.key files; a producer with any other key (or "
                        "none) never gets a batch through; needs --curve_secret_key")

    run = p.add_argument_group("run")
    run.add_argument("--max_steps", type=int, default=0, help="optimizer steps (0 = from --epochs)")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast, no loss scaling")
    run.add_argument("--logging_steps", type=int, default=50,
                     help="a metrics record and a progress line every this many steps (and at the last)")
    run.add_argument("--save_steps", type=int, default=1000, help="0 = checkpoint only at the end")
    run.add_argument("--keep_checkpoints", type=int, default=3, help="the newest this many checkpoints are kept")
    run.add_argument("--no_resume", action="store_true",
                     help="start afresh: delete the checkpoints and metrics of an earlier run in --output_dir")

    ranks = p.add_argument_group("several processes (torchrun)")
    ranks.add_argument("--dist_interface", type=str, default=None, metavar="NAME",
                       help="network interface the ranks' gloo groups use (as GLOO_SOCKET_IFNAME); default: the "
                       "one that routes to the other nodes")
    ranks.add_argument("--dist_connect_timeout", type=float, default=300.0,
                       help="seconds a rank may take to reach the rendezvous and every other rank before it "
                       "stops, naming the address it tried")

    ev = p.add_argument_group("held-out evaluation")
    ev.add_argument("--eval_corpus", type=str, default=None,
                    help="held-out text (corpus format; also JSONL, Parquet, datasets): MLM loss/accuracy and "
                    "NSP accuracy at start, every --eval_steps, end")
    ev.add_argument("--eval_steps", type=int, default=500, help="0 = only at start and end")
    ev.add_argument("--eval_instances", type=int, default=512, help="size of the fixed evaluation set")
    ev.add_argument("--cache_dir", type=str, default=None,
                    help="where the eval corpus's (and with --train_corpus the training corpus's) token index is kept")
    from common.readers import add_source_flags  # stdlib only: the flags are checked before torch is imported

    add_source_flags(ev)
    local_producers.add_flags(p)  # issue 14: --train_corpus and the producer's generation flags, copied from it
    return p


def parse_args(argv: list[str] | None = None) -> TrainerConfig:
    """Flags -> TrainerConfig; any invalid value ends the process with exit 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pregenerated_data is not None and args.bind is not None:
        parser.error(f"--pregenerated_data {args.pregenerated_data} and --bind {args.bind} are two sources; "
                     "give one")
    try:
        from common.vocab import default_cache_dir

        cache_dir = args.cache_dir or str(default_cache_dir())
        local = local_producers.parse_config(args, parser, cache_dir)  # issue 14: None without --train_corpus
        distributed = DistributedConfig.from_env(args.local_rank, args.dist_interface, args.dist_connect_timeout)
        if args.pregenerated_data is None:
            distributed.endpoint(args.bind or DEFAULT_BIND)  # a --bind the node's processes cannot share fails here
        return TrainerConfig(
            model=ModelConfig(bert_model=args.bert_model, do_lower_case=args.do_lower_case),
            source=SourceConfig(
                pregenerated_data=args.pregenerated_data, reduce_memory=args.reduce_memory,
                bind=args.bind or DEFAULT_BIND, data_timeout_s=args.data_timeout,
                prefetch_batches=args.prefetch_batches, max_message_bytes=args.max_message_bytes,
                mix_rows=args.mix_rows, curve_secret_key=args.curve_secret_key, curve_authorized_keys=args.curve_authorized_keys),
            train=TrainConfig(
                output_dir=args.output_dir, epochs=args.epochs, max_steps=args.max_steps,
                train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                learning_rate=args.learning_rate, warmup_proportion=args.warmup_proportion, seed=args.seed,
                logging_steps=args.logging_steps, save_steps=args.save_steps,
                keep_checkpoints=args.keep_checkpoints, resume=not args.no_resume,
                world_size=distributed.world_size),
            device=DeviceConfig(no_cuda=args.no_cuda, fp16=args.fp16, bf16=args.bf16, loss_scale=args.loss_scale),
            distributed=distributed,
            eval=EvalConfig(eval_corpus=args.eval_corpus, eval_steps=args.eval_steps,
                            eval_instances=args.eval_instances,
                            cache_dir=cache_dir, text_field=args.text_field,
                            dataset_split=args.dataset_split, split_sentences=args.split_sentences),
            local=local,
        )
    except ValueError as exc:
        parser.error(str(exc))


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT set the yielded event; the loop saves a checkpoint at the next step boundary, exits 75.

    A second signal while the first is being honoured stops at once, without a checkpoint. The previous
    handlers come back on exit, so an in-process caller (a test) keeps its own.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield stop
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (tokenizer pool workers) inherits this: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop.is_set():
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: exiting without a checkpoint")
        log.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                    signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    if config.distributed.world_size > 1:  # torchrun interleaves the ranks' lines: name each rank in its lines
        multiprocessing.current_process().name = f"rank{config.distributed.rank}"
    if config.distributed.is_main:
        log.info("trainer config: %s", json.dumps(config.to_dict(), sort_keys=True))
    from common.corpus import CorpusError
    from common.vocab import ModelNotFoundError
    from trainer.loop import run_training  # torch and transformers load here, after the flags are known good

    try:
        # issue 14: with --train_corpus the producer starts here, in the main thread (PR_SET_PDEATHSIG needs it),
        # indexing the corpus while the model loads, and stops on every way out of this block.
        with stop_on_signals() as stop, (local_producers.for_config(config) or contextlib.nullcontext()) as local:
            run_training(config, stop, local)
    except StoppedEarly as exc:
        log.warning("%s", exc)
        return EXIT_STOPPED
    except (TrainerError, CorpusError, ModelNotFoundError) as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except OSError as exc:  # an unwritable --output_dir, a full disk outside a checkpoint: the message names the path
        log.error("%s: %s", type(exc).__name__, exc)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:  # a second SIGINT/SIGTERM while the first was being honoured
        log.error("%s", exc or "interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
