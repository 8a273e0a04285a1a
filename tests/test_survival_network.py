"""A federated Cox model as a networked study: coordinator and nodes in-process (ASGI
transport) fit exactly what the in-process fit gives on the same rows; bad plans,
payloads, states and sites are refused by name."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_coordinator import Federation, _until_done  # type: ignore[import-not-found]

from cardiofed.data.dataset import feature_ranges_for
from cardiofed.exceptions import ConfigurationError, TaskRefused
from cardiofed.node.agent import NodeAgent
from cardiofed.node.config import DataSource
from cardiofed.node.work import survival_rows
from cardiofed.schema import CATALOGUE, encoded_feature_names
from cardiofed.survival.cox import (
    baseline_at,
    breslow_baseline,
    fit_cox,
    pooled_sums,
    site_cox_sums,
)
from cardiofed.survival.study import MAX_ETA, SurvivalPlan, check_state, start
from cardiofed.wire import encode_arrays

SITES = ["tier3_01", "tier2_01", "community_01", "community_02"]
COVARIATES = ["age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp",
              "current_smoker", "diabetes"]
COLUMNS = encoded_feature_names(COVARIATES, CATALOGUE)  # sex -> sex=male
SURVIVAL: dict[str, object] = {"covariates": COVARIATES, "grid_step_years": 0.25,
                               "max_years": 16.0}


def _federation(tmp: Path, survival: dict[str, object] | None = None,
                **study: object) -> Federation:
    return Federation(tmp, study={"plan": {"survival": survival or SURVIVAL},
                                  "sites": SITES, "feature_names": None,
                                  "feature_ranges": None, "outcome": "cvd_10y", **study})


def exact(fed: Federation, site: str, **settings: object) -> NodeAgent:
    """A non-private node that opted in to exact Cox sums."""
    return fed.agent(site, opt_in=["exact_survival"], **settings)


def _result(fed: Federation) -> dict[str, object]:
    response = fed.client.get("/v1/studies/s1/survival", headers=fed.auth(fed.admin))
    assert response.status_code == 200, response.text
    return dict(response.json())


def _in_process(plan: SurvivalPlan, sites: list[str] = SITES):  # type: ignore[no-untyped-def]
    """The same rows, clipped to the same ranges, fitted by fit_cox in one process."""
    center = start(plan, COLUMNS, feature_ranges_for(COLUMNS))["inputs"]["center"]
    rows = _rows(sites)
    return fit_cox(lambda beta: [site_cox_sums(t, e, x, beta, plan.grid, center=center)
                                 for t, e, x in rows],
                   len(COVARIATES), stratified=plan.stratified, ties=plan.ties,
                   max_iter=plan.max_newton)


def _rows(sites: list[str] = SITES, part: Literal["all", "train", "test"] = "all"
          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each node's rows (of `part`), clipped to the ranges the nodes clip them to."""
    low, high = np.array(feature_ranges_for(COLUMNS)).T
    rows = [survival_rows(DataSource(dataset="synthetic", site=s, seed=0), COLUMNS,
                          "cvd_10y", part=part) for s in sites]
    return [(t, e, np.clip(x, low, high)) for t, e, x in rows]


