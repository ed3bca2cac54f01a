"""Keep a producer process's freed batch memory for the next batch instead of returning it to the kernel.

A worker makes the same arrays for every batch: at the default 512 instances of 128 tokens, int64
intermediates of 512 KB each. With glibc's defaults, arrays that large come from fresh `mmap`s, and freeing
several at once at the top of the heap trims it, so every batch gets its memory back from the kernel as new
zero pages: 2.3 page faults an instance, which made an instance of a 512-instance batch cost 70% more CPU than one
of a 256-instance batch (whole-word masking, one worker, 100k against 170k instances per CPU-second). Fixing both
thresholds (setting one alone turns glibc's adaptive threshold off and leaves most of the faults) keeps
those arrays in the heap: no page faults, and 180-190k instances per CPU-second at 512. The price is memory that stays
mapped in the process instead of going back between batches: a worker's peak anonymous memory went from 36
to 41 MB (benchmarks/bench_p5_memory.py, 40 MB corpus).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its adaptive threshold (64-bit)
TRIM_THRESHOLD_BYTES = 64 << 20  # twice that, as glibc's adaptive rule sets it


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (forked children inherit them).

    Returns False where the C library is not glibc (musl, macOS): those allocators are left as they are.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; mallopt's parameters are glibc's)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # mallopt returns 1 on success, 0 on error
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return mmap_set == 1 and trim_set == 1
