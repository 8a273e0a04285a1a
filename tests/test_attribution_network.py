"""Attribution as a networked study: coordinator and nodes in-process (ASGI transport)
give the simulator's analysis exactly; bad plans, payloads and sites are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_coordinator import Federation, _until_done  # type: ignore[import-not-found]

from cardiofed.causal.combine import run_attribution
from cardiofed.causal.design import COVARIATES, TREATMENT
from cardiofed.causal.sources import synthetic_sites
from cardiofed.node.agent import NodeAgent
from cardiofed.serving.attribution import result_of
from cardiofed.wire import encode_arrays

SITES = ["tier3_01", "tier2_01", "community_01", "community_02"]
CANONICAL = ["age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp", "bp_treated",
             "current_smoker", "diabetes"]
ATTRIBUTION = {"treatment": TREATMENT, "covariates": CANONICAL, "estimand": "ATT", "seed": 4}


def _federation(tmp: Path, attribution: dict[str, object] | None = None,
                **study: object) -> Federation:
    return Federation(tmp, study={"plan": {"attribution": attribution or ATTRIBUTION},
                                  "sites": SITES, "feature_names": None,
                                  "feature_ranges": None, "outcome": "cvd_10y", **study})


def _simulated(sites: list[str] = SITES):  # type: ignore[no-untyped-def]
    federation, covariates = synthetic_sites(12, seed=0)
    by_name = {s.name: s for s in federation}
    return run_attribution([by_name[s] for s in sites], covariates, estimand="ATT", seed=4)


def exact(fed: Federation, site: str, **settings: object) -> NodeAgent:
    """A non-private node that opted in to exact attribution sums."""
    return fed.agent(site, opt_in=["exact_attribution"], **settings)


def _result(fed: Federation) -> dict[str, object]:
    response = fed.client.get("/v1/studies/s1/attribution", headers=fed.auth(fed.admin))
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_networked_attribution_equals_the_simulator(tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    assert fed.client.get("/v1/studies/s1/attribution",
                          headers=fed.auth(fed.admin)).status_code == 409  # not yet
    agents = [exact(fed, s) for s in SITES]
    _until_done(fed, agents)
    status = fed.status()
    assert status["attribution"]["finished"] and status["attribution"]["sites"] == SITES
    body = _result(fed)
    expected = _simulated()
    assert body["card"]["columns"] == COVARIATES and body["card"]["sites"] == SITES
    assert body["card"]["propensity_newton_steps"] == expected.propensity.iterations
    for method, effect in expected.effects.items():
        got = body["estimate"][method]
        for key in ("risk_difference", "rd_low", "rd_high", "risk_ratio", "rr_low", "rr_high"):
            assert got[key] == getattr(effect, key), (method, key)  # the same sums: equal
    assert body["balanced"] == {k: bool(np.all(np.abs(v) < 0.1))
                                for k, v in expected.balance.items()}
    # One round per step: moments, the Newton steps, estimate, sandwich.
    assert status["round"] == expected.propensity.iterations + 2
    again = result_of(body)  # what `cardiofed admin attribution-report` renders
    assert again.effects == expected.effects and again.covariates == expected.covariates
    np.testing.assert_array_equal(again.propensity.beta, expected.propensity.beta)


def test_a_site_leaving_restarts_the_analysis_without_it(tmp_path: Path) -> None:
    fed = _federation(tmp_path, min_sites=3)
    agents = [exact(fed, s) for s in SITES]
    for _ in range(3):  # moments and two Newton steps
        fed.step(agents)
    response = fed.client.post(f"/v1/studies/s1/sites/{SITES[-1]}/revoke",
                               headers=fed.auth(fed.admin))
    assert response.status_code == 204
    _until_done(fed, agents[:-1])
    body = _result(fed)
    assert body["card"]["restarts"] == 1 and body["card"]["sites"] == SITES[:-1]
    expected = _simulated(SITES[:-1])
    assert body["estimate"]["iptw"]["risk_difference"] == \
        expected.effects["iptw"].risk_difference


def test_a_site_outside_the_first_step_takes_no_part(tmp_path: Path) -> None:
    fed = _federation(tmp_path, min_sites=3)
    agents = [exact(fed, s) for s in SITES]
    fed.step(agents[:-1])  # the last site misses the moments round
    fed.advance(3601)
    _until_done(fed, agents)
    status = fed.status()
    assert status["attribution"]["sites"] == SITES[:-1]
    assert any(r["site"] == SITES[-1] and "not in the analysis" in r["reason"]
               for r in status["refusals"])
    assert _result(fed)["card"]["restarts"] == 0


@pytest.mark.parametrize(("attribution", "message"), [
    ({**ATTRIBUTION, "treatment": "glucose"}, "attribution.treatment must be a binary feature"),
    ({**ATTRIBUTION, "treatment": "age"}, "attribution: the treatment 'age' is also a covariate"),
    ({**ATTRIBUTION, "covariates": ["age", "statin_dose"]}, "are not features of the schema"),
    ({**ATTRIBUTION, "estimand": "ATE", "methods": ["matching"]}, "matching estimates the ATT"),
    ({**ATTRIBUTION, "trim": 0.7}, "trim"),
])
def test_bad_attribution_plans_are_refused_by_name(tmp_path: Path,
                                                   attribution: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        _federation(tmp_path, attribution)


def test_an_attribution_study_needs_its_outcome(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="names its outcome"):
        _federation(tmp_path, outcome=None)


def test_malformed_sums_are_refused_with_a_reason(tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    agent = exact(fed, SITES[0])
    credential = agent.credential()
    manifest = {"study": "s1", "round": "0", "model_version": "0", "site": SITES[0]}
    k = len(COVARIATES)
    good = {"n": np.array([10.0]), "sum": np.zeros(k), "cross": np.eye(k)}
    for arrays, reason in (
            ({**good, "sum": np.zeros(k + 1)}, "must hold exactly"),
            ({**good, "n": np.array([2.5])}, "counts patients"),
            ({**good, "cross": np.full((k, k), np.nan)}, "non-finite"),
            ({**good, "cross": np.eye(k, dtype=np.float32)}, "finite float64"),
            ({**good, "extra": np.zeros(1)}, "must hold exactly")):
        r = fed.client.post("/v1/studies/s1/rounds/0/updates", headers=fed.auth(credential),
                            content=encode_arrays(arrays, manifest))
        assert r.status_code == 422 and reason in r.json()["detail"], r.text


def _budget(tmp_path: Path, site: str, epsilon: float = 8.0) -> dict[str, object]:
    return {"privacy": {"epsilon_max": epsilon, "ledger_dir": str(tmp_path / f"ledger-{site}")}}


def test_a_site_with_a_privacy_budget_refuses_a_plan_that_is_not_private(
        tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    fed.agent(SITES[0], **_budget(tmp_path, SITES[0])).run(max_tasks=1)
    refusals = fed.status()["refusals"]
    assert refusals and "the attribution plan is not private" in refusals[0]["reason"]


PRIVATE = {**ATTRIBUTION, "private": True, "methods": ["overlap", "iptw"], "trim": 0.05}


def test_a_private_study_charges_each_budget_and_adds_noise_only_there(
        tmp_path: Path) -> None:
    """Two sites with budgets, two without: the study finishes; each budgeted site's
    ledger holds one attribution release per step, within its budget; its sums carry
    noise (a non-integer row count, a noise variance > 0), the others' are exact."""
    from cardiofed.causal.study import AttributionPlan
    from cardiofed.privacy.ledger_file import open_ledger_file
    from cardiofed.wire import decode_arrays

    fed = _federation(tmp_path, PRIVATE)
    budgets = {s: _budget(tmp_path, s) for s in SITES[:2]}
    agents = [fed.agent(s, **budgets[s]) if s in budgets else exact(fed, s)
              for s in SITES]
    _until_done(fed, agents)
    body = _result(fed)
    assert any("private" in note for note in body["card"]["notes"])
    plan = AttributionPlan.model_validate(PRIVATE)
    for site, agent in zip(SITES, agents, strict=True):
        sent = [e for e in agent.outbound.entries()]
        assert [e["kind"] for e in sent] == ["moments", *["newton"] * 6, "estimate",
                                            "sandwich"]
        moments = decode_arrays((tmp_path / site / "outbox" / "s1-round0.bin").read_bytes())[0]
        if site in budgets:
            entries = open_ledger_file(tmp_path / f"ledger-{site}").entries
            releases = [e for e in entries if e["kind"] == "attribution"]
            assert len(releases) == plan.releases == len(sent)
            assert releases[-1]["epsilon_after"] <= 8.0 + 1e-9
            assert moments["noise_var.n"][0] > 0 and moments["n"][0] != round(moments["n"][0])
        else:
            assert moments["noise_var.n"][0] == 0 and moments["n"][0] == round(moments["n"][0])
    effect = body["estimate"]["overlap"]
    assert effect["rd_low"] < effect["risk_difference"] < effect["rd_high"]