@pytest.mark.parametrize("stratified", [False, True])
def test_with_evaluate_each_site_judges_its_served_model_on_its_held_out_rows(
        tmp_path: Path, stratified: bool) -> None:
    """The fit uses the training rows; each site's figures on its held-out rows equal
    those of the in-process fit's served model (its own baseline, stratified), judged the
    same way; the dashboard shows them."""
    from test_dashboard import _login  # type: ignore[import-not-found]

    from cardiofed.experiments.survival import judged
    from cardiofed.survival.metrics import horizon_figures

    survival = {**SURVIVAL, "stratified": stratified, "evaluate": True}
    fed = _federation(tmp_path, survival)
    _until_done(fed, [exact(fed, s) for s in SITES])
    body = _result(fed)
    plan = SurvivalPlan(**survival)
    center = body["center"]
    train = _rows(part="train")
    fit = fit_cox(lambda beta: [site_cox_sums(t, e, x, beta, plan.grid, center=center)
                                for t, e, x in train], len(COVARIATES), stratified=stratified)
    got = np.array([body["coefficients"][c]["coefficient"] for c in COLUMNS])
    np.testing.assert_allclose(got, fit.beta, rtol=0, atol=1e-9)
    sums = [site_cox_sums(t, e, x, fit.beta, plan.grid, center=center) for t, e, x in train]
    h0 = ([baseline_at(breslow_baseline(s), plan.grid, 10.0) for s in sums] if stratified
          else [baseline_at(breslow_baseline(pooled_sums(sums)), plan.grid, 10.0)] * 4)
    evaluation = body["evaluation"]
    assert isinstance(evaluation, dict) and list(evaluation) == SITES
    for site, (t, e, x), site_h0 in zip(SITES, _rows(part="test"), h0, strict=True):
        risk = -np.expm1(-site_h0 * np.exp((x - center) @ fit.beta))
        expected = judged(horizon_figures(t, e, risk, 10.0))
        report = evaluation[site]
        assert report["n"] == t.size and report["verdict"] == expected["verdict"]
        for name in ("uno_c", "observed", "predicted", "slope", "citl", "harrell_c",
                     "horizon_auc", "brier"):
            assert report[name] == pytest.approx(expected[name], rel=1e-6), name
        assert report["uno_c_ci"] == pytest.approx(expected["uno_c_ci"], rel=1e-6)
    # Each registered version's card holds the figures of the sites that judged it.
    from cardiofed.serving import registry
    from cardiofed.store import session_factory

    with session_factory(fed.settings.database_url)() as db:
        cards = [registry.card(db, m["version"]) for m in registry.list_models(db)]
    judged_by = [list(c["metrics"]) for c in cards]
    assert judged_by == ([[s] for s in SITES] if stratified else [SITES])
    assert cards[0]["metrics"][SITES[0]]["uno_c"] == pytest.approx(
        evaluation[SITES[0]]["uno_c"], rel=1e-12)
    page = _login(fed, fed.admin).get("/ui/studies/s1")
    assert 'id="survival-evaluation"' in page.text
    first = evaluation[SITES[0]]
    assert f"<td>{SITES[0]}</td><td>{first['n']} / {first['events']}</td>" in page.text


