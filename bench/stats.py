"""Small statistics for the benchmark: percentiles, medians of repeats, binomial intervals.

Pure functions of numbers, no I/O, so the judgement of "met or not" can be read and tested apart
from the traffic that produced the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_interval(n: int, p: float, confidence: float = 0.999) -> tuple[int, int]:
    """The central interval [low, high] of counts that Binomial(n, p) hits with ``confidence``.

    Exact: each tail outside it has probability at most (1 - confidence) / 2.
    """
    if not 0 < p < 1:
        return (round(n * p), round(n * p))
    tail = (1 - confidence) / 2
    pmf = [math.exp(_log_binomial_pmf(k, n, p)) for k in range(n + 1)]
    low, cumulative = 0, 0.0
    while cumulative + pmf[low] <= tail:
        cumulative += pmf[low]
        low += 1
    high, cumulative = n, 0.0
    while cumulative + pmf[high] <= tail:
        cumulative += pmf[high]
        high -= 1
    return low, high
