"""One command from a corpus: the trainer's `--train_corpus` starts the producer's own program as its children.

`bertstream-trainer --train_corpus FILE...` runs `python -m producer` (the producer's code, unchanged) as a
child process that PUSHes to a private ipc endpoint in a 0700 folder of this user's; the trainer's PULL socket
binds that endpoint as well as an explicit `--bind`, so remote producers can still join the same run. The
producer's generation flags (`--max_seq_len`, `--do_whole_word_mask`, `--num_workers`, ...) are the
trainer's flags too: they are copied from the producer's parser, passed through as given and validated by
the producer's own `parse_config`, so an error names the flag exactly as the producer would.

Under torchrun each node's local rank 0 starts one producer for all of the node's ranks
(`--ranks_per_endpoint LOCAL_WORLD_SIZE`, the ipc PATH-r endpoints every rank binds): one tokenized index
and one supervisor per node instead of one per rank, and the node's workers share its CPUs without the
ranks having to split them. The producer draws a fresh seed (its default without --seed) and logs it: nodes
never stream the same instances, and a rerun that resumes a checkpoint does not replay the first run's stream.

Children never outlive the trainer: they run in their own process group (a Ctrl-C in the terminal reaches
only the trainer, which then stops them in order), they are stopped in a `finally` on every normal and error
path, and on Linux `PR_SET_PDEATHSIG` sends the producer SIGTERM when the trainer dies in a way no
`finally` sees (SIGKILL, a crash); the producer's supervisor then stops its workers, which also quit by
themselves once their supervisor is gone (producer/worker.py's Guard).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.progress import log
from trainer import TrainerError

STOP_GRACE_S = 15.0  # how long a SIGTERMed producer may take to stop its workers before its group is killed
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Producer flags the trainer decides itself (where to send, for how long) or whose trainer flag of the same name
# means something else (--output_dir, --epochs, --curve_secret_key): never passed through.
_DECIDED_HERE = {"help", "train_corpus", "connect", "ranks_per_endpoint", "epochs", "epochs_to_generate",
                 "output_dir", "trainer_gone_timeout_s", "curve_secret_key", "curve_server_key", "reduce_memory"}
# Flags producer_argv writes from the trainer's own; the trainer's --seed seeds torch, while the producer draws a
# fresh seed (see above).
_WRITTEN_HERE = {"bert_model", "do_lower_case", "seed", "cache_dir"}
# The seed's simple_lm_finetuning.py spellings, so its command line runs unchanged.
_SEED_ALIASES = {"max_seq_len": "--max_seq_length"}


@dataclass(frozen=True)
class LocalProducersConfig:
    """The producer this trainer starts for itself: its corpus and the generation flags given on our command line."""

    train_corpus: tuple[str, ...]  # the producer's --train_corpus files
    producer_args: tuple[str, ...]  # the pass-through producer flags as given (e.g. --max_seq_len 64)
    bert_model: str
    do_lower_case: bool | None  # None: the producer follows the tokenizer's setting, as the trainer does
    cache_dir: str  # the producer's corpus index cache (the trainer's --cache_dir)
    remote_bind: bool  # --bind was given: remote producers may connect there too

    def producer_argv(self, connect: str, ranks_per_endpoint: int) -> list[str]:
        """The `python -m producer` command line (after the module name) for a node's producer."""
        argv = ["--train_corpus", *self.train_corpus, "--bert_model", self.bert_model, "--cache_dir", self.cache_dir,
                "--connect", connect, "--ranks_per_endpoint", str(ranks_per_endpoint)]
        if self.do_lower_case is not None:
            argv.append("--do_lower_case" if self.do_lower_case else "--no_lower_case")
        return argv + list(self.producer_args)


