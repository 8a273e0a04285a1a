"""Federated survival models against lifelines (and statsmodels) on the pooled rows."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival import (
    absolute_risk,
    breslow_baseline,
    event_time_grid,
    fit_cox,
    kaplan_meier,
    site_counts,
    site_cox_sums,
)
from cardiofed.survival.cox import partial_likelihood, pooled_sums
from cardiofed.survival.kaplan_meier import pooled_counts
from cardiofed.survival.metrics import brier_at, calibration_at, harrell_c, horizon_auc, uno_c

lifelines = pytest.importorskip("lifelines")
TIGHT = {"precision": 1e-12}  # lifelines' own convergence, tighter than its default


def gbsg2() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The German Breast Cancer Study Group 2 trial (Schumacher et al. 1994), shipped
    with lifelines: 686 patients, 299 recurrences or deaths."""
    from lifelines.datasets import load_gbsg2

    df = load_gbsg2()
    x = pd.DataFrame({
        "hormone_therapy": (df.horTh == "yes").astype(float), "age": df.age,
        "postmenopausal": (df.menostat == "Post").astype(float), "tumour_size": df.tsize,
        "grade": df.tgrade.map({"I": 1, "II": 2, "III": 3}).astype(float),
        "positive_nodes": df.pnodes, "progesterone": df.progrec, "oestrogen": df.estrec})
    return (df.time.to_numpy(float), df.cens.to_numpy(float), x.to_numpy(float),
            list(x.columns))


