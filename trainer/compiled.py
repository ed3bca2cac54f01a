"""--compile: the training step's forward pass and loss through torch.compile, one static graph per width.

What is compiled is `PretrainingLoss`, the module `Ranks.wrap` builds and the training loop calls as
`forward(batch)` (under DDP, from inside DDP's forward): the embedding lookups, the encoder, the
masked-positions gather, both heads and the loss, in one graph. Its backward pass is compiled too: AOTAutograd
traces it with the forward, and the backend builds it at the first backward pass of each width. The
optimizer, the GradScaler and the metrics stay eager (cheap, or already fused). Evaluation stays eager too: it
calls the model itself, rarely, under no_grad, and compiling it would only add graphs.

Shapes are static (`dynamic=False`): a graph per width, each specialised to it. That is affordable because
the source pads every micro-batch to one of a few allowed widths (with --compile, the geometric ladder of
`common.lengths.compile_widths`: 8 widths at seq 128, 14 at 512) and the batch dimension is always the
micro-batch size; so a run compiles at most one graph per allowed width, each once, when a micro-batch of
that width first arrives. torch.compile's default would mark the sequence dimension dynamic at its second
width and compile one symbolic graph instead: fewer compiles, but kernels that cannot specialise to the sizes.

dynamo keeps up to `recompile_limit` graphs per compiled function (8 by default) and then runs the function
eagerly from there on, with no more than a warning: at seq 512 the 9th width would silently train eagerly.
So the limit of this compilation is raised to the widths plus a margin (never lowered), and `fullgraph=True`
turns both a graph break and a limit hit into an error instead of a silent slow-down.

Under DDP the loss module is compiled first and DDP wraps it, the order torch's documentation advises: DDP's
forward stays eager (so `no_sync()` still decides whether the backward pass all-reduces), and because the
compiled call runs inside it, dynamo's DDPOptimizer splits each graph at DDP's gradient buckets, so that each
bucket's all-reduce overlaps the rest of the backward pass. Autocast entered around the compiled call is traced
into the graph (dynamo guards on the autocast state: fp16 and bf16 runs compile as such).
"""

from __future__ import annotations

from typing import Sequence

import torch

from common.lengths import stream_widths
from common.progress import log
from trainer.model import PretrainingOutput, TensorBatch

BACKEND = "inductor"  # torch.compile's own default; tests may pass a cheaper one (see tests/test_compile.py)
# Compilations allowed beyond the allowed widths before dynamo gives up (it would raise, under fullgraph): room
# for a guard that fails once for a reason other than the width, not for a stream of new shapes.
RECOMPILE_MARGIN = 4


def compile_in_place(loss: torch.nn.Module, widths: Sequence[int], backend: str = BACKEND) -> int:
    """`loss.compile(...)`: its calls run compiled from here on, one static graph per width. Returns the
    recompile limit set (the widths plus a margin, never below dynamo's own).

    In place (`nn.Module.compile`), so that DDP can wrap the compiled module, the order torch's documentation
    advises: compiling the DDP module instead makes dynamo trace DDP's own forward, which it cannot in one graph.
    """
    import torch._dynamo

    if not widths:
        raise ValueError("--compile needs the widths the source pads micro-batches to, got none")
    limit = max(torch._dynamo.config.recompile_limit, len(widths) + RECOMPILE_MARGIN)
    if limit > torch._dynamo.config.accumulated_recompile_limit:
        # The global cap over every compiled region (256): only --pad_to_multiple_of 1 or 2 at seq 512 reach it.
        torch._dynamo.config.accumulated_recompile_limit = limit
    # isolate_recompiles: this module's graphs count against its own limit only. Compiled in place, every module
    # shares the code object of nn.Module._call_impl, and with it, otherwise, one list of graphs and one limit.
    loss.compile(dynamic=False, fullgraph=True, backend=backend, recompile_limit=limit, isolate_recompiles=True)
    return limit


class CompiledStep:
    """The training step's module (compiled in place, or DDP around the compiled one), called exactly as it is,
    saying when a micro-batch brings a width not compiled yet: that call and its backward pass are slow.

    `module` is what `Ranks.accumulating` calls `no_sync()` on under DDP.
    """

    def __init__(self, module: torch.nn.Module, widths: Sequence[int], recompile_limit: int, backend: str,
                 announce: bool = True):
        self.module = module
        self.widths = tuple(widths)
        self.recompile_limit = recompile_limit
        self.compiled_widths: list[int] = []  # the widths met so far, in order: a graph each
        self._announce = announce  # whether this process logs (rank 0)
        if announce:
            log.info("--compile: the training step (forward, loss, backward) compiles with %s, one graph per width, "
                     "each when its first micro-batch comes (seconds to minutes); %d width(s) at most: %s", backend,
                     len(self.widths), " ".join(map(str, self.widths)))

    def __call__(self, batch: TensorBatch) -> PretrainingOutput:
        if batch.width not in self.compiled_widths:
            self.compiled_widths.append(batch.width)
            if self._announce:
                log.info("--compile: compiling the training step for width %d (%d of at most %d widths)",
                         batch.width, len(self.compiled_widths), len(self.widths))
        return self.module(batch)


def step_widths(max_seq_len: int, pad_to_multiple_of: int = 0) -> tuple[int, ...]:
    """The widths a --compile run's source pads micro-batches to (`common.lengths.stream_widths` with --compile):
    multiples of --pad_to_multiple_of if given, else the ladder of `common.lengths.compile_widths`."""
    return stream_widths(max_seq_len, pad_to_multiple_of, compiled=True).allowed


def eager_module(forward) -> torch.nn.Module:
    """The module a (possibly compiled) training step runs: what DDP's no_sync() is called on."""
    return forward.module if isinstance(forward, CompiledStep) else forward