@pytest.mark.parametrize("stratified", [False, True])
def test_networked_cox_equals_the_in_process_fit(tmp_path: Path, stratified: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fed = _federation(tmp_path, {**SURVIVAL, "stratified": stratified})
    assert fed.client.get("/v1/studies/s1/survival",
                          headers=fed.auth(fed.admin)).status_code == 409  # not yet
    _until_done(fed, [exact(fed, s) for s in SITES])
    status = fed.status()
    assert status["attribution"]["kind"] == "survival"
    assert status["attribution"]["finished"] and status["attribution"]["sites"] == SITES
    body = _result(fed)
    plan = SurvivalPlan(**{**SURVIVAL, "stratified": stratified})
    expected = _in_process(plan)
    got = np.array([body["coefficients"][c]["coefficient"] for c in COLUMNS])
    se = np.array([body["coefficients"][c]["se"] for c in COLUMNS])
    np.testing.assert_allclose(got, expected.beta, rtol=0, atol=1e-9)
    np.testing.assert_allclose(se, expected.se, rtol=0, atol=1e-9)
    assert body["newton_steps"] == expected.iterations
    assert body["loglik"] == pytest.approx(expected.loglik, abs=1e-8)
    assert body["coefficients"]["age"]["hazard_ratio"] > 1  # older, more events
    if stratified:  # each site's own Breslow baseline at the fit, as fit_cox's rows give
        assert body["baseline"] is None and body["baseline_at_horizon"] is None
        for site, (t, e, x) in zip(SITES, _rows(), strict=True):
            sums = site_cox_sums(t, e, x, expected.beta, plan.grid, center=body["center"])
            np.testing.assert_allclose(body["baselines"][site], breslow_baseline(sums),
                                       rtol=1e-9, atol=0)
            assert body["baselines_at_horizon"][site] == body["baselines"][site][39]
        assert body["without_baseline"] == []
    else:
        assert body["baselines"] is None
        baseline = np.array(body["baseline"])
        assert baseline.size == 64 and (np.diff(baseline) >= 0).all()
        assert body["baseline_at_horizon"] == baseline[39]  # 10 years: the 40th point
    # One round of counts, then one per derivative evaluation: the start, each step and
    # any halving.
    assert status["round"] >= expected.iterations + 1
    _check_kaplan_meier(body, SurvivalPlan(**SURVIVAL))
    _check_served(fed, body, stratified)
    if stratified:
        _check_site_baselines_shown(fed, body, tmp_path, monkeypatch)


def _check_site_baselines_shown(fed: Federation, body: dict[str, object], tmp: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's study page and ``cardiofed admin survival-report`` give each site's
    baseline by the horizon."""
    from test_dashboard import _login  # type: ignore[import-not-found]
    from typer.testing import CliRunner

    from cardiofed.cli import admin, app

    by_site = body["baselines_at_horizon"]
    assert isinstance(by_site, dict)
    page = _login(fed, fed.admin).get("/ui/studies/s1")
    shown = ", ".join(f"{site} {h0:.4f}" for site, h0 in by_site.items())
    assert f'<span id="site-baselines">{shown}</span>' in page.text
    fed.client.headers["Authorization"] = f"Bearer {fed.admin}"
    monkeypatch.setattr(admin, "_admin_client", lambda *_: fed.client)
    key = tmp / "admin.key"
    key.write_text(fed.admin)
    done = CliRunner().invoke(app, ["admin", "survival-report", "--study", "s1", "--out",
                                    str(tmp / "report"), "--admin-key-file", str(key)])
    assert done.exit_code == 0, done.output
    assert f"(its model version, in this order): {shown}." in " ".join(done.output.split())


def _check_kaplan_meier(body: dict[str, object], plan: SurvivalPlan) -> None:
    """The first round's counts give the pooled Kaplan-Meier curve of the same rows."""
    from cardiofed.survival.kaplan_meier import kaplan_meier, pooled_counts, site_counts

    rows = [survival_rows(DataSource(dataset="synthetic", site=s, seed=0), COLUMNS,
                          "cvd_10y") for s in SITES]
    curve = kaplan_meier(pooled_counts([site_counts(t, e, plan.grid) for t, e, _ in rows]))
    km = body["kaplan_meier"]
    assert isinstance(km, dict)
    np.testing.assert_allclose(km["survival"], curve.survival, rtol=0, atol=1e-12)
    np.testing.assert_allclose(km["cumulative_hazard"], curve.cumulative_hazard, atol=1e-12)
    se = np.array([np.nan if v is None else v for v in km["survival_se"]])
    np.testing.assert_allclose(se, curve.survival_se, atol=1e-12)
    assert body["kaplan_meier_risk_at_horizon"] == pytest.approx(
        1 - curve.at(plan.horizon_years), abs=1e-12)


def _check_served(fed: Federation, body: dict[str, object], stratified: bool) -> None:
    """The model with one baseline is registered as version 1 and scores the Cox risk by
    the horizon; a stratified one is not registered."""
    from cardiofed.serving import registry
    from cardiofed.store import session_factory

    center = np.array(body["center"])
    beta = np.array([body["coefficients"][c]["coefficient"] for c in COLUMNS])  # type: ignore[index]
    x = np.array([[55.0, 1.0, 210.0, 50.0, 130.0, 1.0, 0.0],
                  [70.0, 0.0, 180.0, 60.0, 150.0, 0.0, 1.0]])
    h0 = body["baselines_at_horizon"] if stratified else {None: body["baseline_at_horizon"]}
    assert isinstance(h0, dict) and len(h0) == (len(SITES) if stratified else 1)
    with session_factory(fed.settings.database_url)() as db:
        assert registry.promoted_or_none(db) is None
        assert [m["version"] for m in registry.list_models(db)] == [
            f"s1-v{i}" for i in range(1, len(h0) + 1)]
        for number, (site, at_horizon) in enumerate(h0.items(), start=1):
            model = registry.load(db, f"s1-v{number}")
            assert model.card.model == "cox" and model.card.horizon_years == 10.0
            assert model.card.link == "cloglog" and model.card.settings.get("site") == site
            expected = -np.expm1(-at_horizon * np.exp((x - center) @ beta))
            np.testing.assert_allclose(model.risk(x), expected, rtol=1e-9)


def test_a_private_site_refuses_and_a_non_private_one_needs_the_opt_in(
        tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    plain = fed.agent(SITES[0])  # privacy off, no opt-in
    private = fed.agent(SITES[1], privacy={"epsilon_max": 4.0, "delta": 1e-6,
                                           "ledger_dir": str(tmp_path / "ledger")})
    fed.step([plain, private])
    reasons = " ".join(r["reason"] for r in fed.status()["refusals"])
    assert "opt_in = [\"exact_survival\"]" in reasons
    assert "Cox sums have no private release yet" in reasons


@pytest.mark.parametrize(("survival", "message"), [
    ({"covariates": ["age", "no_such_feature"]}, "no_such_feature"),
    ({"covariates": ["age", "age"]}, "names one twice"),
    ({"covariates": ["age"], "grid_step_years": 0}, "grid_step_years"),
    ({"covariates": ["age"], "grid_step_years": 0.01, "max_years": 100}, "at most 2000"),
    ({"covariates": ["age"], "ties": "exact"}, "ties"),
])
def test_bad_survival_plans_are_refused_by_name(tmp_path: Path, survival: dict[str, object],
                                                message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        _federation(tmp_path, survival)


def test_a_plan_is_an_attribution_or_a_survival_study_not_both(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="not both"):
        Federation(tmp_path, study={
            "plan": {"survival": SURVIVAL, "attribution": {"covariates": ["age"]}},
            "sites": SITES, "feature_names": None, "feature_ranges": None,
            "outcome": "cvd_10y"})


def test_malformed_counts_are_refused_with_a_reason(tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    credential = exact(fed, SITES[0]).credential()
    manifest = {"study": "s1", "round": "0", "model_version": "0", "site": SITES[0]}
    good = {"events": np.zeros(64), "censored": np.ones(64)}
    for arrays, reason in [({"events": np.zeros(64)}, "must hold exactly"),
                           ({**good, "censored": -np.ones(64)}, "counts patients"),
                           ({**good, "events": np.full(64, 0.5)}, "counts patients"),
                           ({**good, "censored": np.full(64, np.nan)}, "non-finite")]:
        r = fed.client.post("/v1/studies/s1/rounds/0/updates", headers=fed.auth(credential),
                            content=encode_arrays(arrays, manifest))
        assert r.status_code == 422 and reason in r.json()["detail"], r.text


def test_malformed_sums_are_refused_with_a_reason(tmp_path: Path) -> None:
    fed = _federation(tmp_path, {**SURVIVAL, "kaplan_meier": False})  # Cox from round 0
    credential = exact(fed, SITES[0]).credential()
    manifest = {"study": "s1", "round": "0", "model_version": "0", "site": SITES[0]}
    good = _zero_sums(64, len(COLUMNS))
    for arrays, reason in [({"events": np.ones(3)}, "must hold exactly"),
                           ({**good, "events": -np.ones(64)}, "counts patients"),
                           ({**good, "events": np.full(64, 0.5)}, "counts patients"),
                           ({**good, "risk0": np.full(64, np.inf)}, "non-finite"),
                           ({**good, "extra": np.zeros(1)}, "must hold exactly")]:
        r = fed.client.post("/v1/studies/s1/rounds/0/updates", headers=fed.auth(credential),
                            content=encode_arrays(arrays, manifest))
        assert r.status_code == 422 and reason in r.json()["detail"], r.text


def _zero_sums(g: int, k: int) -> dict[str, np.ndarray]:
    return {"events": np.zeros(g), "event_x": np.zeros((g, k)), "event_eta": np.zeros(g),
            "risk0": np.zeros(g), "risk1": np.zeros((g, k)), "risk2": np.zeros((g, k, k)),
            "tied0": np.zeros(g), "tied1": np.zeros((g, k)), "tied2": np.zeros((g, k, k))}


def test_a_site_whose_export_has_no_follow_up_refuses(tmp_path: Path) -> None:
    from test_survival_serving import _survival_export  # type: ignore[import-not-found]

    with pytest.raises(TaskRefused, match="no follow-up times"):
        survival_rows(DataSource(dataset="framingham", site="x", seed=0), COLUMNS, None)
    with pytest.raises(TaskRefused, match=re.escape("no columns ['cholesterol_ratio']")):
        survival_rows(DataSource(dataset="synthetic", site="tier3_01", seed=0),
                      ["age", "cholesterol_ratio"], None)
    csv, mapping = _survival_export(tmp_path, "plain", 1, follow_up=False)
    with pytest.raises(TaskRefused, match=re.escape("declares no [follow_up]")):
        survival_rows(DataSource(csv=csv, mapping=mapping), ["age"], "cvd_10y")


RANGES = feature_ranges_for(COLUMNS)
CENTER = [(lo + hi) / 2 for lo, hi in RANGES]


@settings(max_examples=200, deadline=None)
@given(beta=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64),
                     min_size=len(COLUMNS), max_size=len(COLUMNS)))
def test_the_node_computes_only_at_coefficients_that_cannot_overflow(
        beta: list[float]) -> None:
    """Whatever coefficients a coordinator sends, the node either refuses before it looks
    at a row (a bound from its ranges, not its data) or every exp(x beta) is finite."""
    plan = SurvivalPlan(covariates=COVARIATES)
    state = {"step": "cox", "columns": COLUMNS, "iterations": 0,
             "inputs": {"beta": beta, "center": CENTER}}
    try:
        b, c = check_state(plan, state, RANGES)
    except ConfigurationError:
        return
    low, high = np.array(RANGES).T
    corners = np.where(b > 0, high, low), np.where(b > 0, low, high)
    for x in corners:
        assert abs(float((x - c) @ b)) <= MAX_ETA


def test_a_centre_outside_the_ranges_or_the_wrong_shape_is_refused() -> None:
    plan = SurvivalPlan(covariates=COVARIATES)
    for inputs, message in (
            ({"beta": [0.0] * 7, "center": [1e9] * 7}, "centre lies outside"),
            ({"beta": [0.0] * 6, "center": CENTER}, "one value per covariate column (7)"),
            ({"beta": [np.nan] * 7, "center": CENTER}, "must be finite"),
            ({"beta": [1e3] * 7, "center": CENTER}, "above 500 within the covariates")):
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            check_state(plan, {"columns": COLUMNS, "inputs": inputs}, RANGES)


def test_a_round_without_any_event_stops_the_fit_by_name() -> None:
    from cardiofed.exceptions import DataValidationError
    from cardiofed.survival.study import next_state

    plan = SurvivalPlan(covariates=["age"], grid_step_years=5.0, max_years=10.0,
                        kaplan_meier=False)
    state = start(plan, ["age"], [(20.0, 100.0)])
    with pytest.raises(DataValidationError, match="No site has an event on the grid"):
        next_state(plan, state, _zero_sums(2, 1))


def _arrays(plan: SurvivalPlan, k: int, data: st.DataObject) -> dict[str, np.ndarray]:
    """Arbitrary finite sums of the right shapes; counts whole and >= 0, and the sums of
    exp(x beta) >= 0 with the tied part within the risk set, as the coordinator's payload
    checks let through (every other constraint is up to check_sums)."""
    from cardiofed.survival.study import expected_arrays

    finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, width=64)
    out = {}
    for name, shape in expected_arrays(plan, "cox", k).items():
        size = int(np.prod(shape))
        values = data.draw(st.lists(finite, min_size=size, max_size=size), label=name)
        out[name] = np.array(values, dtype=np.float64).reshape(shape)
    out["events"] = np.round(np.abs(out["events"]) % 5)
    if not plan.stratified:
        out["tied0"] = np.where(out["events"] > 0, np.abs(out["tied0"]), 0.0)
        out["risk0"] = out["tied0"] + np.abs(out["risk0"])
    return out


@settings(max_examples=150, deadline=None)
@given(stratified=st.booleans(), data=st.data())
def test_whatever_sums_a_site_sends_the_coordinator_refuses_or_fits_never_crashes(
        stratified: bool, data: st.DataObject) -> None:
    """A site's sums pass the checks or are refused by name; summed sums move the fit or
    stop it with a CardioFedError, and anything it asks for next is finite."""
    from cardiofed.exceptions import CardioFedError
    from cardiofed.survival.study import check_sums, next_state

    k = 2
    plan = SurvivalPlan(covariates=["age", "systolic_bp"], grid_step_years=2.0,
                        max_years=6.0, stratified=stratified)
    state = start(plan, ["age", "systolic_bp"], [(20.0, 100.0), (60.0, 250.0)])
    whole = st.lists(st.integers(0, 10**6), min_size=plan.grid.size, max_size=plan.grid.size)
    counts = {k: np.array(data.draw(whole, label=k), dtype=np.float64)
              for k in ("events", "censored")}
    state = next_state(plan, state, counts)  # the Kaplan-Meier round: any counts fit
    assert state["step"] == "cox"
    assert all(v is None or 0 <= v < math.inf for v in state["kaplan_meier"]["survival_se"])
    for _ in range(3):
        arrays = _arrays(plan, k, data)
        try:
            check_sums(plan, "cox", arrays)
            state = next_state(plan, state, arrays)
        except CardioFedError as exc:
            assert str(exc)  # refused or stopped by name
            return
        assert np.isfinite(state["inputs"]["beta"]).all()
        if state["step"] == "baseline":  # stratified: each site's own baseline, then done
            assert stratified and np.isfinite(state["fit"]["se"]).all()
            return
        if state["step"] == "done":
            assert not stratified and np.isfinite(state["result"]["se"]).all()
            assert np.isfinite(state["result"]["baseline"]).all()
            return


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_whatever_baseline_sums_sites_send_each_is_refused_or_gets_its_own_baseline(
        data: st.DataObject) -> None:
    """Whatever baseline sums the sites send at a stratified fit, the round is refused by
    name, or every site gets a finite, non-decreasing baseline of its own, served only
    where it is > 0 by the horizon."""
    from cardiofed.exceptions import CardioFedError
    from cardiofed.survival.study import with_site_baselines

    plan = SurvivalPlan(covariates=["age"], grid_step_years=2.0, max_years=12.0,
                        stratified=True)
    g = plan.grid.size
    signed = data.draw(st.booleans(), label="negative values allowed")
    reals = st.lists(st.floats(-1e12 if signed else 0.0, 1e12), min_size=g, max_size=g)
    wholes = st.lists(st.integers(-2 if signed else 0, 10**6), min_size=g, max_size=g)
    sites = ["a", "b", "c"]
    reports = {}
    for site in sites:
        events = np.array(data.draw(wholes), dtype=np.float64)
        risk0 = np.array(data.draw(reals), dtype=np.float64)
        # unsigned: a risk set may still be below its events' least exp(x beta)
        tiny = data.draw(st.booleans(), label="risk sets as small as they come")
        reports[site] = {"events": events, "risk0": risk0 if signed or tiny else risk0 + events}
    state = {"step": "baseline", "sites": sites, "fit": {"beta": [0.1], "se": [0.01]}}
    try:
        done = with_site_baselines(plan, state, reports)
    except CardioFedError as exc:
        assert re.search("baseline sums must be >= 0, with a risk set of at least|"
                         "baseline sums give a baseline hazard that is not finite", str(exc))
        return
    result = done["result"]
    assert done["step"] == "done" and "fit" not in done and result["beta"] == [0.1]
    for site in sites:
        baseline = np.array(result["baselines"][site])  # type: ignore[index]
        assert np.isfinite(baseline).all() and (np.diff(baseline) >= 0).all()
        served = site in result["baselines_at_horizon"]  # type: ignore[operator]
        assert served != (site in result["without_baseline"])  # type: ignore[operator]
        if served:
            assert result["baselines_at_horizon"][site] > 0  # type: ignore[index]


def test_exports_with_follow_up_fit_over_the_network_and_the_dashboard_shows_it(
        tmp_path: Path) -> None:
    """Nodes on their own CSV exports (each mapping's [follow_up], in days): the networked
    fit equals fit_cox on the rows the nodes load, and treatment halves the hazard."""
    from test_dashboard import _login  # type: ignore[import-not-found]
    from test_survival_serving import _survival_export  # type: ignore[import-not-found]

    covariates = ["age", "sex", "bp_treated"]
    columns = encoded_feature_names(covariates, CATALOGUE)
    plan = {"covariates": covariates, "grid_step_years": 0.5, "max_years": 12.0}
    files = {s: _survival_export(tmp_path, s, k) for k, s in enumerate(SITES)}
    fed = _federation(tmp_path, plan)
    ui = _login(fed, fed.admin)
    _until_done(fed, [exact(fed, s, data={"csv": str(files[s][0]),
                                          "mapping": str(files[s][1])}) for s in SITES])
    body = _result(fed)
    ranges = feature_ranges_for(columns)
    low, high = np.array(ranges).T
    rows = [survival_rows(DataSource(csv=files[s][0], mapping=files[s][1]), columns,
                          "cvd_10y") for s in SITES]
    survival_plan = SurvivalPlan(**plan)
    center = start(survival_plan, columns, ranges)["inputs"]["center"]
    expected = fit_cox(lambda beta: [site_cox_sums(t, e, np.clip(x, low, high), beta,
                                                   survival_plan.grid, center=center)
                                     for t, e, x in rows], len(columns))
    got = np.array([body["coefficients"][c]["coefficient"] for c in columns])
    np.testing.assert_allclose(got, expected.beta, rtol=0, atol=1e-9)
    assert 0.3 < body["coefficients"]["bp_treated"]["hazard_ratio"] < 0.8  # truth 0.5
    page = ui.get("/ui/studies/s1")
    assert page.status_code == 200 and 'id="cox"' in page.text and "Survival" in page.text
    km = body["kaplan_meier"]["survival"]  # type: ignore[index]
    assert f'<span id="km">{1 - km[19]:.3f}</span>' in page.text  # by 10 years: point 20
    assert f'{body["coefficients"]["age"]["hazard_ratio"]:.3f}' in page.text
    # A site whose mapping names another outcome refuses by name.
    with pytest.raises(TaskRefused, match="mapping labels 'cvd_10y'"):
        survival_rows(DataSource(csv=files[SITES[0]][0], mapping=files[SITES[0]][1]),
                      columns, "chd_10y")


@pytest.mark.parametrize("state", [None, {"step": "km"}])
def test_a_task_without_the_state_of_its_own_step_is_refused(state: object) -> None:
    from cardiofed.node.agent import _step_state
    from cardiofed.protocol.schemas import TaskResponse

    task = TaskResponse.model_construct(kind="cox", attribution=state)
    with pytest.raises(TaskRefused, match="The cox task of a survival study carries no "
                                          "state for that step."):
        _step_state(task, "a survival")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_whatever_figures_a_site_reports_they_are_refused_by_name_or_judged(
        data: st.DataObject) -> None:
    """Any figures a site sends in the assess round: refused by name, or judged with each
    value a finite number or None (undefined), never an exception."""
    from cardiofed.exceptions import CardioFedError
    from cardiofed.serving.survival import _judged
    from cardiofed.survival.metrics import FIGURES
    from cardiofed.survival.study import with_site_reports

    plan = SurvivalPlan(covariates=["age"], evaluate=True)
    m = len(FIGURES)
    plausible = data.draw(st.booleans(), label="plausible figures")
    if plausible:  # counts and proportions where they belong
        n = data.draw(st.integers(1, 10**6))
        values = [float(n), float(data.draw(st.integers(0, n)))] + [
            data.draw(st.floats(0, 1)) for _ in FIGURES[2:]]
        defined = [1.0, 1.0] + [float(data.draw(st.booleans())) for _ in FIGURES[2:]]
        values = [v if d else 0.0 for v, d in zip(values, defined, strict=True)]
    else:
        values = data.draw(st.lists(st.floats(-1e9, 1e9), min_size=m, max_size=m))
        defined = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=m,
                                     max_size=m))
    state = {"step": "assess", "sites": ["a"], "fit": {"beta": [0.1]}}
    reports = {"a": {"values": np.array(values), "defined": np.array(defined)}}
    try:
        done = with_site_reports(plan, state, reports)
    except CardioFedError as exc:
        assert "A site's evaluation is not one its rows can give" in str(exc)
        assert not plausible or "must not exceed" in str(exc)
        return
    figures = done["result"]["evaluation"]["a"]
    assert done["step"] == "done" and list(figures) == list(FIGURES)
    assert all(v is None or math.isfinite(v) for v in figures.values())
    report = _judged(figures)
    assert report["verdict"]
    flat = [report[k] for k in ("uno_c", "observed", "predicted", "slope", "citl", "brier")]
    flat += report["uno_c_ci"] + report["slope_ci"] + report["citl_ci"]
    assert all(v is None or math.isfinite(v) for v in flat)


