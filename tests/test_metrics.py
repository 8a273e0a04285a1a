"""Tests for cardiofed.evaluation.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from cardiofed.evaluation import binary_metrics
from cardiofed.evaluation.metrics import calibration_points, roc_points

# Tiny hand-computed example. At threshold 0.5: TP=2 (0.8, 0.9), FN=1 (0.3), FP=1 (0.6),
# TN=2 (0.1, 0.2).
Y = np.array([0, 0, 1, 1, 0, 1])
P = np.array([0.1, 0.6, 0.3, 0.8, 0.2, 0.9])

EXPECTED_KEYS = {
    "n", "prevalence", "mean_predicted", "auc", "accuracy", "brier", "calibration_slope",
    "calibration_intercept", "ece", "sensitivity", "specificity",
}


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def _expit(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_golden_values_tiny() -> None:
    m = binary_metrics(Y, P)
    assert set(m) == EXPECTED_KEYS
    assert m["n"] == 6
    assert m["prevalence"] == pytest.approx(0.5)
    assert m["mean_predicted"] == pytest.approx(2.9 / 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    # (0.01 + 0.36 + 0.49 + 0.04 + 0.04 + 0.01) / 6
    assert m["brier"] == pytest.approx(0.95 / 6)
    # 8 of 9 (positive, negative) pairs are ordered correctly.
    assert m["auc"] == pytest.approx(8 / 9)
    # With 10 bins every case sits in its own bin, so ECE = mean |p - y| = 1.9 / 6.
    assert m["ece"] == pytest.approx(1.9 / 6)
    assert all(isinstance(v, float) for v in m.values())


def test_ece_two_bins() -> None:
    # Bin [0, 0.5): mean p 0.2, observed 1/3. Bin [0.5, 1]: mean p 2.3/3, observed 2/3.
    # ECE = (3 * 2/15 + 3 * 1/10) / 6 = 7/60.
    assert binary_metrics(Y, P, n_bins=2)["ece"] == pytest.approx(7 / 60)


def test_threshold_is_inclusive() -> None:
    m = binary_metrics(Y, P, threshold=0.3)  # 0.3 counts as predicted positive
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)


def test_perfectly_calibrated_data() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 20_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    m = binary_metrics(y, p)
    # Sampling SE of the slope is ~0.03 at n=20000; 0.05 tolerance per the spec.
    assert m["calibration_slope"] == pytest.approx(1.0, abs=0.05)
    assert m["calibration_intercept"] == pytest.approx(0.0, abs=0.05)
    assert m["ece"] < 0.03


def _miscalibrated(n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.uniform(size=n) < _expit(0.3 + 0.5 * _logit(p))).astype(int)
    return y, p


def test_recovers_slope_and_intercept_of_miscalibrated_model() -> None:
    y, p = _miscalibrated()
    m = binary_metrics(y, p)
    # True slope 0.5; SE ~0.015 at n=20000, so 0.05 is > 3 SE.
    assert m["calibration_slope"] == pytest.approx(0.5, abs=0.05)
    # Calibration-in-the-large is not the generating intercept 0.3 (slope != 1): its
    # population value a* solves E[expit(a* + logit p)] = E[expit(0.3 + 0.5 logit p)].
    grid = np.linspace(0.05, 0.95, 100_001)
    target = _expit(0.3 + 0.5 * _logit(grid)).mean()
    lo, hi = -3.0, 3.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _expit(mid + _logit(grid)).mean() < target else (lo, mid)
    # SE of the intercept ~0.015 at n=20000; tolerance 0.05.
    assert m["calibration_intercept"] == pytest.approx(lo, abs=0.05)
    # The fitted intercept solves the score equation mean(expit(a + logit p)) = mean(y).
    fitted = _expit(m["calibration_intercept"] + _logit(p)).mean()
    assert fitted == pytest.approx(y.mean(), abs=1e-9)


def test_slope_matches_sklearn() -> None:
    y, p = _miscalibrated()
    # C=inf is an unpenalised fit (penalty=None is deprecated in newer scikit-learn).
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
    ref.fit(_logit(p)[:, None], y)
    assert binary_metrics(y, p)["calibration_slope"] == pytest.approx(ref.coef_[0, 0], abs=1e-4)


def test_one_class_gives_nan_without_exception() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.7])
    assert math.isnan(m["auc"])
    assert math.isnan(m["sensitivity"])
    assert math.isnan(m["calibration_slope"])
    assert math.isnan(m["calibration_intercept"])
    assert m["specificity"] == pytest.approx(2 / 3)


def test_separation_and_constant_predictions_give_nan_slope() -> None:
    assert math.isnan(binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["calibration_slope"])
    m = binary_metrics([0, 1, 0, 1], [0.5] * 4)
    assert math.isnan(m["calibration_slope"])
    assert m["calibration_intercept"] == pytest.approx(0.0, abs=1e-12)


def test_extreme_probabilities_are_clipped() -> None:
    m = binary_metrics([0, 1, 0, 1, 1], [0.0, 1.0, 0.3, 0.2, 0.9])
    assert math.isfinite(m["calibration_slope"])
    assert math.isfinite(m["calibration_intercept"])


@pytest.mark.parametrize(
    ("y_true", "y_prob", "kwargs", "match"),
    [
        ([0, 1], [0.5, -0.2], {}, r"y_prob must be in \[0, 1\]; got min -0.2"),
        ([0, 1], [0.5, 1.3], {}, r"y_prob must be in \[0, 1\]; got max 1.3"),
        ([0, 1], [0.5, float("nan")], {}, "y_prob must be finite"),
        ([0, 2], [0.5, 0.5], {}, "y_true must contain only 0 and 1; got 2"),
        ([0, 1, 1], [0.5, 0.5], {}, "same length; got 3 and 2"),
        ([], [], {}, "y_true must be non-empty"),
        ([[0, 1]], [[0.5, 0.5]], {}, r"y_true must be 1-D; got shape \(1, 2\)"),
        (["a", "b"], [0.5, 0.5], {}, "y_true must be numeric"),
        ([0, 1], [0.5, 0.5], {"threshold": 1.5}, r"threshold must be in \[0, 1\]; got 1.5"),
        ([0, 1], [0.5, 0.5], {"n_bins": 0}, "n_bins must be a positive integer; got 0"),
    ],
)
def test_invalid_inputs(y_true: object, y_prob: object, kwargs: dict[str, float],
                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(y_true, y_prob, **kwargs)  # type: ignore[arg-type]


def test_roc_points() -> None:
    fpr, tpr = roc_points(Y, P)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match="both classes"):
        roc_points([1, 1], [0.2, 0.3])


def test_calibration_points() -> None:
    mean_p, frac, count = calibration_points(Y, P, n_bins=2)
    np.testing.assert_allclose(mean_p, [0.2, 2.3 / 3])
    np.testing.assert_allclose(frac, [1 / 3, 2 / 3])
    np.testing.assert_array_equal(count, [3, 3])
    # Empty bins are dropped.
    mean_p, frac, count = calibration_points([0, 1], [0.05, 0.95], n_bins=10)
    np.testing.assert_allclose(mean_p, [0.05, 0.95])
    np.testing.assert_array_equal(count, [1, 1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=1, max_size=60))
def test_auc_score_equals_sklearn_with_ties_and_nan_with_one_class(
        rows: list[tuple[int, int]]) -> None:
    from sklearn.metrics import roc_auc_score

    from cardiofed.evaluation.metrics import auc_score

    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows]) / 20.0  # few distinct risks: many ties
    if 0 < y.sum() < y.size:
        assert auc_score(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    else:
        assert math.isnan(auc_score(y, p))


def test_grouped_auc_equals_sklearn_per_group_with_ties_and_one_class_groups() -> None:
    from sklearn.metrics import roc_auc_score

    from cardiofed.evaluation.metrics import grouped_auc

    rng = np.random.default_rng(0)
    groups = rng.integers(0, 6, 3000)
    p = np.round(rng.random(3000), 2)  # ties
    y = (rng.random(3000) < p).astype(int)
    y[groups == 5] = 0  # one class: no AUC
    got = grouped_auc(y, p, groups, 7)  # group 6 is empty
    for g in range(5):
        assert got[g] == pytest.approx(roc_auc_score(y[groups == g], p[groups == g]))
    assert np.isnan(got[5]) and np.isnan(got[6])
