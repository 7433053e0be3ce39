"""Statistics against textbook values and numpy's default percentile."""
import math
import random

import numpy as np
import pytest

from gptbench.stats import cv_pct, percentile, summarize


def test_one_to_ten():
    s = summarize(range(1, 11))
    assert s["count"] == 10
    assert s["mean"] == 5.5
    assert s["p50"] == 5.5
    assert s["p90"] == pytest.approx(9.1, abs=1e-12)
    assert s["p99"] == pytest.approx(9.91, abs=1e-12)
    # sqrt(sum((x - 5.5)^2) / 9) = sqrt(82.5 / 9)
    assert s["stdev"] == pytest.approx(3.0276503540974917, rel=1e-15)
    assert (s["min"], s["max"]) == (1.0, 10.0)


def test_unsorted_input_and_known_stdev():
    # Classic example: population stdev 2, sample stdev sqrt(32/7).
    s = summarize([9, 2, 5, 4, 4, 7, 5, 4])
    assert s["mean"] == 5.0
    assert s["p50"] == 4.5
    assert s["stdev"] == pytest.approx(math.sqrt(32 / 7), rel=1e-15)
    assert (s["min"], s["max"]) == (2.0, 9.0)


def test_matches_numpy_linear_percentile():
    rng = random.Random(0)
    for n in (1, 2, 3, 7, 100, 1001):
        xs = [rng.uniform(-5, 50) for _ in range(n)]
        s = summarize(xs)
        for q in (50, 90, 99):
            assert s[f"p{q}"] == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)
        expected_stdev = float(np.std(xs, ddof=1)) if n > 1 else 0.0
        assert s["stdev"] == pytest.approx(expected_stdev, rel=1e-12, abs=1e-12)


def test_single_value():
    s = summarize([42.0])
    assert s == {"mean": 42.0, "p50": 42.0, "p90": 42.0, "p99": 42.0, "stdev": 0.0,
                 "min": 42.0, "max": 42.0, "count": 1}


def test_empty_is_all_none():
    s = summarize([])
    assert s["count"] == 0
    assert all(s[k] is None for k in s if k != "count")
    assert set(s) == {"mean", "p50", "p90", "p99", "stdev", "min", "max", "count"}


def test_percentile_bounds():
    assert percentile([1.0, 2.0], 0) == 1.0
    assert percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_cv_pct():
    assert cv_pct(range(1, 11)) == pytest.approx(100 * 3.0276503540974917 / 5.5)
    assert cv_pct([3.0, 3.0, 3.0]) == 0.0
    assert cv_pct([]) is None
    assert cv_pct([-1.0, 1.0]) is None  # zero mean: undefined


# ---- bootstrap intervals and the Mann-Whitney test -----------------------------------------

from gptbench import stats  # noqa: E402


def test_resamples_are_seeded_draws_of_n_batches():
    first = [c.tolist() for c in stats.resample_counts(5, resamples=20, seed=3)]
    again = [c.tolist() for c in stats.resample_counts(5, resamples=20, seed=3)]
    other = [c.tolist() for c in stats.resample_counts(5, resamples=20, seed=4)]
    assert first == again and first != other
    assert all(len(c) == 5 and sum(c) == 5 and min(c) >= 0 for c in first)


def test_a_constant_ratio_has_no_spread():
    # every batch at exactly 100 tokens/s, whatever its size: every resample's ratio is 100
    factors = stats.ratio_factors([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4], resamples=200)
    assert factors == pytest.approx([1.0] * 200, rel=1e-12)


def test_ratio_factors_are_each_resamples_ratio_of_sums_over_the_whole():
    tokens, wall = [16, 16, 16, 16], [0.1, 0.2, 0.4, 0.3]
    whole = sum(tokens) / sum(wall)
    counts = list(stats.resample_counts(4, resamples=50, seed=7))
    expected = [sum(c * t for c, t in zip(cs, tokens)) / sum(c * w for c, w in zip(cs, wall)) / whole
                for cs in counts]
    assert stats.ratio_factors(tokens, wall, resamples=50, seed=7) == pytest.approx(expected, rel=1e-12)


def test_pooled_percentile_equals_the_percentile_of_the_expanded_resample():
    rng = random.Random(1)
    groups = [[rng.uniform(0, 10) for _ in range(rng.randint(1, 6))] for _ in range(9)]
    groups[4] = groups[2][:2]  # ties across batches
    for q in (50, 90):
        got = stats.pooled_percentile_bootstrap(groups, q, resamples=60, seed=5)
        want = [percentile(sorted(v for g, c in zip(groups, cs) for _ in range(c) for v in g), q)
                for cs in stats.resample_counts(len(groups), resamples=60, seed=5)]
        assert got == pytest.approx(want, rel=1e-12)


def test_percentile_interval_is_the_central_95_percent():
    assert stats.percentile_interval(range(1001)) == pytest.approx([25.0, 975.0])


def test_the_ratio_interval_covers_the_true_throughput_about_95_percent_of_the_time():
    rng = random.Random(11)
    true_rate, hits, trials = 100.0, 0, 200
    for trial in range(trials):
        wall = [rng.uniform(0.5, 1.5) for _ in range(30)]
        tokens = [w * true_rate * rng.gauss(1.0, 0.1) for w in wall]
        point = sum(tokens) / sum(wall)
        low, high = (point * f for f in stats.percentile_interval(
            stats.ratio_factors(tokens, wall, resamples=400, seed=trial)))
        hits += low <= true_rate <= high
    # the percentile bootstrap undercovers a little with 30 batches; 95 % nominal
    assert 0.85 <= hits / trials <= 0.99


def test_mann_whitney_textbook_values():
    # no ties: U of [1,2,3] against [4,5,6] is 0; z = (4.5 - 0.5) / sqrt(9 * 7 / 12)
    u, p = stats.mann_whitney([1, 2, 3], [4, 5, 6])
    assert u == 0.0
    assert p == pytest.approx(math.erfc(4 / math.sqrt(5.25) / math.sqrt(2)), rel=1e-12)
    assert p == pytest.approx(0.0809, abs=5e-4)
    assert stats.mann_whitney([1.0], []) is None
    assert stats.mann_whitney([2.0, 2.0], [2.0, 2.0]) is None  # every value tied


def test_mann_whitney_u_counts_pairs_with_ties_as_halves():
    rng = random.Random(2)
    a = [rng.randint(0, 5) for _ in range(12)]
    b = [rng.randint(2, 7) for _ in range(9)]
    pairs = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    u, p = stats.mann_whitney(a, b)
    assert u == pairs and 0 < p < 1
    assert stats.mann_whitney(b, a)[1] == pytest.approx(p)  # two-sided: symmetric
