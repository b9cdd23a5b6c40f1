"""Timing helpers shared by the benchmark scripts: ratios measured side by side in one process.

The machine is shared and noisy, so absolute times mean little. Each benchmark runs its candidates
interleaved (A B A B ...), takes the median of each, and reports ratios. Time is the calling
thread's CPU time (``time.thread_time``) unless ``wall=True``; with ``torch.set_num_threads(1)``
that counts the work done, not the waiting for other processes.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1,
                wall: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, run interleaved ``repeats`` times after ``warmup``.

    Args:
        fns: ``{name: zero-argument callable}``.
        repeats: Timed rounds; each round calls every function once, in order.
        warmup: Untimed rounds first.
        wall: Wall-clock time (``perf_counter``) instead of this thread's CPU time.
    """
    clock = time.perf_counter if wall else time.thread_time
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, in GB (``resource.getrusage`` high-water mark)."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1e9 if sys.platform == "darwin" else 1e6)
