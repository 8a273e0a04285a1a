"""Tests for cardiofed.evaluation.effective_data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.evaluation.effective_data import (
    LearningCurveFit,
    default_sizes,
    effective_data_equivalent,
    effective_data_from_experiment,
    fit_learning_curve,
    learning_curve,
    learning_curve_detail,
    stratified_subsample,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    FEDERATED,
    POOLED_TEST,
    ExperimentResult,
    run_experiment,
)
from cardiofed.simulation.prepare import PreparedSite, prepare_federation

Experiment = tuple[ExperimentResult, list[PreparedSite]]

SIZES = [int(n) for n in np.round(np.geomspace(50, 5000, 8))]


def curve_points(a: float, b: float, c: float) -> list[tuple[int, float]]:
    return [(n, a - b * n ** (-c)) for n in SIZES]


# --------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("abc", [(0.85, 1.2, 0.5), (0.75, 0.3, 0.3), (0.95, 5.0, 1.2),
                                 (0.7, 0.05, 1.9)])
def test_fit_recovers_noiseless_parameters(abc: tuple[float, float, float]) -> None:
    fit = fit_learning_curve(curve_points(*abc))
    assert (fit.a, fit.b, fit.c) == pytest.approx(abc, abs=1e-3)
    assert fit.params == pytest.approx(dict(zip("abc", abc, strict=True)), abs=1e-3)
    assert fit.rmse < 1e-8
    assert (fit.n_min, fit.n_max) == (50, 5000)


def test_fit_respects_bounds() -> None:
    # Points still climbing steeply at the largest size: the asymptote hits its bound of 1.
    fit = fit_learning_curve([(100, 0.6), (200, 0.7), (400, 0.8), (800, 0.9)])
    assert 0.5 <= fit.a <= 1.0 and fit.b >= 0.0 and 0.0 < fit.c <= 2.0
    assert fit.asymptote_at_bound
    # A falling curve cannot be fitted with b < 0: the best is flat.
    flat = fit_learning_curve([(100, 0.8), (200, 0.75), (400, 0.7)])
    assert flat.b == pytest.approx(0.0, abs=1e-6)


def test_size_for_inverts_predict() -> None:
    fit = fit_learning_curve(curve_points(0.85, 1.2, 0.5))
    for n in (10, 50, 777, 5000, 1e6):
        assert fit.size_for(fit.predict(n)) == pytest.approx(n, rel=1e-6)
    assert fit.predict(np.array(SIZES, dtype=float)) == pytest.approx(
        [v for _, v in curve_points(0.85, 1.2, 0.5)], abs=1e-6)
    assert fit.size_for(0.85) == math.inf and fit.size_for(0.9) == math.inf
    flat = LearningCurveFit(a=0.8, b=0.0, c=1.0, n_min=10, n_max=100, rmse=0.0)
    assert flat.size_for(0.7) == 0.0


def test_fit_validation() -> None:
    with pytest.raises(ConfigurationError, match="3 distinct sizes"):
        fit_learning_curve([(10, 0.6), (10, 0.61), (20, 0.65)])
    with pytest.raises(ConfigurationError, match="AUCs must be finite"):
        fit_learning_curve([(10, 0.6), (20, math.nan), (40, 0.7)])
    with pytest.raises(ConfigurationError, match="sizes must be positive"):
        fit_learning_curve([(0, 0.6), (20, 0.65), (40, 0.7)])


# --------------------------------------------------------------------------- the answer


def test_effective_data_equivalent_within_range() -> None:
    fit = fit_learning_curve(curve_points(0.85, 1.2, 0.5))
    out = effective_data_equivalent(fit, 0.80, 500)
    # 0.85 - 1.2 / sqrt(n) = 0.80  =>  n = (1.2 / 0.05)^2 = 576
    assert out["n_equivalent"] == pytest.approx(576, rel=1e-4)
    assert out["multiple"] == pytest.approx(576 / 500, rel=1e-4)
    assert out["reachable"] is True and out["extrapolated"] is False
    assert "576 patients" in out["explanation"] and "1.15x" in out["explanation"]


def test_effective_data_equivalent_extrapolated() -> None:
    fit = fit_learning_curve(curve_points(0.85, 1.2, 0.5))
    out = effective_data_equivalent(fit, 0.845, 500)  # n = (1.2 / 0.005)^2 = 57,600
    assert out["n_equivalent"] == pytest.approx(57_600, rel=1e-3)
    assert out["reachable"] is True and out["extrapolated"] is True
    assert "Extrapolated beyond the largest subsample (5,000)" in out["explanation"]


def test_effective_data_equivalent_unreachable() -> None:
    fit = fit_learning_curve(curve_points(0.85, 1.2, 0.5))
    out = effective_data_equivalent(fit, 0.9, 500)
    assert out["reachable"] is False
    assert out["n_equivalent"] == math.inf and out["multiple"] == math.inf
    assert out["extrapolated"] is False
    assert "not reachable by a single hospital under this curve" in out["explanation"]
    assert "0.850" in out["explanation"]


def test_effective_data_equivalent_validation() -> None:
    fit = fit_learning_curve(curve_points(0.85, 1.2, 0.5))
    with pytest.raises(ConfigurationError, match="federated_auc"):
        effective_data_equivalent(fit, math.nan, 500)
    with pytest.raises(ConfigurationError, match="largest_site_size"):
        effective_data_equivalent(fit, 0.8, 0)


# --------------------------------------------------------------------------- the curve


def test_stratified_subsample_keeps_prevalence() -> None:
    y = np.r_[np.ones(200), np.zeros(800)]
    rng = np.random.default_rng(0)
    for size in (2, 10, 55, 1000):
        idx = stratified_subsample(y, size, rng)
        assert idx.size == np.unique(idx).size == size
        assert y[idx].sum() == max(1, round(size * 0.2))
    with pytest.raises(ConfigurationError, match="size"):
        stratified_subsample(y, 1001, rng)


def test_default_sizes_geometric() -> None:
    sizes = default_sizes(870)
    assert sizes[0] == 50 and sizes[-1] == 870
    assert sizes == sorted(set(sizes))
    ratios = np.diff(np.log(sizes))
    assert ratios == pytest.approx(ratios[0], rel=0.05)
    assert default_sizes(30) == [30]


@pytest.fixture(scope="module")
def experiment() -> Experiment:
    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.3)
    config = SimulationConfig.create(rounds=3, seed=1)
    result = run_experiment(data, config, baselines=False)
    return result, prepare_federation(data, config.standardisation)


def test_learning_curve_deterministic_and_shaped(experiment: Experiment) -> None:
    result, sites = experiment
    x = np.concatenate([s.x_train for s in sites])
    y = np.concatenate([s.y_train for s in sites])
    xt = np.concatenate([s.x_test for s in sites])
    yt = np.concatenate([s.y_test for s in sites])
    config = result.config
    one = learning_curve(x, y, xt, yt, config=config, sizes=[40, 400], repeats=2, seed=7)
    assert one == learning_curve(x, y, xt, yt, config=config, sizes=[40, 400], repeats=2,
                                 seed=7)
    assert [n for n, _ in one] == [40, 400]
    assert all(0.0 <= auc <= 1.0 for _, auc in one)
    detail = learning_curve_detail(x, y, xt, yt, config=config, sizes=[40, 400], repeats=2,
                                   seed=7)
    assert [(p.size, p.mean_auc) for p in detail] == one
    assert all(len(p.aucs) == 2 for p in detail)
    with pytest.raises(ConfigurationError, match="sizes"):
        learning_curve(x, y, xt, yt, seed=7, config=result.config, sizes=[y.size + 1],
                       repeats=1)


def test_effective_data_from_experiment(experiment: Experiment) -> None:
    result, sites = experiment
    out = effective_data_from_experiment(result, sites, repeats=2, seed=0)
    total = sum(s.n_train for s in sites)
    assert out["federated_auc"] == result.metrics[POOLED_TEST][FEDERATED]["auc"]
    assert out["largest_site_size"] == max(s.n_train for s in sites)
    sizes = [n for n, _ in out["learning_curve"]]
    assert sizes[0] == 50 and sizes[-1] == total
    assert set(out["learning_curve_repeats"]) == set(sizes)
    assert isinstance(out["explanation"], str) and out["explanation"]
    if out["reachable"]:
        assert math.isfinite(out["multiple"]) and out["multiple"] > 0
        assert out["multiple"] == pytest.approx(out["n_equivalent"] / out["largest_site_size"])
    else:
        assert "not reachable by a single hospital" in out["explanation"]
    again = effective_data_from_experiment(result, sites, repeats=2, seed=0)
    assert again["learning_curve"] == out["learning_curve"]


def test_effective_data_from_experiment_checks_sites(experiment: Experiment) -> None:
    result, sites = experiment
    with pytest.raises(ConfigurationError, match="not the experiment's sites"):
        effective_data_from_experiment(result, sites[:2])
