"""The producer's command line: the seed's flags plus streaming ones, parsed once into frozen configs.

Every flag value is checked here, before any work starts, and a bad one ends the process with an
argparse-style message naming the flag and its value (exit status 2). The configs' field names are the
flag names, so a config's `ValueError("masked_lm_prob must be in (0, 1], got 1.5")` becomes
`--masked_lm_prob 1.5: must be in (0, 1]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from common import readers, security
from common.config import CorpusConfig, GenerationConfig, add_lower_case_flags
from common.shuffle import DEFAULT_SHUFFLE_PAIRS
from common.vocab import default_cache_dir, model_max_positions
from common.wire import MAX_BATCH, MAX_SEED

SEED_EPOCHS_TO_GENERATE = 3  # pregenerate_training_data.py's default
_ENDPOINT = re.compile(r"^(?:tcp://(?P<host>[^\s/]+):(?P<port>\d+)|ipc://\S+)$")


def parse_seed(value: str) -> int:
    """An integer, or `host`: a seed from the host name (stable per container, different per replica).

    `host` predates fresh seeds (a producer without --seed now draws its own); it stays for existing scripts.
    """
    if value == "host":
        digest = hashlib.sha256(socket.gethostname().encode()).digest()
        return int.from_bytes(digest[:4], "little")
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'host', got {value!r}") from None


def fresh_seed() -> int:
    """A seed from the operating system's entropy: two producers (or one restarted) never share it by accident.

    63 bits, so it fits the wire's int64 range; the chance that two of a thousand producers draw the same one
    is about 5e-14.
    """
    return int.from_bytes(os.urandom(8), "little") >> 1


def default_num_workers() -> int:
    """All usable CPUs but one: the supervisor, ZeroMQ's I/O threads (and often a trainer) need some too."""
    try:
        cpus = len(os.sched_getaffinity(0))  # respects taskset and container CPU sets
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


@dataclass(frozen=True)
class WorkerPoolConfig:
    """How many worker processes, how they seed their generators, how often the supervisor reports."""

    num_workers: int  # worker processes; each generates a disjoint share of every epoch's documents
    seed: int  # with the worker id and the epoch, seeds every random draw (reproducible stream)
    progress_interval_s: float  # seconds between progress lines
    seed_drawn: bool = False  # no --seed was given: `seed` was drawn from os entropy (logged, to repeat the run)

    def __post_init__(self) -> None:
        if not 1 <= self.num_workers <= 1024:
            raise ValueError(f"num_workers must be between 1 and 1024, got {self.num_workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed}")
        if not self.progress_interval_s > 0:
            raise ValueError(f"progress_interval_s must be positive, got {self.progress_interval_s}")


@dataclass(frozen=True)
class StreamConfig:
    """Where batches go and how the PUSH sockets behave."""

    endpoints: tuple[str, ...]  # every trainer endpoint each worker connects to (ZeroMQ round-robins batches)
    batch_size: int  # instances per message; an epoch's last message of a worker may hold fewer
    epochs: int | None  # stop after this many epochs; None streams until stopped
    hwm_batches: int  # send high-water mark per endpoint, in messages: past it, the worker blocks
    linger_ms: int  # how long closing waits to deliver queued batches before dropping them
    trainer_gone_timeout_s: float  # exit 0 once every endpoint has been disconnected this long; 0 = never
    curve_secret_key: str | None = None  # this producer's NAME.key_secret: CURVE encryption and authentication
    curve_server_key: str | None = None  # the trainer's public NAME.key (set together with curve_secret_key)
    shuffle_pairs: int = DEFAULT_SHUFFLE_PAIRS  # each worker's shuffle buffer, in pairs (common.shuffle); 0 = off

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("connect needs at least one endpoint")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, got {self.batch_size}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.hwm_batches < 1:
            raise ValueError(f"hwm_batches must be at least 1, got {self.hwm_batches}")
        if self.shuffle_pairs < 0:
            raise ValueError(f"shuffle_pairs must be 0 (off) or more, got {self.shuffle_pairs}")
        if self.linger_ms < 0:
            raise ValueError(f"linger_ms must be 0 or more, got {self.linger_ms}")
        if self.trainer_gone_timeout_s < 0:
            raise ValueError(f"trainer_gone_timeout_s must be 0 (never) or positive, got {self.trainer_gone_timeout_s}")
        security.both_or_neither(("--curve_secret_key", self.curve_secret_key),
                                 ("--curve_server_key", self.curve_server_key))
        if self.curve_secret_key is not None:  # read now, so a bad file is a usage error before any work
            security.client_keys(self.curve_secret_key, self.curve_server_key)


