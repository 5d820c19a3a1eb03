"""The timing rules of the bench scripts.

A shared machine's load changes from second to second, so two things are only compared when timed in
one process, interleaved: one warm-up call each, then rounds A, B, A, B, ... The ratio reported is the
median of the per-round ratios, with their range, next to the machine's load before and after.
"""

import os
import statistics
import time


def seconds_per_call(fn, repeats=3):
    """Mean seconds of `fn()` after one warm-up call, and its last result."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def interleaved(fns: dict, repeats=3, warmup=True) -> dict:
    """{name: fn} -> {name: (seconds of each round, last result)}: a warm-up call of each (unless the
    caller warmed them up), then `repeats` rounds in which every fn is called once, in the dict's order."""
    results = {name: ([], fn() if warmup else None) for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = fn()
            results[name] = (results[name][0] + [time.perf_counter() - start], out)
    return results


def ratio(slow: list, fast: list) -> str:
    """'x1.23 (1.20-1.27)': the median and range of the per-round ratios slow / fast."""
    rounds = [s / f for s, f in zip(slow, fast)]
    return f"x{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def median(seconds: list) -> float:
    return statistics.median(seconds)


def load() -> str:
    """The machine's load averages (1, 5, 15 min) and its core count."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"
