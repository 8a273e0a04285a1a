"""Per-site logistic recalibration: recovers known miscalibration, identity when it cannot."""

from __future__ import annotations

import numpy as np
import pytest

from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.evaluation.recalibration import Recalibration, fit_recalibration
from cardiofed.exceptions import ConfigurationError, DataValidationError


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _miscalibrated(a: float, b: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted risks p and outcomes y ~ Bernoulli(sigmoid(a + b * logit(p)))."""
    rng = np.random.default_rng(seed)
    p = _sigmoid(rng.normal(-1.0, 1.2, n))
    lp = np.log(p / (1 - p))
    y = (rng.random(n) < _sigmoid(a + b * lp)).astype(np.int64)
    return y, p


def test_recovers_known_intercept_and_slope() -> None:
    y, p = _miscalibrated(-0.4, 0.6, 20000, seed=0)

    r = fit_recalibration(y, p)

    assert r.fitted and r.reason == ""
    assert r.intercept == pytest.approx(-0.4, abs=0.05)
    assert r.slope == pytest.approx(0.6, abs=0.05)
    # Agrees with the calibration slope reported by binary_metrics (same model).
    assert r.slope == pytest.approx(binary_metrics(y, p)["calibration_slope"], abs=1e-6)


def test_recalibrated_risks_are_calibrated_and_keep_the_ranking() -> None:
    y, p = _miscalibrated(-0.4, 0.6, 20000, seed=1)
    r = fit_recalibration(y, p)
    q = r.apply(p)

    after = fit_recalibration(y, q)
    # Refitting on the recalibrated risks gives the identity (the MLE is a fixed point).
    assert after.intercept == pytest.approx(0.0, abs=1e-6)
    assert after.slope == pytest.approx(1.0, abs=1e-6)
    # Mean risk equals the event rate (score equation of the intercept).
    assert q.mean() == pytest.approx(y.mean(), abs=1e-8)
    # Monotone transform: the order of patients is unchanged.
    assert np.array_equal(np.argsort(p, kind="stable"), np.argsort(q, kind="stable"))


def test_apply_by_hand() -> None:
    r = Recalibration(intercept=np.log(2.0), slope=2.0)
    # p = 0.5: logit 0 -> sigmoid(log 2) = 2/3.
    # p = 0.2: logit = log(1/4); log 2 + 2 log(1/4) = log(2/16) -> odds 1/8 -> 1/9.
    np.testing.assert_allclose(r.apply([0.5, 0.2]), [2 / 3, 1 / 9])
    with pytest.raises(ValueError, match=r"p must hold finite risks in \[0, 1\]"):
        r.apply([1.2])


def test_one_class_gives_identity_with_reason() -> None:
    p = np.linspace(0.1, 0.9, 50)
    r = fit_recalibration(np.zeros(50), p)

    assert not r.fitted
    assert (r.intercept, r.slope) == (0.0, 1.0)
    assert "single class" in r.reason and "all 50 labels are 0" in r.reason
    np.testing.assert_array_equal(r.apply(p), p)


def test_too_few_events_gives_identity_with_reason() -> None:
    y, p = _miscalibrated(-0.4, 0.6, 400, seed=2)
    y = np.zeros_like(y)
    y[:4] = 1

    r = fit_recalibration(y, p, min_events=10)

    assert not r.fitted
    assert "only 4 events" in r.reason and "min_events=10" in r.reason
    assert fit_recalibration(y, p, min_events=4).fitted


def test_separated_outcomes_give_identity_with_reason() -> None:
    p = np.linspace(0.01, 0.99, 40)
    y = (p > 0.5).astype(int)
    r = fit_recalibration(y, p, min_events=1)
    assert not r.fitted
    assert "did not converge" in r.reason


def test_constant_predictions_give_identity_with_reason() -> None:
    y = np.array([0, 1] * 20)
    r = fit_recalibration(y, np.full(40, 0.3), min_events=1)
    assert not r.fitted and "all predicted risks are equal" in r.reason


def test_validation() -> None:
    with pytest.raises(ConfigurationError, match="'min_events' parameter must be an integer"):
        fit_recalibration([0, 1], [0.2, 0.8], min_events=0)
    with pytest.raises(DataValidationError, match="y_true must contain only 0 and 1"):
        fit_recalibration([0, 2], [0.2, 0.8])
    with pytest.raises(DataValidationError, match="same length"):
        fit_recalibration([0, 1, 1], [0.2, 0.8])


def test_small_site_updates_only_the_intercept() -> None:
    # 300 patients, ~80 events: the slope's standard error (~0.15) exceeds 0.1.
    y, p = _miscalibrated(-0.4, 0.6, 300, seed=3)

    r = fit_recalibration(y, p)

    assert r.fitted and r.slope == 1.0
    assert "only the intercept is updated" in r.reason and "max_slope_se=0.1" in r.reason
    # Score equation of the intercept-only fit: mean recalibrated risk = event rate.
    assert r.apply(p).mean() == pytest.approx(y.mean(), abs=1e-8)
    full = fit_recalibration(y, p, max_slope_se=float("inf"))
    assert full.reason == "" and full.slope != 1.0


def test_large_site_applies_the_fitted_slope() -> None:
    # 20,000 rows: the slope standard error is ~0.02, so the fitted slope is applied.
    y, p = _miscalibrated(0.0, 1.0, 20000, seed=4)
    assert fit_recalibration(y, p, max_slope_se=0.05).reason == ""


@pytest.mark.parametrize("bad", [0, -1.0, True, "0.1"])
def test_max_slope_se_is_validated(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="'max_slope_se' parameter must be a number > 0"):
        fit_recalibration([0, 1] * 20, [0.3, 0.6] * 20, max_slope_se=bad)  # type: ignore[arg-type]
