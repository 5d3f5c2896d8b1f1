"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(call: Callable[[], object], n: int, warm_up: int = 3) -> float:
    """Median wall time of `call` over `n` runs, in ms, after `warm_up` untimed runs (kernel set-up on first use)."""
    for _ in range(warm_up):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000.0
