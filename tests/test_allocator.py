"""common.allocator: a producer's per-batch arrays reuse freed memory instead of faulting in new pages."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# One "batch": four int64 arrays of 512 x 128 (512 KB each), as a worker's masking makes at the default
# --batch_size, freed together. Prints the minor page faults per batch after a first, warming one.
BATCHES = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "tuned":
        from common.allocator import keep_freed_memory
        assert keep_freed_memory()

    def batch():
        arrays = [np.ones((512, 128), dtype=np.int64) for _ in range(4)]
        return sum(int(a[0, 0]) for a in arrays)

    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        batch()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
""")


def glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return False
    return True


def faults_per_batch(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", BATCHES, mode], cwd=REPO, capture_output=True, text=True,
                            check=True)
    return float(result.stdout)


@pytest.mark.skipif(not glibc(), reason="the thresholds are glibc's mallopt parameters; other C libraries keep theirs")
def test_batch_arrays_come_back_from_the_heap_without_page_faults():
    # Each 512 KB array is 128 pages; without the setting, most of them are faulted in again every batch.
    assert faults_per_batch("default") > 100
    assert faults_per_batch("tuned") < 5


def test_keep_freed_memory_reports_whether_it_applied():
    # In a child: the setting is process-wide, and this test process should keep glibc's defaults.
    code = "from common.allocator import keep_freed_memory; print(keep_freed_memory())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(glibc())
