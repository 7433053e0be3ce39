"""Summary statistics of a list of measurements (latencies, throughputs).

Kept apart from timing (as pytest-benchmark does) so it can be checked on textbook
examples. Pure Python: the numbers must not depend on which numpy is installed.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

FIELDS = ("mean", "p50", "p90", "p99", "stdev", "min", "max", "count")


def percentile(sorted_values: Sequence[float], q_pct: float) -> float:
    """The q-th percentile of ascending `sorted_values`, linear between the closest ranks.

    This is numpy's default `method='linear'` (Hyndman & Fan 1996, definition 7): the
    rank is h = (n - 1) * q / 100, and the value interpolates x[floor(h)] and x[ceil(h)].
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q_pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q_pct}")
    rank = (len(sorted_values) - 1) * q_pct / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (rank - lo) * (sorted_values[hi] - sorted_values[lo])


def summarize(values: Sequence[float]) -> dict:
    """mean, p50, p90, p99, stdev (sample, n-1), min, max, count of `values`.

    No values: every statistic is None and count is 0 (a run that produced nothing
    reports nothing, not zeros). One value: stdev is 0.0.
    """
    xs = sorted(float(v) for v in values)
    if not xs:
        return {**dict.fromkeys(FIELDS), "count": 0}
    return {
        "mean": statistics.fmean(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        # Sample standard deviation: the measurements are a sample of the run-to-run noise.
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": xs[0],
        "max": xs[-1],
        "count": len(xs),
    }


def cv_pct(values: Sequence[float]) -> float | None:
    """Coefficient of variation, 100 * sample stdev / mean; None when undefined (no values
    or a zero mean)."""
    s = summarize(values)
    if s["count"] == 0 or s["mean"] == 0:
        return None
    return 100.0 * s["stdev"] / abs(s["mean"])