# --- flags ---------------------------------------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser) -> None:
    """`--train_corpus`, the seed's `--do_train` / `--on_memory` / `--num_train_epochs`, and the producer's own
    generation flags (copied from its parser, so a flag the producer gains appears here without an edit)."""
    from producer.cli import build_parser as producer_parser

    group = parser.add_argument_group(
        "one command (--train_corpus): the trainer starts its own producer; these are the producer's flags")
    source = producer_parser()
    corpus = copy.copy(source._option_string_actions["--train_corpus"])
    corpus.required = False
    corpus.help = ("train on these text files: start local producer workers on a private endpoint for this "
                   "run, and stop them at its end (not with --pregenerated_data); " + corpus.help)
    group._add_action(corpus)
    group.add_argument("--do_train", action="store_true",
                       help="accepted for the seed's simple_lm_finetuning.py command line: this program trains")
    group.add_argument("--on_memory", action="store_true",
                       help="accepted for the seed's simple_lm_finetuning.py command line and has no effect: the "
                       "tokenized corpus is a memory-mapped index either way")
    group.add_argument("--num_train_epochs", dest="epochs", type=int, default=argparse.SUPPRESS,
                       help="the seed's simple_lm_finetuning.py name for --epochs")
    for action in pass_through_actions(parser, source):
        action = copy.copy(action)
        alias = _SEED_ALIASES.get(action.dest)
        if alias:
            action.option_strings = [*action.option_strings, alias]
        action.passed_to_producer = True  # told apart from the trainer's own flags by pass_through_actions
        group._add_action(action)


def pass_through_actions(trainer: argparse.ArgumentParser, producer: argparse.ArgumentParser) -> list:
    """The producer's flags a user may set through the trainer: all but those the trainer decides or shares."""
    def trainers_own(option: str) -> bool:
        action = trainer._option_string_actions.get(option)
        return action is not None and not getattr(action, "passed_to_producer", False)

    return [action for action in producer._actions
            if action.dest not in _DECIDED_HERE and not any(map(trainers_own, action.option_strings))]


def parse_config(args: argparse.Namespace, trainer: argparse.ArgumentParser, cache_dir: str,
                 ) -> LocalProducersConfig | None:
    """The producer flags given -> a LocalProducersConfig checked by the producer's own parser, or None without
    --train_corpus (then a producer-only flag given alone is refused by name).

    Passed on: the copied producer flags, and the flags both programs share with one meaning (how sources are
    read: --text_field, --dataset_split, --split_sentences), each only where it differs from the producer's default.
    """
    from producer import cli as producer_cli

    producer = producer_cli.build_parser()
    copied = {action.dest for action in pass_through_actions(trainer, producer)}
    given, given_copied = [], []
    for action in producer._actions:
        if action.dest in _DECIDED_HERE or action.dest in _WRITTEN_HERE or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:  # the producer's default: pass nothing, it applies there anyway
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            flag = [option]
        elif isinstance(value, (list, tuple)):
            flag = [option, *map(str, value)]
        else:
            flag = [option, str(value)]
        given += flag
        if action.dest in copied:
            given_copied += flag
    if args.train_corpus is None:
        if given_copied:
            trainer.error(f"{given_copied[0]} is a producer flag: it applies with --train_corpus (the trainer starting its "
                          "own producer); a separate bertstream-producer takes it on its own command line")
        return None
    if args.pregenerated_data is not None:
        trainer.error(f"--train_corpus and --pregenerated_data {args.pregenerated_data} are two sources; give one")
    if args.curve_secret_key is not None:
        trainer.error("--curve_secret_key with --train_corpus: CURVE would apply to the private endpoint of the "
                      "local producer too; run bertstream-producer separately to use CURVE")
    config = LocalProducersConfig(
        train_corpus=tuple(args.train_corpus), producer_args=tuple(given), bert_model=args.bert_model,
        do_lower_case=args.do_lower_case, cache_dir=cache_dir, remote_bind=args.bind is not None)
    # The producer's own checks, with our program's name in the message: `bertstream-trainer: error:
    # --max_seq_len 4: must be between 8 and 512` (exit 2), before any model loads.
    producer.prog = trainer.prog
    producer_cli.parse_config(producer, config.producer_argv("ipc:///validation-only", 1))
    for source in config.train_corpus:  # files and dataset folders; hf:NAME is the producer's to resolve
        if not source.startswith("hf:") and not Path(source).exists():
            trainer.error(f"--train_corpus {source}: no such file")
    return config