@pytest.mark.parametrize(("attribution", "message"), [
    ({**PRIVATE, "methods": ["matching"]}, "matching cannot be private"),
    ({**PRIVATE, "trim": 0.0}, "needs trim > 0"),
])
def test_bad_private_plans_are_refused_by_name(tmp_path: Path, attribution: dict[str, object],
                                               message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        _federation(tmp_path, attribution)


def test_a_site_whose_data_lacks_the_treatment_refuses(tmp_path: Path) -> None:
    fed = _federation(tmp_path, attribution={**ATTRIBUTION, "treatment": "bp_treated",
                                             "covariates": ["age", "sex"]})
    NodeAgent.run(exact(fed, SITES[0]), max_tasks=1)
    reason = fed.status()["refusals"][0]["reason"]
    assert "holds treatment 'lipid_lowering'" in reason


def test_the_risk_api_serves_a_finished_study_to_keys_with_the_scope(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from cardiofed.serving.app import create_serving_app
    from cardiofed.serving.keys import create_key
    from cardiofed.serving.settings import ServingSettings
    from cardiofed.store import session_factory

    fed = _federation(tmp_path)
    url = fed.settings.database_url
    with session_factory(url)() as db:
        keys = {name: create_key(db, name, scopes, 1000, studies=studies) for name, scopes,
                studies in (("reader", ["attribution:read"], None),
                            ("scorer", ["score"], None),
                            ("other", ["attribution:read"], ["another-study"]))}
    api = TestClient(create_serving_app(ServingSettings(database_url=url, key_cache_s=0)))

    def ask(key: str, study: str = "s1"):  # type: ignore[no-untyped-def]
        return api.post("/v1/attribution", json={"study": study},
                        headers={"Authorization": f"Bearer {keys[key]}"})

    assert ask("reader").status_code == 409  # not finished yet
    _until_done(fed, [exact(fed, s) for s in SITES])
    r = ask("reader")
    assert r.status_code == 200, r.text
    assert r.json() == _result(fed)
    assert r.json()["card"]["treatment"] == TREATMENT and r.json()["card"]["patients"] > 0
    assert ask("scorer").status_code == 403 and "attribution:read" in ask("scorer").text
    assert ask("other").status_code == 403
    assert ask("reader", "nope").status_code == 404
    assert api.post("/v1/attribution", json={"study": 3},
                    headers={"Authorization": f"Bearer {keys['reader']}"}).status_code == 422


def test_the_dashboard_follows_an_attribution_study(tmp_path: Path) -> None:
    from test_dashboard import _login  # type: ignore[import-not-found]

    fed = _federation(tmp_path)
    ui = _login(fed, fed.admin)
    assert ui.get("/ui/studies/s1").status_code == 200  # before any model or result
    _until_done(fed, [exact(fed, s) for s in SITES])
    page = ui.get("/ui/studies/s1")
    assert page.status_code == 200 and 'id="effects"' in page.text
    expected = _simulated().effects["iptw"]
    assert f"{expected.risk_difference:+.4f} ({expected.rd_low:+.4f}" in page.text
    assert ui.get("/ui").status_code == 200


def test_a_private_attribution_over_secure_sums_keeps_no_sites_sums(tmp_path: Path) -> None:
    """With secure_aggregation each step is a secure sum: the database never holds a
    site's sums, each ledger holds one secure release per step, and with a huge budget
    the estimate is the private schedule's without noise."""
    from sqlalchemy import func, select

    from cardiofed.causal.study import AttributionPlan
    from cardiofed.privacy.ledger_file import open_ledger_file
    from cardiofed.store import SecureMessage, Update, session_factory

    fed = Federation(tmp_path, study={
        "plan": {"attribution": PRIVATE, "secure_aggregation": True}, "sites": SITES,
        "feature_names": None, "feature_ranges": None, "outcome": "cvd_10y"})
    budget = {"epsilon_max": 1e6, "study_epsilon": 1e6}
    agents = [fed.agent(s, privacy={**budget, "ledger_dir": str(tmp_path / f"ledger-{s}")})
              for s in SITES]
    _until_done(fed, agents)

    assert fed.status()["refusals"] == []
    with session_factory(fed.settings.database_url)() as db:
        assert db.scalar(select(func.count()).select_from(Update)) == 0
        assert db.scalar(select(func.count()).select_from(SecureMessage)) == 0
    plan = AttributionPlan.model_validate(PRIVATE)
    for site in SITES:
        releases = [e for e in open_ledger_file(tmp_path / f"ledger-{site}").entries
                    if e["kind"] == "attribution"]
        assert len(releases) == plan.releases and all(e["secure_sum"] for e in releases)
        assert len({e["noise_multiplier"] for e in releases}) == 1  # one study-wide noise
    federation, covariates = synthetic_sites(12, seed=0)
    by_name = {s.name: s for s in federation}
    expected = run_attribution([by_name[s] for s in SITES], covariates, estimand="ATT",
                               methods=["overlap", "iptw"], trim=0.05, seed=4, private=True)
    body = _result(fed)
    for method, effect in expected.effects.items():
        assert body["estimate"][method]["risk_difference"] == pytest.approx(
            effect.risk_difference, abs=1e-3)


def test_a_secure_attribution_must_be_private_and_survival_cannot_be_secure(
        tmp_path: Path) -> None:
    fed = _federation(tmp_path)
    for plan, message in (
            ({"attribution": ATTRIBUTION, "secure_aggregation": True},
             "an attribution over secure sums must be private"),
            ({"survival": {"covariates": ["age"]}, "secure_aggregation": True},
             "a survival study's sums are not secure sums yet")):
        answer = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
            "id": "secure", "plan": plan, "sites": SITES, "outcome": "cvd_10y"})
        assert answer.status_code == 422 and message in answer.text, answer.text