@dataclass(frozen=True)
class DumpConfig:
    """Disk-dump mode: the seed's `epoch_{i}.json` files instead of a stream."""

    output_dir: str
    epochs_to_generate: int  # epochs written, each a fresh pairing and masking of every document

    def __post_init__(self) -> None:
        if self.epochs_to_generate < 1:
            raise ValueError(f"epochs_to_generate must be at least 1, got {self.epochs_to_generate}")


@dataclass(frozen=True)
class ProducerConfig:
    corpus: CorpusConfig
    generation: GenerationConfig
    pool: WorkerPoolConfig
    stream: StreamConfig | None  # exactly one of stream and dump is set
    dump: DumpConfig | None

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertstream-producer",
        description="Generate BERT MLM+NSP training instances from a corpus: stream them to a trainer "
        "(--connect) or write the seed's epoch files (--output_dir).",
    )
    seed = parser.add_argument_group("the seed's pregenerate_training_data.py flags")
    seed.add_argument("--train_corpus", nargs="+", required=True, metavar="SOURCE",
                      help="text file(s), one sentence a line, a blank line between documents (gzip allowed); "
                      "also .jsonl(.gz) and .parquet (a document a record), a save_to_disk dataset folder, or "
                      "hf:NAME (a Hub dataset)")
    seed.add_argument("--output_dir", default=None,
                      help="dump mode: write epoch_{i}.json and epoch_{i}_metrics.json here, then exit")
    seed.add_argument("--bert_model", required=True,
                      help="model directory or Hugging Face hub name; its vocabulary tokenizes the corpus")
    add_lower_case_flags(seed, "the trainer must decide the same, it is in the fingerprint")
    seed.add_argument("--do_whole_word_mask", action="store_true",
                      help="mask whole words (a word and its ## pieces) together")
    seed.add_argument("--reduce_memory", action="store_true",
                      help="accepted for compatibility with the seed and has no effect: the tokenized corpus is "
                      "a memory-mapped index shared by all workers, so memory is already flat in corpus size")
    seed.add_argument("--epochs_to_generate", type=int, default=None,
                      help=f"dump mode: epochs to write (default {SEED_EPOCHS_TO_GENERATE})")
    seed.add_argument("--max_seq_len", type=int, default=128,
                      help="tokens per instance, [CLS] and both [SEP] included (default %(default)s)")
    seed.add_argument("--short_seq_prob", type=float, default=0.1,
                      help="probability of a shorter target length per document (default %(default)s)")
    seed.add_argument("--masked_lm_prob", type=float, default=0.15,
                      help="share of tokens masked (default %(default)s)")
    seed.add_argument("--max_predictions_per_seq", type=int, default=20,
                      help="cap on masked positions per instance (default %(default)s)")

    ours = parser.add_argument_group("bertstream")
    ours.add_argument("--num_workers", type=int, default=default_num_workers(),
                      help="worker processes (default: usable CPUs - 1, here %(default)s)")
    ours.add_argument("--seed", type=parse_seed, default=None,
                      help="same corpus, model, flags, seed and worker count give the same instances (stream and "
                      "dump). Default: a fresh seed from os entropy, logged and sent in every message header, so "
                      "producers (and a restarted one) never repeat each other; pass it back to repeat a run. "
                      "`host` (a seed from the host name) is still accepted")
    ours.add_argument("--cache_dir", default=str(default_cache_dir()),
                      help="where the tokenized corpus index is cached (default %(default)s)")
    ours.add_argument("--progress_interval_s", type=float, default=10.0,
                      help="seconds between progress lines (default %(default)s)")

    add_corpus_flags(parser.add_argument_group("corpus formats and blends"), blends=True)

    stream = parser.add_argument_group("streaming")
    stream.add_argument("--connect", action="append", default=None, metavar="ENDPOINT",
                        help="trainer endpoint to PUSH batches to, tcp://HOST:PORT or ipc://PATH (repeatable)")
    stream.add_argument("--ranks_per_endpoint", type=int, default=1,
                        help="an endpoint stands for this many trainer ranks on its host, as torchrun's ranks bind "
                        "them: tcp on consecutive ports (PORT, PORT+1, ...), ipc as PATH-0, PATH-1, ... "
                        "(default %(default)s)")
    stream.add_argument("--batch_size", type=int, default=512,
                        help="instances per message (default %(default)s); the trainer re-slices them into its own "
                        "micro-batches, so this only trades per-message overhead for latency")
    stream.add_argument("--epochs", type=int, default=None, help="stop after this many epochs (default: never)")
    stream.add_argument("--shuffle_pairs", type=int, default=DEFAULT_SHUFFLE_PAIRS,
                        help="each worker draws what it sends from a shuffle buffer of this many pairs, so a "
                        "message mixes many documents (56 bytes a pair; drained at each epoch's end; 0: "
                        "document order) (default %(default)s)")
    stream.add_argument("--hwm_batches", type=int, default=8,
                        help="send high-water mark per endpoint, in batches: a slow or absent trainer blocks "
                        "the workers there, so memory stays bounded (default %(default)s)")
    stream.add_argument("--linger_ms", type=int, default=2000,
                        help="on shutdown, how long to try delivering queued batches before dropping them "
                        "(default %(default)s)")
    stream.add_argument("--trainer_gone_timeout_s", type=float, default=0.0,
                        help="exit 0 once the trainer was connected and then every endpoint stayed "
                        "disconnected this long (0: never; wait for a trainer to come back)")
    stream.add_argument("--curve_secret_key", default=None, metavar="FILE",
                        help="this producer's NAME.key_secret (from bertstream-keys, mode 0600): encrypt the stream "
                        "and authenticate to the trainer with CURVE; needs --curve_server_key")
    stream.add_argument("--curve_server_key", default=None, metavar="FILE",
                        help="the trainer's public NAME.key: batches go only to the trainer holding its secret "
                        "key; needs --curve_secret_key")
    return parser


