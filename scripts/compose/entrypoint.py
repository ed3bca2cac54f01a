"""The compose services' entry point: picks the corpus, restarts a crashed trainer or producer, ends with the real status.

docker-compose.yml runs `python scripts/compose/entrypoint.py trainer|producer [options] -- FLAGS`, FLAGS being
the flags of bertstream-trainer or bertstream-producer. Compose itself cannot give the three promises of the
docs/compose.md (read from docker/compose's pkg/compose/up.go and monitor.go, and torch 2.13's
torch/distributed/launcher/api.py): under `--exit-code-from` the first container exit of any service, even
one its restart policy would restart, stops the whole project; and torchrun turns a rank's exit 75 into its
own exit 1. So the restarts happen in here, inside a container that stays up:

- trainer: checks the corpus, runs bertstream-trainer (one process) or torchrun with one rank per GPU,
  restarts it after a crash (`--restarts` times; it resumes from its newest checkpoint while the producers
  wait), and exits with the run's status: 0 done, 75 stopped with a checkpoint, 1 error (2 bad flags). Under
  torchrun each rank writes its own status to a file, so 75 survives. At the end it prints the held-out
  table and writes `--state_file`, which tells the producers that the run is over.
- producer: checks the corpus, runs bertstream-producer, restarts it after a crash (`--restarts` times),
  and ends it once the trainer's state file says the run is over. A producer that gives up stays idle
  until then: its exit would end the whole project under `--exit-code-from`.

With nothing configured (no CORPUS_DIR) both train on the sample corpus baked into the image at
`--sample_dir`. No third-party import here except `trainer.cli` in a rank.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROG = "bertstream-compose"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
# Statuses that a restart cannot change: done, bad flags, stopped on request (with or without a checkpoint).
_FINAL = {EXIT_OK, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED}
_POLL_S = 0.5
_SAME_RUN_S = 30.0  # a trainer that started this long before a producer belongs to its run (see trainer_finished)


def say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class CorpusMissing(Exception):
    """The corpus a service was given cannot be read; the message is the one line the user sees."""


def resolve_corpus(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(training corpus, held-out corpus or None): the image's sample without CORPUS_DIR, else the user's files."""
    if not args.corpus_dir:
        return args.sample_dir / "corpus" / "train.txt", args.sample_dir / "corpus" / "heldout.txt"
    return args.corpus, getattr(args, "eval_corpus", None)


def check_readable(path: Path, role: str, args: argparse.Namespace) -> None:
    """Raise CorpusMissing naming the file, the host folder behind it and the variable that sets it."""
    where = (f"CORPUS_DIR={args.corpus_dir} is mounted at {args.corpus.parent}" if args.corpus_dir
             else "the image's sample corpus")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except IsADirectoryError:
        raise CorpusMissing(f"{role} {path} is a folder, not a file ({where}; CORPUS names the file)") from None
    except FileNotFoundError:
        hint = ("put corpus.txt there or set CORPUS to the file's path under /data" if args.corpus_dir
                else "rebuild the image")
        raise CorpusMissing(f"{role} {path} does not exist ({where}): {hint}") from None
    except OSError as exc:
        raise CorpusMissing(f"{role} {path} cannot be read ({where}): {exc.strerror}") from None


def flag_value(flags: list[str], name: str) -> str | None:
    """The last value given for `name` in an argparse-style list (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(flags):
        if arg == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


class Child:
    """One child process at a time; SIGTERM/SIGINT to this process go to it and stop the restarts."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.stop_requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)

    def forward(self, signum, frame) -> None:
        self.stop_requested = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def start(self, argv: list[str]) -> subprocess.Popen:
        self.process = subprocess.Popen(argv)
        return self.process

    def wait(self) -> int:
        """The child's status, a signal's death as 128 + its number (as a shell reports it)."""
        status = self.process.wait()
        return 128 - status if status < 0 else status

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < end:
            time.sleep(_POLL_S)