def test_a_node_refuses_an_assess_round_it_cannot_compute_by_name() -> None:
    from cardiofed.survival.study import site_step

    plan = SurvivalPlan(covariates=COVARIATES, evaluate=True)
    t, e, x = _rows(SITES[:1], part="test")[0]
    base = {"step": "assess", "columns": COLUMNS, "iterations": 3,
            "inputs": {"beta": [0.0] * 7, "center": CENTER}}
    for h0, site, message in ((-1.0, None, "must be a finite number > 0; got -1.0"),
                              (math.inf, None, "must be a finite number > 0; got inf"),
                              ({"other": 0.1}, "a", "names no baseline for site 'a'")):
        state = {**base, "inputs": {**base["inputs"], "h0": h0}}
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            site_step(plan, state, t, e, x, RANGES, site)
    state = {**base, "inputs": {**base["inputs"], "h0": 0.1}}
    with pytest.raises(ConfigurationError, match="no held-out rows to judge the model on"):
        site_step(plan, state, t[:0], e[:0], x[:0], RANGES, "a")
    # A site served no model (no event by the horizon) reports only its counts.
    state = {**base, "inputs": {**base["inputs"], "h0": {"a": None}}}
    arrays = site_step(plan, state, t, e, x, RANGES, "a")
    assert arrays["defined"].tolist() == [1.0, 1.0] + [0.0] * 16
    assert arrays["values"][:2].tolist() == [t.size, e.sum()]