def add_corpus_flags(group, blends: bool) -> None:
    """How sources are read (common/readers.py) and how they are blended."""
    readers.add_source_flags(group)
    if blends:
        group.add_argument("--corpus_weights", nargs="+", type=float, default=None, metavar="W",
                           help="one weight per --train_corpus source: each is a corpus, and each epoch draws their "
                           "documents so that instances come in these shares (random next segments stay in their "
                           "corpus); without it all sources are one corpus")


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> ProducerConfig:
    """Parse and validate every flag; any problem exits through `parser.error` (status 2)."""
    args = parser.parse_args(argv)
    if (args.output_dir is None) == (args.connect is None):
        parser.error("give exactly one of --output_dir DIR (write the seed's epoch files) "
                     "or --connect ENDPOINT (stream to a trainer)")
    if args.output_dir is not None and args.epochs is not None:
        parser.error(f"--epochs {args.epochs}: applies to streaming; with --output_dir use --epochs_to_generate")
    if args.output_dir is not None and (args.curve_secret_key or args.curve_server_key):
        parser.error("--curve_secret_key and --curve_server_key apply to streaming (--connect), not to --output_dir")
    if args.connect is not None and args.epochs_to_generate is not None:
        parser.error(f"--epochs_to_generate {args.epochs_to_generate}: applies to --output_dir; "
                     "when streaming use --epochs")
    try:
        corpus = CorpusConfig(
            train_corpus=tuple(args.train_corpus), bert_model=args.bert_model, do_lower_case=args.do_lower_case,
            cache_dir=args.cache_dir, text_field=args.text_field, dataset_split=args.dataset_split,
            split_sentences=args.split_sentences,
            corpus_weights=None if args.corpus_weights is None else tuple(args.corpus_weights),
        )
        generation = GenerationConfig(
            max_seq_len=args.max_seq_len, short_seq_prob=args.short_seq_prob, masked_lm_prob=args.masked_lm_prob,
            max_predictions_per_seq=args.max_predictions_per_seq, whole_word_mask=args.do_whole_word_mask,
        )
        pool = WorkerPoolConfig(num_workers=args.num_workers,
                                seed=fresh_seed() if args.seed is None else args.seed,
                                progress_interval_s=args.progress_interval_s, seed_drawn=args.seed is None)
        stream = dump = None
        if args.connect is not None:
            stream = StreamConfig(
                endpoints=expand_endpoints(parser, args.connect, args.ranks_per_endpoint),
                batch_size=args.batch_size, epochs=args.epochs, hwm_batches=args.hwm_batches,
                linger_ms=args.linger_ms, trainer_gone_timeout_s=args.trainer_gone_timeout_s,
                curve_secret_key=args.curve_secret_key, curve_server_key=args.curve_server_key,
                shuffle_pairs=args.shuffle_pairs,
            )
        else:
            dump = DumpConfig(
                output_dir=args.output_dir,
                epochs_to_generate=SEED_EPOCHS_TO_GENERATE if args.epochs_to_generate is None
                else args.epochs_to_generate,
            )
    except ValueError as exc:
        parser.error(_as_flag_error(exc, args))
    return ProducerConfig(corpus, generation, pool, stream, dump)