def write_state(path: Path, **state) -> None:
    """The trainer's state for the producers: written whole, then renamed, so no reader sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**state, "time": time.time()}))
    os.replace(tmp, path)


def trainer_finished(path: Path, since: float) -> dict | None:
    """The trainer's final state if it belongs to this run, else None.

    The state volume outlives a run, so a file can be an earlier run's. It is this run's if it was written
    after `since` (this producer's start), or if its trainer started at most _SAME_RUN_S before: compose starts
    the trainer first, and a trainer that fails at once (a missing corpus) may be done before the producer
    starts; an earlier run ended at least a whole run ago.
    """
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("state") != "done":
        return None
    return state if state.get("time", 0) >= since or state.get("started", 0) >= since - _SAME_RUN_S else None


def ranks_status(status_dir: Path, world_size: int) -> int:
    """The run's status from every rank's own: all 0 -> 0; all stopped -> 75; otherwise an error."""
    codes = []
    for rank in range(world_size):
        try:
            codes.append(int((status_dir / f"rank{rank}").read_text()))
        except (OSError, ValueError):
            codes.append(EXIT_ERROR)  # killed before it could say (SIGKILL, out of memory)
    if set(codes) <= {EXIT_OK}:
        return EXIT_OK
    if set(codes) <= {EXIT_OK, EXIT_STOPPED}:
        return EXIT_STOPPED
    errors = [c for c in codes if c not in (EXIT_OK, EXIT_STOPPED)]
    return errors[0] if errors[0] in _FINAL else EXIT_ERROR


def heldout_table(output_dir: Path) -> str | None:
    """The held-out metrics at the first and the last evaluation, as scripts/demo.sh prints them."""
    try:
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return None
    evals = [r for r in records if "eval_mlm_accuracy" in r]
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    lines = [f"held-out evaluation    before (step {first['step']})   after (step {last['step']})"]
    for key in ("eval_mlm_accuracy", "eval_mlm_loss", "eval_nsp_accuracy"):
        lines.append(f"{key:<22} {first[key]:>12.4f} {last[key]:>18.4f}")
    lines.append(f"fine-tuned model: {output_dir}")
    return "\n".join(lines)


def run_trainer(args: argparse.Namespace, flags: list[str]) -> int:
    child = Child()
    started = time.time()
    write_state(args.state_file, state="running", started=started)
    status = EXIT_ERROR
    try:
        train, heldout = resolve_corpus(args)
        try:
            check_readable(train, "corpus", args)
            if heldout is not None:
                check_readable(heldout, "held-out corpus", args)
        except CorpusMissing as exc:
            say(str(exc))
            return status
        if heldout is not None:
            flags = [*flags, "--eval_corpus", str(heldout)]
        say(f"training on {train}" + (f", held-out text {heldout}" if heldout else "")
            + ("" if args.corpus_dir else " (the image's sample: set CORPUS_DIR for your own corpus)"))
        for attempt in range(args.restarts + 1):
            if args.gpus == 1:  # one process: its exit status is the run's, no launcher in between
                child.start(["bertstream-trainer", *flags])
                status = child.wait()
            else:
                with tempfile.TemporaryDirectory(prefix="bertstream-ranks-") as status_dir:
                    child.start(["torchrun", "--standalone", "--nproc_per_node", str(args.gpus), __file__,
                                 "rank", "--status_dir", status_dir, "--", *flags])
                    launcher = child.wait()
                    status = ranks_status(Path(status_dir), args.gpus)
                    if launcher != EXIT_OK and status == EXIT_OK:
                        status = EXIT_ERROR  # torchrun itself failed (rendezvous, a signal of its own)
            if status in _FINAL or child.stop_requested or attempt == args.restarts:
                break
            say(f"the trainer exited {status}; restarting it in {args.restart_delay_s:g} s "
                f"({attempt + 1} of {args.restarts}): it resumes from its newest checkpoint")
            child.sleep(args.restart_delay_s)
            if child.stop_requested:
                break
        output_dir = flag_value(flags, "--output_dir")
        table = heldout_table(Path(output_dir)) if output_dir and status == EXIT_OK else None
        if table:
            print(table, flush=True)
        say(f"trainer finished with status {status}")
        return status
    finally:
        write_state(args.state_file, state="done", status=status, started=started)


def run_producer(args: argparse.Namespace, flags: list[str]) -> int:
    child = Child()
    started = time.time()
    train, _ = resolve_corpus(args)
    try:
        check_readable(train, "corpus", args)
    except CorpusMissing as exc:
        say(str(exc))
        return wait_for_trainer(args, child, started, EXIT_ERROR)
    flags = [*flags, "--train_corpus", str(train)]
    for attempt in range(args.restarts + 1):
        process = child.start(["bertstream-producer", *flags])
        while process.poll() is None:
            if not child.stop_requested and trainer_finished(args.state_file, started):
                # The run is over: end this producer as compose stop would, once (a second SIGTERM while
                # it stops its workers would kill it at once).
                child.forward(signal.SIGTERM, None)
            time.sleep(_POLL_S)
        status = child.wait()
        if status == EXIT_OK or child.stop_requested or trainer_finished(args.state_file, started):
            return status
        if status == EXIT_USAGE or attempt == args.restarts:
            break
        say(f"the producer exited {status}; restarting it in {args.restart_delay_s:g} s "
            f"({attempt + 1} of {args.restarts})")
        child.sleep(args.restart_delay_s)
        if child.stop_requested:
            return status
    say(f"the producer gave up (status {status}); the run goes on with the other producers")
    return wait_for_trainer(args, child, started, status)


def wait_for_trainer(args: argparse.Namespace, child: Child, started: float, status: int) -> int:
    """Idle until the trainer's run is over or a stop: exiting now would end a healthy run (see the docstring)."""
    while not child.stop_requested and not trainer_finished(args.state_file, started):
        time.sleep(_POLL_S)
    return status


def run_rank(args: argparse.Namespace, flags: list[str]) -> int:
    """One torchrun rank: the trainer in this process, its status written where the launcher's parent reads it."""
    from trainer.cli import main

    status = EXIT_ERROR
    try:
        status = main(flags)
    finally:
        (Path(args.status_dir) / f"rank{os.environ.get('RANK', '0')}").write_text(str(status))
    return status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                epilog="Flags after `--` go to bertstream-trainer or bertstream-producer.")
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("trainer", "producer"):
        s = sub.add_parser(role)
        s.add_argument("--corpus_dir", default="",
                       help="the host folder mounted at /data (CORPUS_DIR); empty: the image's sample corpus")
        s.add_argument("--corpus", type=Path, required=True, help="the training corpus inside the container")
        s.add_argument("--sample_dir", type=Path, required=True,
                       help="the image's embedded default: model/ and corpus/{train,heldout}.txt")
        s.add_argument("--state_file", type=Path, required=True,
                       help="the trainer writes its state here; producers end when it says done")
        s.add_argument("--restarts", type=int, default=3, help="restarts after a crash before giving up")
        s.add_argument("--restart_delay_s", type=float, default=5.0)
        if role == "trainer":
            s.add_argument("--eval_corpus", type=lambda v: Path(v) if v else None, default=None,
                           help="held-out text for the before/after table (the sample brings its own); "
                           "empty: none")
            s.add_argument("--gpus", type=int, default=1, help="ranks: 1 runs bertstream-trainer, more torchrun")
    s = sub.add_parser("rank", help="internal: one torchrun rank")
    s.add_argument("--status_dir", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(ours)
    if args.role != "rank":
        if args.restarts < 0:
            parser.error(f"--restarts must be 0 or more, got {args.restarts}")
        if args.role == "trainer" and args.gpus < 1:
            parser.error(f"--gpus (TRAINER_GPUS) must be 1 or more, got {args.gpus}")
    run = {"trainer": run_trainer, "producer": run_producer, "rank": run_rank}[args.role]
    return run(args, flags)


if __name__ == "__main__":
    sys.exit(main())
