"""Tests for cardiofed.experiments.effective_data."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.experiments.clinical_value import MISSING, effective_claim
from cardiofed.experiments.effective_data import (
    LearningCurveFit,
    fit_learning_curve,
    site_effective_data,
    stratified_subsample,
)
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, ExperimentResult, run_experiment

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


@pytest.fixture(scope="module")
def synthetic() -> tuple[FederatedDataset, ExperimentResult]:
    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.3, eval_size=3000)
    result = run_experiment(data, SimulationConfig.create(rounds=3, seed=1, eval_every=0))
    return data, result


def test_fresh_draws_bracket_the_federated_auc(
        synthetic: tuple[FederatedDataset, ExperimentResult]) -> None:
    data, result = synthetic
    out = site_effective_data(data, result, repeats=2, seed=0)
    assert list(out) == [s.name for s in data.sites]
    for site in data.sites:
        e = out[site.name]
        assert e.method == "fresh draws" and e.own_size == site.n_train
        assert e.target_auc == result.metrics[site.name][FEDERATED]["auc"]
        sizes = [p.size for p in e.curve]
        assert sizes == sorted(sizes) and sizes[0] == max(20, site.n_train // 2)
        if e.lower_bound:  # never reached: the largest draw is the bound
            assert math.isinf(e.n_equivalent) and e.multiple == sizes[-1] / site.n_train
        elif e.upper_bound:
            assert e.n_equivalent == sizes[0]
        else:  # reached between the last two sizes, by interpolation
            assert e.curve[-2].mean_auc < e.target_auc <= e.curve[-1].mean_auc
            assert sizes[-2] <= e.n_equivalent <= sizes[-1]
            assert e.multiple == pytest.approx(e.n_equivalent / site.n_train)
        json.dumps(e.to_dict(), allow_nan=False)
    again = site_effective_data(data, result, repeats=2, seed=0)
    assert [p.aucs for p in again[data.sites[0].name].curve] == [
        p.aucs for p in out[data.sites[0].name].curve]


def test_without_a_sampler_the_curve_uses_the_site_s_own_rows(
        synthetic: tuple[FederatedDataset, ExperimentResult]) -> None:
    data, result = synthetic
    real = dataclasses.replace(data, sampler=None)
    out = site_effective_data(real, result, repeats=2, seed=0)
    for site in real.sites:
        e = out[site.name]
        assert e.method == "own subsamples"
        assert e.curve[-1].size == site.n_train and e.fit is not None
        assert e.extrapolated == (math.isfinite(e.n_equivalent)
                                  and e.n_equivalent > site.n_train)
        assert e.explanation


def test_a_site_without_an_auc_is_not_estimable(
        synthetic: tuple[FederatedDataset, ExperimentResult]) -> None:
    data, result = synthetic
    name = data.sites[0].name
    broken = dataclasses.replace(result, metrics={**result.metrics, name: {
        FEDERATED: {**result.metrics[name][FEDERATED], "auc": math.nan}}})
    e = site_effective_data(data, broken, repeats=1)[name]
    assert math.isnan(e.n_equivalent) and e.curve == ()
    assert effective_claim(e, None) == (MISSING, None)  # no figure, in no summary
    with pytest.raises(ConfigurationError, match="repeats"):
        site_effective_data(data, result, repeats=0)
