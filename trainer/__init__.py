"""The GPU side of bertstream: trains BertForPreTraining (MLM + NSP) on a stream of batches or seed-format files.

Layout: `config` (the frozen configs, each flag declared on its field), `cli` (flags -> configs, run, exit
code), `source` (the ZeroMQ stream and an in-memory source),
`pregenerated` (the seed's epoch files), `model` (loading and the masked-positions loss), `loop` (set-up and
the training loop), `checkpoint` (atomic save and resume), `evaluate` (held-out evaluation), `metrics`
(metrics.jsonl, TensorBoard and the progress line).
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early by a signal, checkpoint saved, run again to resume
EXIT_INTERRUPTED = 130  # a second signal: stopped at once, without a checkpoint


class TrainerError(RuntimeError):
    """An expected failure the user can act on; the CLI prints its one-line message and exits 1."""


class StoppedEarly(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved at `step` and the run can be resumed."""

    def __init__(self, step: int, checkpoint):
        where = f"checkpoint in {checkpoint}" if checkpoint else "no checkpoint needed (no step was trained)"
        super().__init__(f"stopped at step {step}; {where}; run the same command again to resume")
        self.step = step
        self.checkpoint = checkpoint