@settings(max_examples=150, deadline=None)
@given(unit=st.lists(st.floats(-1, 1), min_size=7, max_size=7),
       scale=st.sampled_from([1e-3, 1e-2, 0.1, 10.0]),
       h0=st.one_of(st.none(), st.floats(1e-300, 1e300)), data=st.data())
def test_whatever_model_an_assess_task_serves_the_node_refuses_or_reports_figures_that_pass(
        unit: list[float], scale: float, h0: float | None, data: st.DataObject) -> None:
    """Any coefficients and baseline hazard a coordinator sends (extreme but valid): the
    node refuses by name before it looks at a row, or its figures pass the coordinator's
    checks."""
    from cardiofed.exceptions import CardioFedError
    from cardiofed.survival.study import check_sums, site_step

    plan = SurvivalPlan(covariates=COVARIATES, evaluate=True)
    rows = data.draw(st.integers(1, 40), label="held-out rows")
    t, e, x = (part[:rows] for part in _HELD_OUT)
    beta = [u * scale for u in unit]
    state = {"step": "assess", "columns": COLUMNS, "iterations": 3,
             "inputs": {"beta": beta, "center": CENTER, "h0": {"a": h0}}}
    try:
        arrays = site_step(plan, state, t, e, x, RANGES, "a")
    except CardioFedError as exc:
        assert "above 500 within the covariates" in str(exc)
        return
    check_sums(plan, "assess", arrays)  # never refused: what the node sends passes