def expand_endpoints(parser: argparse.ArgumentParser, endpoints: list[str], ranks_per_endpoint: int) -> tuple[str, ...]:
    """Each endpoint checked, and widened to its trainer ranks' endpoints (consecutive tcp ports, or ipc PATH-r)."""
    if not 1 <= ranks_per_endpoint <= 1024:
        parser.error(f"--ranks_per_endpoint {ranks_per_endpoint}: must be between 1 and 1024")
    expanded = []
    for endpoint in endpoints:
        match = _ENDPOINT.match(endpoint)
        if not match:
            parser.error(f"--connect {endpoint}: expected tcp://HOST:PORT or ipc://PATH")
        if match["port"] is None:
            # ipc: a node's trainer ranks bind PATH-0, PATH-1, ... (a trainer alone binds PATH itself).
            if ranks_per_endpoint == 1:
                expanded.append(endpoint)
            else:
                expanded += [f"{endpoint}-{rank}" for rank in range(ranks_per_endpoint)]
            continue
        port = int(match["port"])
        if not 1 <= port <= 65535 - (ranks_per_endpoint - 1):
            parser.error(f"--connect {endpoint}: port {port} (with {ranks_per_endpoint} ranks) is out of range")
        expanded += [f"tcp://{match['host']}:{port + rank}" for rank in range(ranks_per_endpoint)]
    duplicates = sorted({e for e in expanded if expanded.count(e) > 1})
    if duplicates:
        parser.error(f"--connect: endpoint(s) given twice: {', '.join(duplicates)}")
    return tuple(expanded)


def check_against_model(parser: argparse.ArgumentParser, config: ProducerConfig, model_dir: Path) -> None:
    """Flags that depend on the model: sequences longer than its position table cannot be trained on."""
    positions = model_max_positions(model_dir)
    if positions is not None and config.generation.max_seq_len > positions:
        parser.error(f"--max_seq_len {config.generation.max_seq_len}: above the model's max_position_embeddings "
                     f"{positions} ({model_dir / 'config.json'})")


_FIELD_ERROR = re.compile(r"^(?P<field>[a-z_]+) (?P<problem>must .*?)(?:, got .*)?$", re.DOTALL)


def _as_flag_error(exc: ValueError, args: argparse.Namespace) -> str:
    """`field must ..., got value` as `--field value: must ...` (flags and config fields share names)."""
    match = _FIELD_ERROR.match(str(exc))
    if match and hasattr(args, match["field"]):
        value = getattr(args, match["field"])
        value = " ".join(map(str, value)) if isinstance(value, list) else value  # nargs="+": as it was typed
        return f"--{match['field']} {value}: {match['problem']}"
    return str(exc)


def check_against_corpus(parser: argparse.ArgumentParser, config: ProducerConfig, num_documents: int) -> None:
    """Every worker needs at least one document per epoch, or it would have nothing to send."""
    if config.pool.num_workers > num_documents:
        parser.error(f"--num_workers {config.pool.num_workers}: more than the corpus's {num_documents} documents "
                     "(each worker generates from its own share of the documents)")
