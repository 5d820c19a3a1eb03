"""The one timing rule of the bench scripts: a warm-up call, then the mean of `repeats` calls."""

import time


def seconds_per_call(fn, repeats=3):
    """Mean seconds of `fn()` after one warm-up call, and its last result."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out
