"""Command line -> frozen, validated configs, one per concern; then run, and turn the outcome into an exit code.

The flags are the seed's `finetune_on_pregenerated.py` flags with the seed's defaults, plus the stream's and
the run's, declared on the fields of trainer.config's dataclasses (help, default and all); `--config FILE`
supplies any of them from a YAML or JSON file, the command line winning. Everything the user can get wrong is
refused here, before any model is loaded, with a message that names the flag and the value (exit 2). Nothing
heavy (torch, transformers, zmq) is imported at module level, so `--help` and usage errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading

from common import flags
from common.config import add_lower_case_flags
from common.progress import log, setup_logging
from trainer import local_producers  # issue 14: --train_corpus, the trainer starting its own producer
from trainer import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE, StoppedEarly, TrainerError
# The config classes live in trainer.config; they are re-exported here for callers of the earlier layout.
from trainer.config import (DEFAULT_BIND, GROUPS, DeviceConfig, DistributedConfig, EvalConfig,  # noqa: F401
                            ModelConfig, SourceConfig, TrainConfig, TrainerConfig)

def build_parser() -> argparse.ArgumentParser:
    """The parser, made from the flags declared on trainer.config's fields (and `--config FILE`)."""
    p = argparse.ArgumentParser(
        prog="bertstream-trainer",
        description="Fine-tune BertForPreTraining (MLM + NSP) on a bertstream stream or on seed-format files.",
        epilog="Exit codes: 0 done; 1 error; 2 bad flags; 75 stopped by SIGTERM/SIGINT with a checkpoint saved "
               "(run the same command again to resume); 130 a second signal stopped it without one.")
    flags.add_config_flag(p)
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    flags.add_flags(p, groups, ModelConfig, SourceConfig, TrainConfig, DeviceConfig, DistributedConfig, EvalConfig)
    add_lower_case_flags(groups["seed"], "must match the producer's, it is in the fingerprint")  # as the producer's
    # How --eval_corpus is read: the producer's flags of the same names, declared once for both programs.
    from common.readers import add_source_flags  # stdlib only: the flags are checked before torch is imported

    add_source_flags(groups["eval"])
    local_producers.add_flags(p)  # issue 14: --train_corpus and the producer's generation flags, copied from it
    return p


def parse_args(argv: list[str] | None = None) -> TrainerConfig:
    """Flags (and --config's file) -> TrainerConfig; any invalid value ends the process with exit 2 and a message
    naming the flag."""
    parser = build_parser()
    args = flags.parse_with_config(parser, argv)
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
            model=flags.from_args(ModelConfig, args, do_lower_case=args.do_lower_case),
            source=flags.from_args(SourceConfig, args, bind=args.bind or DEFAULT_BIND),
            train=flags.from_args(TrainConfig, args, world_size=distributed.world_size),
            device=flags.from_args(DeviceConfig, args),
            distributed=distributed,
            eval=flags.from_args(EvalConfig, args, cache_dir=cache_dir, text_field=args.text_field,
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
