"""How wide a batch is: padded to its longest row, rounded up to a width the kernels (and torch.compile) like.

A batch padded to `max_seq_len` spends most of its positions on padding when instances are short: 80% of them
at seq 512 on a corpus of short documents (notes, tickets, abstracts), and attention pays for padding
quadratically. Here a batch is as wide as its longest row, rounded up to an allowed width:

- multiples of PAD_MULTIPLE by default: float16 tensor cores want matrix dimensions in multiples of 8, and a
  width rounded so wastes at most 7 positions a row;
- with `--compile`, a short geometric ladder (`compile_widths`): every distinct width is a graph to compile, so
  a run compiles a handful of them, not one per multiple of 8.

The rows themselves are grouped by length in the trainer's mixing pool (common.shuffle), so that the longest row
of a micro-batch is close to its shortest; producers only cut each message to its longest row (common.wire).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import replace

import numpy as np

from common.instances import Batch

PAD_MULTIPLE = 8
# --compile's ladder: each width at most this factor above the one below it, so a row padded to its bucket's
# width wastes under a quarter of it (about a tenth on average): 14 widths at seq 512, 8 at seq 128.
COMPILE_GROWTH = 1.3


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def multiple_widths(max_seq_len: int, multiple: int = PAD_MULTIPLE) -> tuple[int, ...]:
    """Every multiple of `multiple` below max_seq_len, then max_seq_len (which need not be one)."""
    if multiple < 1:
        raise ValueError(f"the width multiple must be >= 1, got {multiple}")
    return (*range(multiple, max_seq_len, multiple), max_seq_len)


def compile_widths(max_seq_len: int, smallest: int = 32, growth: float = COMPILE_GROWTH) -> tuple[int, ...]:
    """A geometric ladder of multiples of 8 from `smallest` to max_seq_len: few widths, each within `growth`."""
    widths, width = [], min(smallest, max_seq_len)
    while width < max_seq_len:
        widths.append(width)
        width = max(width + PAD_MULTIPLE, int(width * growth) // PAD_MULTIPLE * PAD_MULTIPLE)
    return (*widths, max_seq_len)


def stream_widths(max_seq_len: int, multiple: int = 0, compiled: bool = False) -> "Widths":
    """A stream's widths: multiples of `multiple` if given (max_seq_len or more: max_seq_len alone, every batch
    padded to it), else the --compile ladder when compiling, else multiples of PAD_MULTIPLE."""
    if multiple:
        return Widths(multiple_widths(max_seq_len, multiple))
    return Widths(compile_widths(max_seq_len) if compiled else multiple_widths(max_seq_len))


class Widths:
    """The allowed widths of one stream, and the one a batch of a given longest row is padded to."""

    def __init__(self, allowed: tuple[int, ...]):
        if not allowed or list(allowed) != sorted(set(allowed)) or allowed[0] < 1:
            raise ValueError(f"widths must be increasing and positive, got {allowed}")
        self.allowed = tuple(allowed)

    @property
    def max_seq_len(self) -> int:
        return self.allowed[-1]

    def of(self, longest: int) -> int:
        """The smallest allowed width that holds `longest` tokens."""
        if longest > self.max_seq_len:
            raise ValueError(f"a row of {longest} tokens is longer than max_seq_len {self.max_seq_len}")
        return self.allowed[bisect_left(self.allowed, longest)]


def fit_width(batch: Batch, width: int, pad_id: int | None = None) -> Batch:
    """`batch` with its token arrays cut or padded to `width` positions (its rows must fit: lengths <= width).

    Cutting returns views; padding copies (ids with `pad_id`, segment ids with 0, as `make_batch` pads), and
    needs `pad_id`.
    """
    have = batch.input_ids.shape[1]
    if have == width:
        return batch
    if have > width:
        return replace(batch, input_ids=batch.input_ids[:, :width], token_type_ids=batch.token_type_ids[:, :width])
    if pad_id is None:
        raise ValueError(f"widening a batch from {have} to {width} positions needs the pad id")
    extra = ((0, 0), (0, width - have))
    return replace(batch, input_ids=np.pad(batch.input_ids, extra, constant_values=pad_id),
                   token_type_ids=np.pad(batch.token_type_ids, extra))


def trim(batch: Batch, widths: Widths, pad_id: int | None = None) -> Batch:
    """`batch` padded only to its longest row, rounded up to an allowed width (`pad_id`: where that is wider)."""
    return fit_width(batch, widths.of(int(batch.lengths.max())), pad_id)
