"""Memory given back: what freed tensors leave in the C allocator is returned before the decode (memory.py)."""

import ctypes
import platform
from pathlib import Path

import pytest
import torch

from musev_lite.memory import return_freed_memory


def resident_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                    reason="glibc's malloc_trim and /proc: Linux")
def test_freed_tensors_leave_the_resident_set():
    """2,000 tensors of 64 kB (each under glibc's mmap threshold, so from its heap), all freed but the last,
    which keeps the heap from shrinking by itself: 125 MB stay resident until return_freed_memory."""
    tensors = [torch.ones(16 * 1024) for _ in range(2000)]
    last = tensors[-1]
    del tensors
    kept = resident_mb()
    return_freed_memory()
    assert kept - resident_mb() > 100, (kept, resident_mb())
    assert last.sum() == 16 * 1024
