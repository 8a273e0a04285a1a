"""A site's update along the hierarchy: it recovers known miscalibration, keeps the model
when evidence is insufficient, and revises a term only when the split shows it."""

from __future__ import annotations

import numpy as np
import pytest

from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.evaluation.recalibration import Recalibration, describe, fit_update
from cardiofed.exceptions import ConfigurationError, DataValidationError


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _site(a: float, b: float, n: int, seed: int, term: float = 0.0
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model risks p, standardised columns z (3), and outcomes drawn from
    sigmoid(a + b logit(p) + term * z[:, 1])."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    lp = -1.0 + 0.8 * z[:, 0] + 0.4 * z[:, 2]
    p = _sigmoid(lp)
    y = (rng.random(n) < _sigmoid(a + b * lp + term * z[:, 1])).astype(np.int64)
    return y, p, z


def test_a_well_calibrated_site_keeps_the_global_model() -> None:
    y, p, z = _site(0.0, 1.0, 800, seed=0)
    r = fit_update(y, p, z)
    assert not r.fitted and r.level == "none"
    assert r.reason.startswith("kept the global model (intercept: LR")
    np.testing.assert_array_equal(r.apply(p, z), p)


def test_a_shifted_site_gets_an_intercept() -> None:
    y, p, z = _site(-0.6, 1.0, 3000, seed=1)
    r = fit_update(y, p, z)
    assert r.level == "intercept" and r.slope == 1.0 and r.coefficients == {}
    assert r.intercept == pytest.approx(-0.6, abs=0.12)
    # Score equation of the intercept: mean updated risk = event rate.
    assert r.apply(p).mean() == pytest.approx(y.mean(), abs=1e-6)


def test_an_overfitted_model_gets_a_slope_equal_to_the_calibration_slope() -> None:
    y, p, z = _site(0.0, 0.6, 5000, seed=2)
    r = fit_update(y, p, z)
    assert r.level == "slope"
    assert r.slope == pytest.approx(binary_metrics(y, p)["calibration_slope"], abs=1e-6)
    after = binary_metrics(y, r.apply(p))
    assert after["calibration_slope"] == pytest.approx(1.0, abs=1e-6)
    assert after["calibration_intercept"] == pytest.approx(0.0, abs=1e-6)


def test_a_term_the_model_misses_is_revised_by_name() -> None:
    y, p, z = _site(0.0, 1.0, 6000, seed=3, term=0.5)
    r = fit_update(y, p, z, term_names=["a", "b", "c"])
    assert r.level == "terms" and list(r.coefficients) == [1]
    assert r.coefficients[1] == pytest.approx(0.5, abs=0.1)
    assert "term b: LR" in r.reason
    assert describe(r, ["a", "b", "c"]).endswith(f"b {r.coefficients[1]:+.3f}")
    with pytest.raises(ValueError, match="pass the standardised model columns"):
        r.apply(p)


def test_a_small_site_lacks_the_events_for_more_than_an_intercept() -> None:
    y, p, z = _site(0.0, 0.5, 300, seed=4)
    y[:] = 0
    y[:30] = 1  # 30 events: an intercept (25 needed), not a slope (50)
    r = fit_update(y, p, z)
    assert "a slope needs 50 events, the split has 30" in r.reason
    assert r.level in ("none", "intercept")
    y[:] = 0
    y[:15] = 1
    assert "an intercept needs 25 events, the split has 15" in fit_update(y, p, z).reason


def test_one_class_keeps_the_model() -> None:
    r = fit_update(np.zeros(50), np.linspace(0.1, 0.9, 50))
    assert not r.fitted and "one outcome class" in r.reason


def test_false_updates_are_rare_on_a_calibrated_model() -> None:
    """Each step is a test at alpha = 0.05: a calibrated model is changed rarely."""
    changed = sum(fit_update(*_site(0.0, 1.0, 400, seed=s)).fitted for s in range(200))
    assert changed / 200 < 0.12


def test_apply_by_hand() -> None:
    r = Recalibration(intercept=np.log(2.0), slope=2.0, level="slope")
    # p = 0.5: logit 0 -> sigmoid(log 2) = 2/3.
    # p = 0.2: logit = log(1/4); log 2 + 2 log(1/4) = log(2/16) -> odds 1/8 -> 1/9.
    np.testing.assert_allclose(r.apply([0.5, 0.2]), [2 / 3, 1 / 9])
    with pytest.raises(ValueError, match=r"p must hold finite risks in \[0, 1\]"):
        r.apply([1.2])


def test_validation() -> None:
    with pytest.raises(ConfigurationError, match="'alpha'"):
        fit_update([0, 1], [0.2, 0.8], alpha=0.0)
    with pytest.raises(ConfigurationError, match="'min_events_per_parameter'"):
        fit_update([0, 1], [0.2, 0.8], min_events_per_parameter=0)
    with pytest.raises(ConfigurationError, match="'max_terms'"):
        fit_update([0, 1], [0.2, 0.8], max_terms=-1)
    with pytest.raises(ConfigurationError, match="one row per outcome"):
        fit_update([0, 1], [0.2, 0.8], np.zeros((3, 2)))
    with pytest.raises(DataValidationError, match="y_true must contain only 0 and 1"):
        fit_update([0, 2], [0.2, 0.8])


def test_a_reversed_slope_is_never_applied() -> None:
    """Labels that run against the model (a coding error) are no calibration to fix."""
    y, p, z = _site(0.0, -0.8, 3000, seed=5)
    r = fit_update(y, p, z)
    assert r.level in ("none", "intercept") and r.slope == 1.0
    assert "would reverse the model's ranking" in r.reason
