"""Intervals and paired tests: DeLong against sklearn and a brute-force variance,
coverage by simulation, Wald intervals against their Fisher information."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.evaluation.uncertainty import (
    auc_interval,
    calibration_intervals,
    delong,
    paired_auc_test,
)
from cardiofed.exceptions import ConfigurationError


def _cohort(n: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p = 1.0 / (1.0 + np.exp(-(signal * x - 1.0)))
    return (rng.random(n) < p).astype(np.int64), p


def _brute_force_delong_variance(y: np.ndarray, s: np.ndarray) -> float:
    """DeLong 1988 eq. by definition: psi(x, z) = 1 if x > z, 1/2 if equal."""
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.var(v10, ddof=1) / len(x) + np.var(v01, ddof=1) / len(z))


def test_delong_auc_equals_sklearn_and_variance_equals_the_definition_with_ties() -> None:
    y, p = _cohort(300, 0)
    p = np.round(p, 2)  # ties
    auc, cov = delong(y, p)
    assert auc[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert cov[0, 0] == pytest.approx(_brute_force_delong_variance(y, p), rel=1e-10)


def test_auc_interval_covers_the_true_auc_at_its_level() -> None:
    """Coverage by simulation: 400 cohorts of 200 patients, 95% intervals."""
    big_y, big_p = _cohort(400_000, 99)
    truth = roc_auc_score(big_y, big_p)
    hits = 0
    for seed in range(400):
        y, p = _cohort(200, seed)
        low, high = auc_interval(y, p, level=0.95)
        hits += low <= truth <= high
    assert 0.92 <= hits / 400 <= 0.98


def test_auc_interval_stays_inside_zero_one_and_is_nan_with_one_class() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    low, high = auc_interval(y, p)
    assert (low, high) == (1.0, 1.0)  # perfect separation: no variance left
    y2, p2 = _cohort(40, 3, signal=4.0)
    low, high = auc_interval(y2, p2)
    assert 0.0 < low < roc_auc_score(y2, p2) < high < 1.0
    assert all(math.isnan(v) for v in auc_interval(np.zeros(5), p))
    with pytest.raises(ConfigurationError, match="'level'"):
        auc_interval(y2, p2, level=1.5)


def test_paired_test_finds_a_real_difference_and_not_a_null_one() -> None:
    y, p = _cohort(3000, 1)
    rng = np.random.default_rng(5)
    noisy = np.clip(p + rng.normal(0, 0.3, p.size), 0, 1)
    worse = paired_auc_test(y, noisy, p)
    assert worse.status == "worse" and worse.p_value < 1e-6
    assert worse.interval[0] < worse.difference < worse.interval[1] < 0
    same = paired_auc_test(y, p, p)
    assert same.difference == 0.0 and same.status == "no significant difference"
    # A monotone transform has the same ranks: no difference at all.
    assert paired_auc_test(y, p, p**2).status == "no significant difference"


def test_paired_test_false_positive_rate_is_alpha() -> None:
    """Two equally good, independent noisy scores: significant in about 5% of cohorts."""
    rejections = 0
    for seed in range(300):
        y, p = _cohort(300, seed)
        rng = np.random.default_rng(seed + 10_000)
        a = np.clip(p + rng.normal(0, 0.1, p.size), 0, 1)
        b = np.clip(p + rng.normal(0, 0.1, p.size), 0, 1)
        rejections += paired_auc_test(y, a, b).significant
    assert rejections / 300 < 0.09


def test_calibration_intervals_cover_known_slope_and_intercept() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    lp = rng.normal(-1.0, 1.0, n)
    p = 1.0 / (1.0 + np.exp(-lp))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(0.2 + 0.7 * lp)))).astype(int)
    ci = calibration_intervals(y, p)
    low, high = ci["calibration_slope"]
    assert low < 0.7 < high and high - low < 0.1
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(0.2 + lp)))).astype(int)
    lo, hi = calibration_intervals(y, p)["calibration_intercept"]
    assert lo < 0.2 < hi and hi - lo < 0.1


def test_calibration_intervals_are_nan_when_not_estimable() -> None:
    ci = calibration_intervals(np.ones(10), np.full(10, 0.3))
    assert all(math.isnan(v) for pair in ci.values() for v in pair)
