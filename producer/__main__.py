"""`bertstream-producer` / `python -m producer`: parse the flags, build the shared resources, run the workers."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from common.allocator import keep_freed_memory
from common.corpus import CorpusError
from common.progress import log, setup_logging
from common.vocab import ModelNotFoundError, decide_lower_case, resolve_model_dir
from producer import cli, supervisor


def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser()
    config = cli.parse_config(parser, argv)  # a bad flag exits here with status 2
    setup_logging()
    keep_freed_memory()  # before the workers fork: they inherit it (common/allocator.py says why)
    supervisor.raise_on_sigterm()
    try:
        model_dir = resolve_model_dir(config.corpus.bert_model)  # the tokenizer files only, never the weights
        lower = decide_lower_case(model_dir, config.corpus.do_lower_case)
        config = replace(config, corpus=replace(config.corpus, do_lower_case=lower.do_lower_case))
        log.info("config: %s", json.dumps(config.to_dict(), sort_keys=True))
        log.info("%s", lower.describe())
        if config.pool.seed_drawn:
            log.info("seed: %d, drawn from os entropy as no --seed was given (pass --seed %d to repeat this "
                     "stream)", config.pool.seed, config.pool.seed)
        cli.check_against_model(parser, config, model_dir)
        resources = supervisor.prepare(config, model_dir)
        cli.check_against_corpus(parser, config, resources.index.num_documents)
        return supervisor.Supervisor(config, resources).run()
    except (CorpusError, ModelNotFoundError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT or SIGTERM before the workers started
        log.info("interrupted during start-up")
        return 0 if config.stream is not None else 130


if __name__ == "__main__":
    sys.exit(main())