def split(n: int, n_sites: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(n_sites, size=n, p=np.linspace(2, 1, n_sites)
                                              / np.linspace(2, 1, n_sites).sum())


def federated_fit(t, e, x, site, grid, *, stratified=False, ties="efron"):
    center = x.mean(axis=0)  # public: the statistics round's means in a real study
    parts = [(t[site == s], e[site == s], x[site == s]) for s in np.unique(site)]
    fit = fit_cox(lambda b: [site_cox_sums(*p, b, grid, center) for p in parts], x.shape[1],
                  stratified=stratified, ties=ties)
    return fit, parts, center


def lifelines_cox(t, e, x, strata=None):
    frame = pd.DataFrame(x).assign(T=t, E=e)
    if strata is not None:
        frame["site"] = strata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lifelines.CoxPHFitter().fit(frame, "T", "E", fit_options=TIGHT,
                                           strata=None if strata is None else ["site"])


@pytest.mark.parametrize("stratified", [False, True])
def test_federated_cox_equals_lifelines_on_the_pooled_rows(stratified):
    t, e, x, _ = gbsg2()
    site = split(len(t), 4, seed=0)
    grid = event_time_grid(*[(t[site == s], e[site == s]) for s in range(4)])
    fit, _, _ = federated_fit(t, e, x, site, grid, stratified=stratified)
    ref = lifelines_cox(t, e, x, strata=site if stratified else None)
    assert np.abs(fit.beta - ref.params_.to_numpy()).max() < 1e-6
    assert np.abs(fit.se - ref.standard_errors_.to_numpy()).max() < 1e-6
    assert fit.loglik == pytest.approx(ref.log_likelihood_, abs=1e-6)


def test_breslow_ties_equal_statsmodels():
    from statsmodels.duration.hazard_regression import PHReg

    t, e, x, _ = gbsg2()
    t = np.ceil(t / 30.0)  # months: many tied times
    site = split(len(t), 3, seed=1)
    grid = event_time_grid(*[(t[site == s], e[site == s]) for s in range(3)])
    fit, _, _ = federated_fit(t, e, x, site, grid, ties="breslow")
    ref = PHReg(t, x, status=e, ties="breslow").fit()
    assert np.abs(fit.beta - ref.params).max() < 1e-6
    assert np.abs(fit.se - ref.bse).max() < 1e-6


def test_a_coarse_grid_is_the_exact_fit_of_the_coarsened_times():
    """Events carried up to the next grid point, censorings down to the previous one."""
    t, e, x, _ = gbsg2()
    grid = np.arange(180.0, 2700.0, 180.0)  # every 6 months
    site = split(len(t), 4, seed=2)
    fit, _, _ = federated_fit(t, e, x, site, grid)
    up = grid[np.minimum(np.searchsorted(grid, t, side="left"), grid.size - 1)]
    down_at = np.searchsorted(grid, t, side="right") - 1
    on_grid = (e == 1) & (np.searchsorted(grid, t, side="left") < grid.size)
    keep = on_grid | (down_at >= 0)
    coarse = np.where(on_grid, up, grid[np.maximum(down_at, 0)])
    ref = lifelines_cox(coarse[keep], on_grid[keep].astype(float), x[keep])
    assert np.abs(fit.beta - ref.params_.to_numpy()).max() < 1e-6
    km = kaplan_meier(_summed([site_counts(t[site == s], e[site == s], grid)
                               for s in range(4)]))
    ref_km = lifelines.KaplanMeierFitter().fit(coarse[keep], on_grid[keep])
    assert np.abs(km.survival - ref_km.survival_function_at_times(grid).to_numpy()).max() < 1e-12


def test_absolute_risk_equals_lifelines_prediction():
    t, e, x, _ = gbsg2()
    site = split(len(t), 4, seed=0)
    grid = event_time_grid(*[(t[site == s], e[site == s]) for s in range(4)])
    fit, parts, center = federated_fit(t, e, x, site, grid)
    pooled = _summed([site_cox_sums(*p, fit.beta, grid, center) for p in parts])
    risk = absolute_risk(x[:20], fit, breslow_baseline(pooled), grid, 1825.0, center)
    ref = lifelines_cox(t, e, x)
    expected = 1 - ref.predict_survival_function(pd.DataFrame(x[:20]), times=[1825.0])
    assert np.abs(risk - expected.to_numpy().ravel()).max() < 1e-6


def _summed(items):
    return pooled_counts(items) if hasattr(items[0], "censored") else pooled_sums(items)


outcomes = st.integers(min_value=5, max_value=60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 12), min_size=n, max_size=n),   # tied times
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n)))   # site of each patient


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outcomes)
def test_federated_kaplan_meier_equals_pooled_for_any_partition(data):
    times, events, sites = (np.asarray(v) for v in data)
    times = times.astype(float)
    if not events.any():
        return
    grid = np.unique(times[events])
    counts = [site_counts(times[sites == s], events[sites == s], grid)
              for s in np.unique(sites)]
    km = kaplan_meier(_summed(counts))
    ref = lifelines.KaplanMeierFitter().fit(times, events)
    assert np.allclose(km.survival, ref.survival_function_at_times(grid).to_numpy(),
                       atol=1e-12)
    na = lifelines.NelsonAalenFitter(nelson_aalen_smoothing=False).fit(times, events)
    assert np.allclose(km.cumulative_hazard,
                       na.cumulative_hazard_at_times(grid).to_numpy(), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(outcomes, st.integers(0, 2**32 - 1))
def test_sums_do_not_depend_on_how_patients_are_split(data, seed):
    times, events, sites = (np.asarray(v) for v in data)
    if not events.any():
        return
    x = np.random.default_rng(seed).normal(size=(len(times), 2))
    grid = np.unique(times[events]).astype(float)
    beta = np.array([0.3, -0.2])
    pooled = site_cox_sums(times, events, x, beta, grid)
    summed = _summed([site_cox_sums(times[sites == s], events[sites == s], x[sites == s],
                                    beta, grid) for s in np.unique(sites)])
    for a, b in zip(partial_likelihood(pooled), partial_likelihood(summed), strict=True):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_bad_inputs_are_named():
    t, e, x = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1]), np.zeros((3, 1))
    with pytest.raises(ConfigurationError, match="'grid'"):
        site_counts(t, e, [2.0, 1.0])
    with pytest.raises(DataValidationError, match="finite and > 0"):
        site_counts([1.0, -2.0, 3.0], e, [1.0])
    with pytest.raises(DataValidationError, match="0 \\(censored\\) or 1"):
        site_counts(t, [1, 2, 0], [1.0])
    with pytest.raises(DataValidationError, match="impute"):
        site_cox_sums(t, e, [[np.nan], [0.0], [1.0]], [0.0], [1.0])
    with pytest.raises(ConfigurationError, match="'beta'"):
        site_cox_sums(t, e, x, [0.0, 1.0], [1.0])
    with pytest.raises(DataValidationError, match="overflows"):
        site_cox_sums(t, e, [[1e3], [0.0], [1.0]], [1.0], [1.0])
    with pytest.raises(DataValidationError, match="No site has an event"):
        event_time_grid((t, [0, 0, 0]))
    with pytest.raises(ConfigurationError, match="'ties'"):
        fit_cox(lambda b: [], 1, ties="exact")
    grid = np.array([1.0, 3.0])
    with pytest.raises(DataValidationError, match="singular"):  # a constant covariate
        fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid)], 1)
    separated = np.array([[1.0], [0.0], [1.0]])  # every event has x = 1: beta runs away
    with pytest.raises(DataValidationError, match="did not converge|singular"):
        fit_cox(lambda b: [site_cox_sums(t, e, separated, b, grid)], 1, max_iter=30)


