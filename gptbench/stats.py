"""Summary statistics of a list of measurements (latencies, throughputs).

Kept apart from timing (as pytest-benchmark does) so it can be checked on textbook
examples. The summaries are pure Python: the numbers must not depend on which numpy is
installed; the bootstrap draws its batches with Python's seeded random and only sums and
indexes with numpy.
"""
from __future__ import annotations

import math
import random
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


# ---- bootstrap intervals over timed batches ------------------------------------------------

CONFIDENCE = 0.95
RESAMPLES = 1000
SEED = 0
METHOD = ("percentile bootstrap over timed batches (Efron & Tibshirani 1993, ch. 13): "
          "batches drawn with replacement, the statistic recomputed on each resample, the "
          "2.5th and 97.5th percentiles of those")


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED):
    """`resamples` arrays of how often each of `n` batches was drawn (n draws each), from
    Python's seeded Mersenne Twister, so the draws do not depend on the numpy version."""
    import numpy as np

    rng = random.Random(seed)
    population = range(n)
    for _ in range(resamples):
        yield np.bincount(rng.choices(population, k=n), minlength=n)


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> list[float]:
    """[low, high]: the central `confidence` share of `values` (Hyndman & Fan 7)."""
    xs = sorted(values)
    tail = 100 * (1 - confidence) / 2
    return [percentile(xs, tail), percentile(xs, 100 - tail)]


def ratio_factors(numerators: Sequence[float], denominators: Sequence[float],
                  resamples: int = RESAMPLES, seed: int = SEED) -> list[float]:
    """Bootstrap of the ratio of sums (e.g. tokens / seconds over batches), each resample's
    ratio divided by the whole sample's: the spread of the estimate as factors around 1,
    which scale any figure proportional to the ratio (a throughput, a speedup)."""
    import numpy as np

    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    whole = num.sum() / den.sum()
    return [float(c @ num / (c @ den) / whole) for c in resample_counts(len(num), resamples, seed)]


def pooled_percentile_bootstrap(groups: Sequence[Sequence[float]], q_pct: float,
                                resamples: int = RESAMPLES, seed: int = SEED) -> list[float]:
    """Bootstrap values of the q-th percentile of the values of `groups` pooled, resampling
    whole groups (one group: one timed batch's latencies, which share its noise). Each
    resample's percentile equals `percentile` of the pooled list with every group repeated
    as often as drawn, computed on the sorted values with their draw counts as weights."""
    import numpy as np

    values = np.asarray([v for g in groups for v in g], float)
    owner = np.asarray([i for i, g in enumerate(groups) for _ in g], int)
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    out = []
    for counts in resample_counts(len(groups), resamples, seed):
        cumulative = np.cumsum(counts[owner])
        rank = (cumulative[-1] - 1) * q_pct / 100
        lo = math.floor(rank)
        x_lo = values[np.searchsorted(cumulative, lo, side="right")]
        x_hi = values[np.searchsorted(cumulative, min(lo + 1, cumulative[-1] - 1), side="right")]
        out.append(float(x_lo + (rank - lo) * (x_hi - x_lo)))
    return out


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """(U of `a`, two-sided p-value) of the Mann-Whitney U test (Mann & Whitney 1947): do
    values of `a` tend to be larger or smaller than those of `b`? Normal approximation with
    the tie correction and a continuity correction of 1/2 (scipy.stats.mannwhitneyu's
    asymptotic method). None when a side has no values or every value is tied."""
    n_a, n_b = len(a), len(b)
    if not n_a or not n_b:
        return None
    pooled = sorted([(float(v), 0) for v in a] + [(float(v), 1) for v in b])
    n = n_a + n_b
    rank_sum_a, ties, i = 0.0, 0.0, 0
    while i < n:  # average ranks over runs of equal values
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        average = (i + j) / 2 + 1
        rank_sum_a += average * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    u_a = rank_sum_a - n_a * (n_a + 1) / 2
    variance = n_a * n_b / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return None
    z = (abs(u_a - n_a * n_b / 2) - 0.5) / math.sqrt(variance)
    return u_a, min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
