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