# -- metrics -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(outcomes, st.integers(0, 2**32 - 1))
def test_harrell_c_equals_lifelines_with_tied_times_and_risks(data, seed):
    times, events, _ = (np.asarray(v) for v in data)
    risk = np.random.default_rng(seed).integers(0, 5, times.size).astype(float)
    ours = harrell_c(times.astype(float), events, risk)
    try:
        ref = lifelines.utils.concordance_index(times, -risk, events)
    except ZeroDivisionError:  # lifelines: no comparable pair
        assert np.isnan(ours)
        return
    assert ours == pytest.approx(ref, abs=1e-12)


def test_without_censoring_the_weighted_metrics_are_the_plain_ones():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    t, r = rng.exponential(10.0, 400), rng.random(400)
    e = np.ones(400, dtype=bool)
    assert horizon_auc(t, e, r, 5.0) == pytest.approx(roc_auc_score(t <= 5.0, r), abs=1e-12)
    assert brier_at(t, e, r, 5.0) == pytest.approx(np.mean(((t <= 5.0) - r) ** 2), abs=1e-12)
    assert uno_c(t, e, r, 1e9) == pytest.approx(harrell_c(t, e, r), abs=1e-12)


def test_true_risks_are_calibrated_under_heavy_censoring():
    """A statistical check (seeded): exponential times with known hazard, half censored;
    the true 10-year risks' slope and calibration-in-the-large intervals cover 1 and 0,
    while risks doubled in log hazard are caught."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=6000)
    hazard = 0.05 * np.exp(x)
    event_time, censor_time = rng.exponential(1 / hazard), rng.exponential(15.0, x.size)
    t, e = np.minimum(event_time, censor_time), event_time <= censor_time
    assert 0.3 < e.mean() < 0.7
    truth = calibration_at(t, e, -np.expm1(-hazard * 10), 10.0)
    assert truth.slope_interval[0] < 1 < truth.slope_interval[1]
    assert truth.citl_interval[0] < 0 < truth.citl_interval[1]
    too_spread = calibration_at(t, e, -np.expm1(-0.05 * np.exp(2 * x) * 10), 10.0)
    assert too_spread.slope_interval[1] < 0.7
    assert len(truth.groups) == 10
    assert all(g["low"] <= g["observed"] <= g["high"] for g in truth.groups)
    assert harrell_c(t, e, hazard) > 0.7 and uno_c(t, e, hazard, 10.0) > 0.7


def test_metric_inputs_are_checked():
    t, e = np.array([1.0, 2.0]), np.array([1, 0])
    with pytest.raises(DataValidationError, match="one finite score"):
        harrell_c(t, e, [0.1])
    with pytest.raises(DataValidationError, match="1 values that are not"):
        brier_at(t, e, [0.1, 1.5], 1.0)
    with pytest.raises(ConfigurationError, match="'horizon'"):
        uno_c(t, e, [0.1, 0.2], -1.0)
    with pytest.raises(ConfigurationError, match="'groups'"):
        calibration_at(t, e, [0.1, 0.2], 1.0, groups=0)


# -- a survival federation in simulation -------------------------------------------
def test_a_synthetic_federation_fits_the_pooled_cox_model():
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.simulation.survival import fit_federated_cox, inverse_variance_meta

    data = synthetic_federation(n_sites=4, survival=True, size_scale=0.3, seed=5)
    model = fit_federated_cox(data)
    x = np.concatenate([model.preprocessor.transform(s.x_train) for s in data.sites])
    t = np.concatenate([s.time_train for s in data.sites])
    e = np.concatenate([s.y_train for s in data.sites])
    ref = lifelines_cox(t, e, x)
    assert np.abs(model.fit.beta - ref.params_.to_numpy()).max() < 1e-6
    site = data.sites[0]
    expected = 1 - ref.predict_survival_function(
        pd.DataFrame(model.preprocessor.transform(site.x_test[:10])), times=[10.0])
    assert np.abs(model.risk(site.x_test[:10], 10.0)
                  - expected.to_numpy().ravel()).max() < 1e-6

    stratified = fit_federated_cox(data, stratified=True)
    risks = {s.name: stratified.risk(site.x_test[:5], 10.0, s.name) for s in data.sites}
    assert len({tuple(np.round(r, 9)) for r in risks.values()}) == len(data.sites)
    with pytest.raises(ConfigurationError, match="own baseline"):
        stratified.risk(site.x_test[:5], 10.0)

    meta, dropped = inverse_variance_meta(model, data)
    assert meta.fit.beta.shape == model.fit.beta.shape and len(dropped) < len(data.sites)


def test_a_federation_without_follow_up_is_refused():
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.simulation.survival import fit_federated_cox

    with pytest.raises(DataValidationError, match="follow_up"):
        fit_federated_cox(synthetic_federation(n_sites=3, size_scale=0.2))


def test_a_site_whose_events_are_noise_takes_no_part():
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.simulation.survival import fit_federated_cox

    data = synthetic_federation(n_sites=6, seed=2, survival=True, size_scale=0.5)
    model = fit_federated_cox(data, label_quality=True, form="log", stratified=True)
    assert list(model.excluded) == ["tier2_02"]  # the synthetic noisy-label site
    assert "calibration slope" in model.excluded["tier2_02"]
    assert "tier2_02" not in model.baselines
    with pytest.raises(ConfigurationError, match="took no part"):
        model.risk(data.sites[0].x_test, 10.0, "tier2_02")


@settings(max_examples=80, deadline=None)
@given(outcomes, st.integers(0, 2**32 - 1), st.integers(2, 12))
def test_uno_c_equals_its_definition_pair_by_pair(data, seed, horizon):
    """Uno et al. 2011, eq. (4) without a truncation beyond the horizon: cases are events
    before the horizon, weighted by G(t_i-)^-2; pairs need t_i < t_j strictly."""
    from cardiofed.survival.metrics import censoring_survival

    times, events, _ = (np.asarray(v) for v in data)
    t, e = times.astype(float), events.astype(bool)
    r = np.random.default_rng(seed).integers(0, 4, t.size).astype(float)
    g = censoring_survival(t, e, t, before=True)
    num = den = 0.0
    for i in range(t.size):
        if not (e[i] and t[i] < horizon and g[i] > 0):
            continue
        for j in range(t.size):
            if t[i] < t[j]:
                den += g[i] ** -2
                num += g[i] ** -2 * (1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0)
    ours = uno_c(t, e, r, float(horizon))
    assert (np.isnan(ours) and den == 0) or ours == pytest.approx(num / den, abs=1e-12)


# -- causal effects on survival ------------------------------------------------------
def test_case_weights_are_copies_of_rows():
    """An integer weight k is the row repeated k times (Breslow's ties), in the Cox sums
    and in the Kaplan-Meier counts."""
    rng = np.random.default_rng(11)
    t = rng.integers(1, 15, 80).astype(float)
    e = rng.random(80) < 0.6
    x = rng.normal(size=(80, 2))
    k = rng.integers(0, 4, 80)
    grid = np.unique(t[e])
    repeated = np.repeat(np.arange(80), k)
    weighted = fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid, weights=k)], 2,
                       ties="breslow")
    copied = fit_cox(lambda b: [site_cox_sums(t[repeated], e[repeated], x[repeated], b,
                                              grid)], 2, ties="breslow")
    assert np.allclose(weighted.beta, copied.beta, atol=1e-10)
    assert np.allclose(kaplan_meier(site_counts(t, e, grid, k)).survival,
                       kaplan_meier(site_counts(t[repeated], e[repeated], grid)).survival)
    with pytest.raises(ConfigurationError, match="breslow"):
        fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid, weights=k * 0.5)], 2)
    with pytest.raises(DataValidationError, match="weights"):
        site_counts(t, e, grid, -k)


def test_a_survival_effect_is_the_pooled_one_and_its_weighted_curves_are_lifelines():
    pytest.importorskip("causaldata")
    from cardiofed.causal.propensity import fit_propensity, sigmoid
    from cardiofed.causal.sources import nhefs_survival_sites
    from cardiofed.causal.survival import SurvivalSite, survival_effect

    sites = nhefs_survival_sites(4, seed=0)
    effect = survival_effect(sites, horizon=120.0, resamples=20, seed=1)
    pooled = SurvivalSite("all", *(np.concatenate([getattr(s, f) for s in sites])
                                   for f in ("x", "treated", "time", "event")))
    alone = survival_effect([pooled], horizon=120.0, resamples=0)
    assert effect.difference == pytest.approx(alone.difference, abs=1e-10)
    assert effect.hazard_ratio == pytest.approx(alone.hazard_ratio, abs=1e-10)
    assert effect.difference_interval[0] < effect.difference < effect.difference_interval[1]
    assert effect.resamples == 20 and np.isnan(alone.difference_interval[0])
    again = survival_effect(sites, horizon=120.0, resamples=20, seed=1)
    assert again.difference_interval == effect.difference_interval

    model = fit_propensity([pooled.x], [pooled.treated])
    score = sigmoid(model.logit(pooled.x))
    w = np.where(pooled.treated == 1, 1 / score, 1 / (1 - score))
    for arm, risk in ((1, effect.risk_treated), (0, effect.risk_control)):
        mine = pooled.treated == arm
        with warnings.catch_warnings():  # lifelines warns that weights bias variances
            warnings.simplefilter("ignore")
            curve = lifelines.KaplanMeierFitter().fit(pooled.time[mine], pooled.event[mine],
                                                      weights=w[mine])
        assert risk == pytest.approx(1 - curve.survival_function_at_times(120.0).iloc[0],
                                     abs=1e-10)
    with pytest.raises(ConfigurationError, match="'horizon'"):
        survival_effect(sites, horizon=0.0)
    with pytest.raises(ConfigurationError, match="estimand"):
        survival_effect(sites, horizon=120.0, method="matching")  # type: ignore[arg-type]


# -- private Kaplan-Meier counts -----------------------------------------------------
def _site_privacy(n: int):  # type: ignore[no-untyped-def]
    from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
    from cardiofed.privacy.site_privacy import SitePrivacy

    ledger = PrivacyLedger(site="clinic", budget=SiteBudget(epsilon_max=1.0, delta=1e-5),
                           n_records=n)
    return SitePrivacy(ledger=ledger, study="km")


def test_private_counts_are_charged_first_and_noised_from_a_secret_source():
    from cardiofed.exceptions import PrivacyBudgetExceeded
    from cardiofed.survival.private import private_kaplan_meier, private_site_counts

    rng = np.random.default_rng(0)
    t, e = rng.exponential(8.0, 3000) + 0.01, rng.random(3000) < 0.7
    grid = np.arange(1.0, 13.0)  # public: months, fixed in advance
    privacy = _site_privacy(3000)
    first, sigma = private_site_counts(t, e, grid, privacy)
    spent = privacy.ledger.spent()
    assert 0 < spent <= 0.1 + 1e-9  # the statistics share of epsilon 1
    second, _ = private_site_counts(t, e, grid, privacy)
    assert privacy.ledger.spent() > spent  # every release is charged
    assert not np.allclose(first.events, second.events)  # no seed anyone can replay
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(50):
            private_site_counts(t, e, grid, privacy)
    exact = site_counts(t, e, grid)
    draws = np.array([private_site_counts(t, e, grid, _site_privacy(3000))[0].events
                      - exact.events for _ in range(300)])
    assert abs(draws.mean()) < 4 * sigma / np.sqrt(draws.size)  # unbiased
    assert draws.std() == pytest.approx(sigma, rel=0.1)  # the charged noise
    curve = private_kaplan_meier(first)
    # noise SD 34 per cell against ~100-300 events a month: 300 draws erred at most 0.099
    assert np.abs(curve.survival - kaplan_meier(exact).survival).max() < 0.15


def test_sums_that_would_overflow_are_refused_by_name():
    """x beta within 700 but x near 1e6: the second-moment sums would be inf."""
    x = np.array([[1e6], [0.0]])
    with pytest.raises(DataValidationError, match=re.escape(
            "The sums of exp(x beta) x x' overflow at these coefficients and covariates")):
        site_cox_sums([1.0, 2.0], [True, False], x, [6.9e-4], [1.0, 5.0])


def test_secure_counts_carry_one_releases_noise_and_charge_every_site_once():
    """The secure sum's pooled counts are the exact ones plus the noise of one release
    (not one per site: sqrt(n) times less than per-site private counts); each site's
    ledger holds one statistics release at the sum's multiplier; too few sites with
    budget release nothing."""
    from cardiofed.exceptions import PrivacyBudgetExceeded
    from cardiofed.simulation.secure_statistics import secure_kaplan_meier

    rng = np.random.default_rng(1)
    grid = np.arange(1.0, 13.0)
    sites = {f"s{k}": (rng.exponential(8.0, 500) + 0.01, rng.random(500) < 0.7)
             for k in range(6)}
    exact = pooled_counts([site_counts(t, e, grid) for t, e in sites.values()])
    draws, spent, errors = [], [], []
    for _ in range(60):
        privacy = {name: _site_privacy(500) for name in sites}
        curve, counts = secure_kaplan_meier(sites, grid, privacy)
        draws.append(np.concatenate([counts.events - exact.events,
                                     counts.censored - exact.censored]))
        spent.append([p.ledger.spent() for p in privacy.values()])
        errors.append(np.abs(curve.survival - kaplan_meier(exact).survival).max())
    entries = [e for e in privacy["s0"].ledger.entries if e.get("kind") == "statistics"]
    assert len(entries) == 1 and entries[0].get("secure_sum")
    multiplier = float(entries[0]["noise_multiplier"])
    noise = np.concatenate(draws)
    assert abs(noise.mean()) < 4 * multiplier / np.sqrt(noise.size)  # unbiased
    # All six sites' shares: sqrt(6 / 5) of the one release's noise (5 it may not lose),
    # against sqrt(6) times it were each site to add its own.
    assert noise.std() == pytest.approx(multiplier * np.sqrt(6 / 5), rel=0.1)
    assert all(0 < x <= 0.1 + 1e-9 for row in spent for x in row)
    # the curve's largest error in the middle run: about 0.045 (per-site noise: about 0.1)
    assert np.median(errors) < 0.07
    broke = {name: _site_privacy(500) for name in sites}
    for name in list(sites)[:2]:
        with pytest.raises(PrivacyBudgetExceeded):
            for _ in range(50):
                broke[name].charge_release("statistics", "spend it")
    with pytest.raises(PrivacyBudgetExceeded, match="4 sites have budget for the survival "
                                                     "counts' sum, fewer than the 5"):
        secure_kaplan_meier(sites, grid, broke)


# -- adversarial inputs: a clear refusal or an answer, never another exception --------
finite = st.floats(-1e6, 1e6, allow_nan=False)
anything = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.floats(0.01, 50), anything), min_size=n, max_size=n),
    st.lists(st.sampled_from([0, 1, 2, -1]), min_size=n, max_size=n),
    st.lists(st.lists(st.one_of(finite, anything), min_size=2, max_size=2), min_size=n,
             max_size=n),
    st.lists(st.one_of(finite, anything), min_size=2, max_size=2))))
def test_any_site_input_is_summed_or_refused_by_name(data):
    times, events, x, beta = data
    try:
        sums = site_cox_sums(times, events, x, beta, [1.0, 5.0, 20.0])
    except (DataValidationError, ConfigurationError) as exc:
        assert str(exc)
        return
    for value in sums.__dict__.values():
        assert np.isfinite(value).all()


@settings(max_examples=60, deadline=None)
@given(outcomes, st.lists(st.one_of(st.floats(0, 1), anything), min_size=60, max_size=60),
       st.floats(0.5, 15))
def test_any_risks_are_judged_or_refused_by_name(data, risks, horizon):
    times, events, _ = (np.asarray(v) for v in data)
    r = np.asarray(risks[:times.size])
    try:
        cal = calibration_at(times.astype(float), events, r, horizon)
        c = uno_c(times.astype(float), events, r, horizon)
        b = brier_at(times.astype(float), events, r, horizon)
    except DataValidationError as exc:
        assert "risk must hold one probability in [0, 1]" in str(exc)  # calibration
        assert not (np.isfinite(r) & (r >= 0) & (r <= 1)).all()
        return
    assert 0.0 <= cal.observed <= 1.0 and (np.isnan(c) or 0.0 <= c <= 1.0)
    assert np.isnan(b) or b >= 0.0


def test_a_site_is_judged_on_uno_c_and_calibration_with_intervals():
    from cardiofed.experiments.survival import assess_at

    rng = np.random.default_rng(5)
    x = rng.normal(size=4000) * 1.5
    hazard = 0.04 * np.exp(x)
    event_time, censor_time = rng.exponential(1 / hazard), rng.exponential(20.0, x.size)
    t, e = np.minimum(event_time, censor_time), event_time <= censor_time
    truth = assess_at(t, e, -np.expm1(-hazard * 10), 10.0, resamples=100)
    low, high = truth["uno_c_ci"]
    assert 0.7 < low < truth["uno_c"] < high and truth["verdict"] == "acceptable"
    noise = assess_at(t, e, rng.uniform(0.01, 0.6, x.size), 10.0, resamples=100)
    assert noise["uno_c_ci"][1] < 0.7 and noise["verdict"] == "not acceptable"
    assert any("Uno's C" in reason for reason in noise["reasons"])
    assert assess_at(t, e, -np.expm1(-hazard * 10), 10.0, resamples=100) == truth  # seeded


def test_pooling_and_fitting_refuse_by_name():
    from cardiofed.survival.cox import baseline_at

    with pytest.raises(ValueError, match="at least one site"):
        pooled_counts([])
    with pytest.raises(DataValidationError, match="at least one site"):
        pooled_sums([])
    a = site_counts([1.0, 2.0], [1, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same grid"):
        pooled_counts([a, site_counts([1.0, 2.0], [1, 0], [1.0, 3.0])])
    with pytest.raises(ConfigurationError, match="'max_iter'"):
        fit_cox(lambda b: [], 1, max_iter=0)
    with pytest.raises(ConfigurationError, match="'horizon'"):
        baseline_at(np.array([0.1]), [1.0], -2.0)
    assert baseline_at(np.array([0.1, 0.3]), [1.0, 2.0], 0.5) == 0.0


def test_a_survival_effect_refuses_bad_settings_by_name():
    from cardiofed.causal.survival import SurvivalSite, survival_effect

    x, t = np.zeros((4, 1)), np.array([0, 1, 0, 1])
    with pytest.raises(DataValidationError, match="treatment must be 0/1"):
        SurvivalSite("s", x, np.array([0, 2, 0, 1]), np.ones(4), t)
    with pytest.raises(DataValidationError, match="one row per patient"):
        SurvivalSite("s", x, t, np.ones(3), t)
    site = SurvivalSite("s", x, t, np.ones(4), t)
    with pytest.raises(ConfigurationError, match="'resamples'"):
        survival_effect([site], horizon=1.0, resamples=-1)
    with pytest.raises(DataValidationError, match="at least one site"):
        survival_effect([], horizon=1.0)