# --- processes -----------------------------------------------------------------------------------------------

def private_folder(local_rank: int, local_world_size: int) -> tuple[Path, bool]:
    """This run's private folder for the ipc endpoint, and whether this process owns (and removes) it.

    One process: a fresh mkdtemp. torchrun's ranks on a node must agree on it without talking: they share
    their parent (the torchrun agent) and its restart count, so the name is made from those, and every rank
    makes sure it is a real directory of ours that nobody else can enter before binding in it.
    """
    if local_world_size == 1:
        return Path(tempfile.mkdtemp(prefix="bertstream-")), True
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    folder = Path(tempfile.gettempdir()) / f"bertstream-{os.getuid()}-{os.getppid()}-{restart}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise TrainerError(f"{folder}: expected a directory of user {os.getuid()} with mode 0700 for the local "
                           "producer's endpoint; something else is there")
    return folder, local_rank <= 0


def _die_with_parent(parent: int, prctl) -> None:
    """Runs in the child between fork and exec: SIGTERM when the trainer dies, and not born an orphan."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(1)


class LocalProducers:
    """The producer process this trainer started (on local rank 0), its private endpoint, and its stopping.

    `with LocalProducers(config, local_rank, local_world_size) as local:` starts it; `local.endpoint` is the
    base endpoint (each rank binds `DistributedConfig.endpoint(local.endpoint)`); `local.check()` raises
    TrainerError once the producer has ended by itself; leaving the block stops it and removes the folder.
    """

    def __init__(self, config: LocalProducersConfig, local_rank: int = -1, local_world_size: int = 1):
        self.config = config
        self._local_rank, self._local_world_size = local_rank, local_world_size
        self._process: subprocess.Popen | None = None
        self._folder: Path | None = None
        self._owner = False
        self.endpoint = ""

    def __enter__(self) -> "LocalProducers":
        self._folder, self._owner = private_folder(self._local_rank, self._local_world_size)
        self.endpoint = f"ipc://{self._folder}/stream"
        try:
            if self._owner:
                self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        argv = [sys.executable, "-m", "producer",
                *self.config.producer_argv(self.endpoint, self._local_world_size)]
        preexec = None
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)  # looked up before the fork: nothing to load in the child
            parent = os.getpid()

            def preexec() -> None:
                _die_with_parent(parent, libc.prctl)
        else:
            log.warning("local producer: no PR_SET_PDEATHSIG on %s; if the trainer is killed with SIGKILL its "
                        "producer stops only once its workers notice", sys.platform)
        # PR_SET_PDEATHSIG fires when the thread that forked the child ends, so this must be the main thread
        # (cli.main starts us there, before training). Own process group: the terminal's Ctrl-C reaches only the
        # trainer, which stops the producer itself, and the group lets stop() reach orphaned workers too.
        # The producer's lines go to our stdout/stderr, next to the trainer's.
        self._process = subprocess.Popen(argv, preexec_fn=preexec, process_group=0)
        log.info("local producer: pid %d streaming %s to %s%s", self._process.pid,
                 " ".join(self.config.train_corpus), self.endpoint,
                 f" (ranks_per_endpoint {self._local_world_size})" if self._local_world_size > 1 else "")

    def check(self) -> None:
        """Raise if the producer ended by itself: it streams until stopped, so any end is a failure."""
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            raise TrainerError(f"the local producer (pid {self._process.pid}, `python -m producer "
                               f"--train_corpus ...`) exited with status {code} before training ended; its message "
                               "is above")

    def stop(self) -> None:
        """SIGTERM (the producer stops its workers), then SIGKILL to whatever of its group is left."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("local producer: pid %d still running %.0fs after SIGTERM; killing its group",
                                process.pid, STOP_GRACE_S)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived its supervisor, if any
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            log.info("local producer: pid %d stopped (status %s)", process.pid, process.returncode)
        if self._owner and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def for_config(config) -> "LocalProducers | None":
    """The LocalProducers of a TrainerConfig, or None without --train_corpus."""
    if config.local is None:
        return None
    return LocalProducers(config.local, config.distributed.local_rank, config.distributed.local_world_size)
