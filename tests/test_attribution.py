"""Federated causal attribution: propensity, estimators, balance, E-value, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from cardiofed.causal.combine import run_attribution
from cardiofed.causal.design import design_truth, synthetic_intervention
from cardiofed.causal.estimators import (
    e_value,
    e_value_limit,
    match_within_site,
)
from cardiofed.causal.propensity import fit_propensity
from cardiofed.causal.sources import synthetic_sites
from cardiofed.causal.study import SiteArrays
from cardiofed.cli import app
from cardiofed.exceptions import ConfigurationError, DataValidationError


@pytest.fixture(scope="module")
def federation() -> tuple[list[SiteArrays], list[str]]:
    return synthetic_sites(12, seed=3)


def _pooled(sites: list[SiteArrays]) -> SiteArrays:
    return SiteArrays("pooled", np.vstack([s.x for s in sites]),
                      np.concatenate([s.treated for s in sites]),
                      np.concatenate([s.outcome for s in sites]))


def test_federated_propensity_is_the_pooled_maximum_likelihood_fit(federation) -> None:  # type: ignore[no-untyped-def]
    sites, _ = federation
    model = fit_propensity([s.x for s in sites], [s.treated for s in sites])
    pooled = _pooled(sites)
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(
        model.standardiser.design(pooled.x)[:, 1:], pooled.treated)
    np.testing.assert_allclose(model.score(pooled.x),
                               reference.predict_proba(model.standardiser.design(
                                   pooled.x)[:, 1:])[:, 1], atol=1e-6)
    assert model.iterations < 15


def test_estimates_do_not_depend_on_how_rows_are_split_into_sites(federation) -> None:  # type: ignore[no-untyped-def]
    sites, covariates = federation
    pooled = _pooled(sites)
    for estimand, methods in (("ATE", ["iptw", "overlap"]), ("ATT", ["iptw"])):
        federated = run_attribution(sites, covariates, estimand=estimand, methods=methods)
        one_site = run_attribution([pooled], covariates, estimand=estimand, methods=methods)
        for m in methods:
            a, b = federated.effects[m], one_site.effects[m]
            assert a.risk_difference == pytest.approx(b.risk_difference, abs=1e-9)
            assert a.rd_low == pytest.approx(b.rd_low, abs=1e-9)  # the sandwich adds up too
            assert a.rr_high == pytest.approx(b.rr_high, rel=1e-9)


def test_iptw_by_hand(federation) -> None:  # type: ignore[no-untyped-def]
    sites, covariates = federation
    pooled = _pooled(sites)
    e = fit_propensity([pooled.x], [pooled.treated]).score(pooled.x)
    t, y = pooled.treated, pooled.outcome
    mu1 = np.sum(t * y / e) / np.sum(t / e)
    mu0 = np.sum((1 - t) * y / (1 - e)) / np.sum((1 - t) / (1 - e))
    effect = run_attribution(sites, covariates, estimand="ATE", methods=["iptw"]).effects["iptw"]
    assert effect.risk_difference == pytest.approx(mu1 - mu0, abs=1e-12)
    assert effect.risk_ratio == pytest.approx(mu1 / mu0, rel=1e-12)


def test_weighting_balances_and_overlap_weights_balance_exactly(federation) -> None:  # type: ignore[no-untyped-def]
    sites, covariates = federation
    result = run_attribution(sites, covariates, estimand="ATT")
    assert np.max(np.abs(result.balance["before"])) > 0.3  # the design is confounded
    for method in ("iptw", "overlap", "matching"):
        assert np.max(np.abs(result.balance[method])) < 0.1, method
    np.testing.assert_allclose(result.balance["overlap"], 0, atol=1e-8)  # a known property


def test_matching_is_one_to_one_within_the_caliper() -> None:
    rng = np.random.default_rng(0)
    logit = rng.normal(size=400)
    t = (rng.random(400) < 0.3).astype(int)
    pairs = match_within_site(logit, t, 0.05, np.random.default_rng(1))
    assert len(pairs) > 50
    assert len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))
    assert np.all(t[pairs[:, 0]] == 1) and np.all(t[pairs[:, 1]] == 0)
    assert np.all(np.abs(logit[pairs[:, 0]] - logit[pairs[:, 1]]) <= 0.05)


def test_intervals_cover_the_true_effect() -> None:
    """A statistical check (the bench runs 200 replications): 40 replications of the
    design, IPTW for the ATE; coverage below 0.8 would be wrong beyond chance."""
    truth = design_truth(draws=10)
    covered = 0
    for r in range(40):
        sites, covariates = synthetic_sites(12, seed=100 + r)
        e = run_attribution(sites, covariates, estimand="ATE", methods=["iptw"]).effects["iptw"]
        covered += e.rd_low <= truth.ate_rd <= e.rd_high
    assert covered / 40 >= 0.8
    assert truth.ate_rd < 0 and truth.att_rr < 1  # the intervention lowers risk


def test_e_value_golden() -> None:
    assert e_value(0.8) == pytest.approx(1.25 + np.sqrt(1.25 * 0.25))
    assert e_value(2.0) == pytest.approx(2 + np.sqrt(2))
    assert e_value_limit(0.7, 0.9) == pytest.approx(e_value(0.9))
    assert e_value_limit(0.7, 1.1) == 1.0


def test_settings_are_validated(federation) -> None:  # type: ignore[no-untyped-def]
    sites, covariates = federation
    with pytest.raises(ConfigurationError, match="matching estimates the ATT"):
        run_attribution(sites, covariates, estimand="ATE", methods=["matching"])
    with pytest.raises(ConfigurationError, match="methods.0: Input should be"):
        run_attribution(sites, covariates, methods=["regression"])
    with pytest.raises(ConfigurationError, match=r"trim: Input should be less than 0.5 \(got 0.6\)"):  # noqa: E501
        run_attribution(sites, covariates, trim=0.6)


def test_attribution_cli_writes_its_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["attribution", "--sites", "6", "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "matching" in result.output and "E-value" in result.output
    for name in ("attribution.json", "attribution.html", "love_plot.png", "overlap.png"):
        assert (tmp_path / name).stat().st_size > 0
    bad = CliRunner().invoke(app, ["attribution", "--estimand", "ATE", "--method",
                                   "matching", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "matching estimates the ATT" in bad.output


def test_bad_data_is_refused_by_name() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    with pytest.raises(DataValidationError, match="constant across every site"):
        fit_propensity([np.column_stack([x, np.ones(200)])], [rng.integers(0, 2, 200)])
    separated = (x[:, 0] > 0).astype(int)  # treatment decided by a covariate: no overlap
    with pytest.raises(DataValidationError, match="perfectly predicted by the covariates"):
        fit_propensity([x], [separated])
    with pytest.raises(ConfigurationError, match="hazard_ratio must be > 0"):
        synthetic_intervention(hazard_ratio=0.0)


def test_the_private_schedule_without_noise_gives_the_exact_estimate(federation) -> None:  # type: ignore[no-untyped-def]
    """Clipping to the schema's ranges and in norm, and 6 fixed Newton steps, change the
    estimate by little on this design (a golden tolerance, not a privacy claim)."""
    sites, covariates = federation
    exact = run_attribution(sites, covariates, estimand="ATE", methods=["overlap", "iptw"],
                            trim=0.05)
    private = run_attribution(sites, covariates, estimand="ATE", methods=["overlap", "iptw"],
                              trim=0.05, private=True)
    for method in ("overlap", "iptw"):
        assert private.effects[method].risk_difference == pytest.approx(
            exact.effects[method].risk_difference, abs=2e-3)
    assert private.propensity.iterations == 6


def test_private_noise_comes_from_a_secret_source_and_the_interval_covers_it() -> None:
    """Two runs with the same seed differ (nothing to replay); over 60 replications at
    epsilon 10 per site, the overlap-weights interval covers the truth at least 0.8 of
    the time. Measured coverage here is about 0.94 (0.95 over 200 fresh draws), so a
    correct interval fails this with probability about 5e-5 (30 replications failed
    about 1 run in 300); one covering 0.7 of the time passes with probability 0.06."""
    truth = design_truth(draws=10)
    sites, covariates = synthetic_sites(12, seed=7)
    runs = [run_attribution(sites, covariates, estimand="ATE", methods=["overlap"],
                            epsilon=10.0).effects["overlap"].risk_difference for _ in range(2)]
    assert runs[0] != runs[1]
    covered = 0
    for r in range(60):
        sites, covariates = synthetic_sites(12, seed=300 + r)
        e = run_attribution(sites, covariates, estimand="ATE", methods=["overlap"],
                            epsilon=10.0).effects["overlap"]
        covered += e.rd_low <= truth.ato_rd <= e.rd_high
    assert covered / 60 >= 0.8


@pytest.mark.parametrize("info", [np.diag([1e-6, 1.0, 1.0]), -np.eye(3),
                                  np.array([[1.0, 0.99999, 0], [0.99999, 1.0, 0], [0, 0, 1.0]])])
def test_a_private_newton_step_moves_no_coefficient_by_more_than_one(info) -> None:  # type: ignore[no-untyped-def]
    # Noisy information can be near-singular or indefinite: one step sent the
    # coefficients into the hundreds, past what the nodes accept, and the study stopped.
    from cardiofed.causal.combine import next_state
    from cardiofed.causal.study import AttributionPlan

    plan = AttributionPlan.model_validate({"treatment": "current_smoker", "covariates": ["age"],
                                           "private": True,
                                           "methods": ["overlap"], "trim": 0.05})
    state = {"step": "newton", "iterations": 0,
             "inputs": {"mean": [0.0, 0.0], "sd": [1.0, 1.0], "beta": [0.5, -0.5, 0.0]}}
    totals = {"grad": np.array([50.0, -3.0, 7.0]), "info": info}
    moved = np.abs(np.array(next_state(plan, state, totals, 2)["inputs"]["beta"])
                   - np.array([0.5, -0.5, 0.0]))
    assert 0 < moved.max() <= 1.0 + 1e-12
    exact = next_state(plan.model_copy(update={"private": False}), state,
                       {"grad": np.array([0.5, 0.0, 0.0]), "info": np.eye(3)}, 2)
    assert exact["inputs"]["beta"] == pytest.approx([1.0, -0.5, 0.0])  # undamped


@settings(max_examples=60, deadline=None)
@example(grad=[1e6, 0.0, 0.0], info=[1e-320, 0, 0, 0, 1.0, 0, 0, 0, 1.0])  # overflows
@given(grad=st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
       info=st.lists(st.floats(-1e6, 1e6), min_size=9, max_size=9))
def test_any_noisy_information_moves_a_private_coefficient_by_at_most_one(
        grad: list[float], info: list[float]) -> None:
    # Whatever finite sums the noise yields: a finite step of at most 1 (a solve that
    # overflowed once gave NaN coefficients), or a refusal that names the singular
    # information.
    from cardiofed.causal.combine import next_state
    from cardiofed.causal.study import AttributionPlan

    plan = AttributionPlan.model_validate({"treatment": "current_smoker", "covariates": ["age"],
                                           "private": True, "methods": ["overlap"],
                                           "trim": 0.05})
    state = {"step": "newton", "iterations": 0,
             "inputs": {"mean": [0.0, 0.0], "sd": [1.0, 1.0], "beta": [0.0, 0.0, 0.0]}}
    try:
        beta = next_state(plan, state, {"grad": np.array(grad),
                                        "info": np.array(info).reshape(3, 3)}, 2)["inputs"]["beta"]
    except DataValidationError as exc:
        assert "information matrix is singular" in str(exc)
        return
    assert np.all(np.isfinite(beta)) and np.max(np.abs(beta)) <= 1.0 + 1e-9


def test_each_patients_part_in_a_private_release_is_within_its_blocks_bound() -> None:
    """The sensitivity the noise is calibrated to: for single patients (drawn from the
    design and at the ranges' corners), at coefficients and means a coordinator might
    send (large, or means outside [0, 1]), every block's part is within its bound."""
    from cardiofed.causal.study import AttributionPlan, release_blocks, site_step
    from cardiofed.data.dataset import feature_ranges_for

    sites, covariates = synthetic_sites(12, seed=2)
    ranges = feature_ranges_for(covariates)
    rng = np.random.default_rng(0)
    low, high = np.array(ranges).T
    rows = [sites[0].x[i] for i in range(15)] + [
        np.where(rng.random(len(low)) < 0.5, low, high) * 1.5 for _ in range(15)]
    k = len(covariates)
    for estimand, methods in (("ATE", ["iptw", "overlap"]), ("ATT", ["iptw"])):
        plan = AttributionPlan(covariates=covariates, estimand=estimand, methods=methods,
                               trim=0.05, private=True)
        for trial in range(8):
            inputs = {"mean": (low + (high - low) * rng.random(k)).tolist(),
                      "sd": ((high - low) * rng.uniform(0.01, 1, k)).tolist(),
                      "beta": rng.normal(0, 3 if trial % 2 else 0.3, k + 1).tolist(),
                      "means": {m: rng.uniform(-0.5, 1.5, 2).tolist() for m in methods}}
            for step in ("moments", "newton", "estimate", "sandwich"):
                state = {"step": step, "inputs": inputs, "columns": covariates,
                         "iterations": 0}
                blocks = release_blocks(plan, step, k, inputs["means"])
                for x in rows:
                    for t in (0, 1):
                        for y in (0, 1):
                            one = SiteArrays("one", x[None, :], np.array([t]), np.array([y]))
                            part = site_step(plan, state, one, 0, ranges)
                            for block, (names, bound) in blocks.items():
                                norm = np.sqrt(sum(np.sum(part[n] ** 2) for n in names))
                                assert norm <= bound * (1 + 1e-9), (step, block, norm, bound)


def test_the_published_effect_schema_is_the_estimators_effect_and_its_e_values() -> None:
    """The wire schema (a published contract) and the estimator's result are kept apart on
    purpose, and held to the same fields here so that neither drifts."""
    import dataclasses

    from cardiofed.causal.estimators import Effect
    from cardiofed.protocol.schemas import EffectEstimate

    assert list(EffectEstimate.model_fields) == [
        *(f.name for f in dataclasses.fields(Effect)), "e_value", "e_value_ci"]


def test_a_continuous_outcome_reproduces_the_published_nhefs_effect() -> None:
    """Hernan & Robins, Causal Inference: What If (2020), section 12.2: quitting smoking
    adds 3.4 kg (95% CI 2.4 to 4.5). Federated over 4 sites = statsmodels on the pooled
    rows (logistic propensity, then weighted least squares)."""
    pytest.importorskip("causaldata")
    import statsmodels.api as sm

    from cardiofed.causal.sources import NHEFS_PUBLISHED, nhefs_sites

    sites, covariates = nhefs_sites(4, seed=0)
    result = run_attribution(sites, covariates, estimand="ATE", methods=["iptw"],
                             outcome="continuous")
    effect = result.effects["iptw"]
    pooled = _pooled(sites)
    z = sm.add_constant(pooled.x)
    score = sm.GLM(pooled.treated, z, family=sm.families.Binomial()).fit().predict(z)
    w = np.where(pooled.treated == 1, 1 / score, 1 / (1 - score))
    reference = sm.WLS(pooled.outcome, sm.add_constant(pooled.treated.astype(float)),
                       weights=w).fit()
    assert effect.risk_difference == pytest.approx(reference.params[1], abs=1e-6)
    assert NHEFS_PUBLISHED["low"] < effect.risk_difference < NHEFS_PUBLISHED["high"]
    assert round(effect.risk_difference, 1) == NHEFS_PUBLISHED["effect"]
    assert effect.rd_low < effect.risk_difference < effect.rd_high
    assert np.isnan(effect.risk_ratio) and np.isnan(result.e_values("iptw")[0])
    assert any("difference in means" in note for note in result.notes)


def test_a_continuous_outcome_is_checked_and_never_private(federation) -> None:  # type: ignore[no-untyped-def]
    sites, covariates = federation
    weights = [SiteArrays(s.name, s.x, s.treated, 70.0 + 5 * s.outcome) for s in sites]
    with pytest.raises(DataValidationError, match="continuous"):
        run_attribution(weights, covariates)  # a binary plan refuses a measured outcome
    shifted = run_attribution(weights, covariates, outcome="continuous", methods=["iptw"])
    binary = run_attribution(sites, covariates, methods=["iptw"])
    assert shifted.effects["iptw"].risk_difference == pytest.approx(
        5 * binary.effects["iptw"].risk_difference, rel=1e-9)
    broken = [SiteArrays(s.name, s.x, s.treated, np.full(len(s.outcome), np.nan))
              for s in sites]
    with pytest.raises(DataValidationError, match="finite"):
        run_attribution(broken, covariates, outcome="continuous")
    with pytest.raises(ConfigurationError, match="continuous outcome is not available"):
        run_attribution(weights, covariates, outcome="continuous", epsilon=1.0,
                        methods=["overlap"])


SURVEY = Path(__file__).resolve().parents[1] / "examples" / "survey"


def test_attribution_cli_runs_on_a_researchers_own_exports(tmp_path: Path) -> None:
    from cardiofed.causal.sources import export_site, export_sites
    from cardiofed.data.study_features import StudyFeatures

    exports = ["--csv", str(SURVEY / "site_a.csv"), "--mapping", str(SURVEY / "site_a.toml"),
               "--csv", str(SURVEY / "site_b.csv"), "--mapping", str(SURVEY / "site_b.toml"),
               "--features", str(SURVEY / "features.toml")]
    analysis = ["--treatment", "current_smoker", "--covariate", "age", "--covariate", "sex",
                "--estimand", "ATE", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["attribution", *exports, *analysis],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 exports (current_smoker)" in result.output
    saved = (tmp_path / "attribution.json").read_text()
    catalogue = StudyFeatures.from_toml(SURVEY / "features.toml").catalogue()
    sites, columns = export_sites([SURVEY / "site_a.csv", SURVEY / "site_b.csv"],
                                  [SURVEY / "site_a.toml", SURVEY / "site_b.toml"],
                                  treatment="current_smoker", covariates=["age", "sex"],
                                  build=export_site, catalogue=catalogue)
    expected = run_attribution(sites, columns, estimand="ATE")
    assert f"{expected.effects['iptw'].risk_difference!r}"[:10] in saved
    refusals = {
        "needs --treatment": ["attribution", "--csv", str(SURVEY / "site_a.csv")],
        "go with --csv": ["attribution", "--treatment", "current_smoker"],
        "one mapping per export": ["attribution", *exports[:6], *exports[8:], *analysis],
        "must be a 0/1 feature": ["attribution", *exports, "--treatment", "age",
                                  "--covariate", "sex", "--out", str(tmp_path)],
        "does not map": ["attribution", *exports, "--treatment", "current_smoker",
                         "--covariate", "systolic_bp", "--out", str(tmp_path)],
    }
    for message, args in refusals.items():
        bad = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert bad.exit_code != 0 and message in " ".join(bad.output.split()), (message,
                                                                              bad.output)


def _continuous_export(folder: Path, site: str, seed: int, value: str | None = None
                       ) -> tuple[Path, Path]:
    """An export whose outcome is a number (weight change, kg): treatment adds 3 kg, and
    older patients are treated more often and gain less."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = 300
    age = rng.uniform(30, 75, n)
    treated = rng.random(n) < 1 / (1 + np.exp(-(age - 50) / 8))
    gain = 5 - 0.08 * (age - 50) + 3.0 * treated + rng.normal(0, 2, n)
    frame = pd.DataFrame({"AGE": np.round(age), "SEX": rng.choice(["M", "F"], n),
                          "TREATED": treated.astype(int), "GAIN": np.round(gain, 2)})
    if value is not None:
        frame["GAIN"] = frame["GAIN"].astype(str)
        frame.loc[7, "GAIN"] = value
    csv = folder / f"{site}.csv"
    frame.to_csv(csv, index=False)
    mapping = folder / f"{site}.toml"
    mapping.write_text(f'site = "{site}"\noutcome = "cvd_10y"\n'
                       '[label]\ncolumn = "GAIN"\nkind = "continuous"\n'
                       '[columns.age]\nsource = "AGE"\n'
                       '[columns.sex]\nsource = "SEX"\ncodes = { M = "male", F = "female" }\n'
                       '[columns.bp_treated]\nsource = "TREATED"\n')
    return csv, mapping


def test_a_continuous_outcome_from_exports_gives_a_difference_in_means(
        tmp_path: Path) -> None:
    from cardiofed.causal.sources import export_site, export_sites

    files = [_continuous_export(tmp_path, f"site_{k}", k) for k in range(3)]
    exports = [a for csv, m in files for a in ("--csv", str(csv), "--mapping", str(m))]
    analysis = ["--treatment", "bp_treated", "--covariate", "age", "--covariate", "sex",
                "--estimand", "ATE", "--method", "iptw", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["attribution", *exports, *analysis],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "difference in means" in result.output and "risk ratio" not in result.output
    sites, columns = export_sites([c for c, _ in files], [m for _, m in files],
                                  treatment="bp_treated", covariates=["age", "sex"],
                                  build=export_site)
    expected = run_attribution(sites, columns, estimand="ATE", methods=["iptw"],
                               outcome="continuous")
    effect = expected.effects["iptw"]
    assert 2.3 < effect.risk_difference < 3.7  # the true effect is 3 kg
    assert f"{effect.risk_difference:+.4f}" in result.output
    # A row without a number is refused by row and column, never by its value; a risk
    # model refuses a continuous outcome by name.
    bad = _continuous_export(tmp_path, "bad", 9, value="lots")
    refused = CliRunner().invoke(app, ["attribution", "--csv", str(bad[0]), "--mapping",
                                       str(bad[1]), *analysis], env={"COLUMNS": "200"})
    flat = " ".join(refused.output.split())
    assert refused.exit_code != 0 and "row 8" in flat and "'GAIN'" in flat
    assert "lots" not in flat
    simulate = CliRunner().invoke(app, ["simulate", *exports, "--rounds", "1"],
                                  env={"COLUMNS": "200"})
    assert simulate.exit_code != 0
    assert "serves causal attribution only" in " ".join(simulate.output.split())
    other = CliRunner().invoke(app, ["simulate", "--dataset", "uci-heart", *exports],
                               env={"COLUMNS": "200"})
    assert other.exit_code != 0 and "are the 'csv' data set's" in other.output
    survival = CliRunner().invoke(app, ["attribution", *exports, *analysis, "--horizon", "5"],
                                  env={"COLUMNS": "200"})
    assert survival.exit_code != 0 and "a time-to-event analysis needs the event" in " ".join(
        survival.output.split())


def test_a_node_refuses_a_plan_whose_outcome_kind_its_mapping_does_not_label(
        tmp_path: Path) -> None:
    from cardiofed.causal.study import AttributionPlan
    from cardiofed.exceptions import TaskRefused
    from cardiofed.node.config import DataSource
    from cardiofed.node.work import attribution_site

    csv, mapping = _continuous_export(tmp_path, "site_0", 0)
    plan = AttributionPlan(treatment="bp_treated", covariates=["age", "sex"])
    with pytest.raises(TaskRefused, match="outcome is binary; this site's mapping labels a "
                                          "continuous outcome"):
        attribution_site(DataSource(csv=csv, mapping=mapping), plan, ["age", "sex=male"],
                         "cvd_10y")


def test_over_secure_sums_without_noise_the_analysis_is_the_exact_one(federation) -> None:  # type: ignore[no-untyped-def]
    """At a huge epsilon the secure sums (scaled, rounded into the ring, unscaled) give
    the per-site private schedule's estimate: the arithmetic loses nothing that shows."""
    from cardiofed.simulation.secure_attribution import run_secure_attribution

    sites, covariates = federation
    kw = {"estimand": "ATE", "methods": ["overlap", "iptw"], "trim": 0.05}
    private = run_attribution(sites, covariates, private=True, **kw)  # type: ignore[arg-type]
    secure = run_secure_attribution(sites, covariates, epsilon=1e7, **kw)
    for method in ("overlap", "iptw"):
        assert secure.effects[method].risk_difference == pytest.approx(
            private.effects[method].risk_difference, abs=1e-4)


def test_a_secure_steps_noise_is_one_releases_split_over_the_sites(federation) -> None:  # type: ignore[no-untyped-def]
    """The secure sum's stated noise variance per block is one release's at the study's
    noise multiplier times n / min_sites (with the rounding term), not n releases'; and
    the totals scatter around the exact sums with that variance (800 draws: the ratio of
    empirical to stated variance lies within 0.7-1.4, six standard errors of the ratio
    (0.05) either side at the least)."""
    from cardiofed.causal.combine import add
    from cardiofed.causal.study import AttributionPlan, noise_units, release, site_step, start
    from cardiofed.data.dataset import feature_ranges_for
    from cardiofed.simulation.secure_attribution import secure_step_sum

    sites, covariates = federation
    ranges = feature_ranges_for(covariates)
    plan = AttributionPlan(covariates=covariates, estimand="ATE", methods=["overlap"],
                           trim=0.05, private=True)
    state = start(plan, covariates, ranges)
    exact = [site_step(plan, state, s, i, ranges) for i, s in enumerate(sites)]
    per_site = None
    for arrays in exact:
        per_site = add(per_site, release(plan, state, arrays, 2.0, np.random.default_rng(0)))
    assert per_site is not None
    draws = [secure_step_sum(plan, state, exact, 2.0, dropout=0.2) for _ in range(800)]
    min_sites = 10  # ceil(0.8 * 12)
    for block, (names, _) in noise_units(plan, state).items():
        stated = float(draws[0][f"noise_var.{block}"][0])
        assert stated == pytest.approx(
            float(per_site[f"noise_var.{block}"][0]) / min_sites, rel=5e-3)
        truth = sum(a[names[0]] for a in exact)
        errors = np.array([d[names[0]] - truth for d in draws]).ravel()
        assert 0.7 <= float(np.mean(errors ** 2)) / stated <= 1.4, block


def test_a_secure_attributions_settings_are_refused_by_name() -> None:
    from cardiofed.simulation.secure_attribution import run_secure_attribution

    sites, covariates = synthetic_sites(3, seed=1)
    with pytest.raises(ConfigurationError, match="epsilon must be > 0 .* got 0"):
        run_secure_attribution(sites, covariates, epsilon=0)
    with pytest.raises(ConfigurationError, match=r"secure_dropout must be in \[0, 1\) .*"
                                                 r"got 1.5"):
        run_secure_attribution(sites, covariates, epsilon=1.0, secure_dropout=1.5)