_HELD_OUT = _rows(SITES[:1], part="test")[0]


def test_a_calibration_interval_no_rows_can_bound_is_sent_undefined() -> None:
    """Found by the property above (in CI): four held-out rows and risks so alike that
    the slope's interval runs past +-1e6. The node marks those figures undefined, and
    the coordinator accepts what it sends."""
    from cardiofed.survival.metrics import FIGURES
    from cardiofed.survival.study import check_sums, site_step

    plan = SurvivalPlan(covariates=COVARIATES, evaluate=True)
    t, e, x = (part[:4] for part in _HELD_OUT)
    unit = [0.0, -0.7116807745607325, 0.0, 0.0, -0.1533471020548487, 0.0,
            -0.18160172726167745]
    state = {"step": "assess", "columns": COLUMNS, "iterations": 3,
             "inputs": {"beta": [0.01 * u for u in unit], "center": CENTER,
                        "h0": {"a": 2.6943341645120156e-10}}}
    arrays = site_step(plan, state, t, e, x, RANGES, "a")
    defined = dict(zip(FIGURES, arrays["defined"].tolist(), strict=True))
    # The slope itself lies near the limit: defined or not depends on the numerical
    # libraries' last digits (with NumPy 2.4.6 and statsmodels 0.15.0 it is past it too).
    assert defined["slope_low"] == defined["slope_high"] == 0
    check_sums(plan, "assess", arrays)


def test_refusals_of_impossible_cox_sums_and_out_of_step_reports_name_the_problem() -> None:
    from cardiofed.exceptions import DataValidationError
    from cardiofed.survival.study import check_sums, with_site_baselines, with_site_evaluations

    plan = SurvivalPlan(covariates=["age"], grid_step_years=5.0, max_years=10.0)
    sums = {**_zero_sums(2, 1), "events": np.array([1.0, 0.0]),
            "risk0": np.array([1e-300, 0.0]), "tied0": np.array([1e-300, 0.0])}
    with pytest.raises(DataValidationError, match=re.escape(
            "be at least 7.12e-218 per event where a grid point has events")):
        check_sums(plan, "cox", sums)
    with pytest.raises(ConfigurationError, match="not at its baseline round"):
        with_site_baselines(plan, {"step": "assess"}, {})
    with pytest.raises(ConfigurationError, match="not at its assess round"):
        with_site_evaluations(plan, {"step": "baseline"}, {})
