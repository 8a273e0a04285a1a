"""The risk API, the model registry, API keys and offline scoring."""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.orm import sessionmaker

from cardiofed.data.synthetic import default_profiles, generate_exports, synthetic_federation
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.serving import provenance, registry
from cardiofed.serving.app import create_serving_app
from cardiofed.serving.keys import KeyCache, create_key, list_keys, revoke_key
from cardiofed.serving.model import RISK_CATEGORIES, RiskModel
from cardiofed.serving.offline import predict_file, score_frame
from cardiofed.serving.settings import ServingSettings
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.store import make_engine, session_factory
from cardiofed.store.migrations import upgrade

PATIENT = {"age": 67.25, "sex": "male", "total_cholesterol": 213.0, "hdl_cholesterol": 47.0,
           "systolic_bp": 143.5, "bp_treated": True, "current_smoker": False,
           "diabetes": False}


def _trained(model: str = "logistic", recalibrate: bool = False, seed: int = 0) -> RiskModel:
    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.3)
    config = SimulationConfig.create(model=model, rounds=2, seed=seed, eval_every=0,
                                     recalibrate=recalibrate)
    result = run_experiment(data, config, baselines=False)
    return provenance.from_experiment(result, study="demo", feature_names=data.feature_names,
                                      outcome=data.outcome)


@pytest.fixture(scope="module")
def logistic() -> RiskModel:
    return _trained(recalibrate=True)


class Api:
    def __init__(self, tmp: Path, model: RiskModel) -> None:
        self.url = f"sqlite:///{tmp}/serving.db"
        self.sessions = session_factory(self.url)
        with self.sessions() as db:
            self.version = registry.register(db, model, promote=True)
            self.score_key = create_key(db, "partner", ["score"], 1000)
            self.pin_key = create_key(db, "pinner", ["score", "score:any-version"], 1000)
            self.read_key = create_key(db, "reader", ["models:read"], 1000)
            self.admin_key = create_key(db, "admin", ["admin", "models:read", "score"], 1000)
        self.client = TestClient(create_serving_app(ServingSettings(
            database_url=self.url, key_cache_s=0, promoted_cache_s=0, max_batch=5)))

    def post(self, path: str, body: dict[str, object], key: str | None = None):  # type: ignore[no-untyped-def]
        return self.client.post(path, json=body,
                                headers={"Authorization": f"Bearer {key or self.score_key}"})

    def get(self, path: str, key: str | None = None):  # type: ignore[no-untyped-def]
        return self.client.get(path, headers={"Authorization": f"Bearer {key or self.read_key}"})


@pytest.fixture
def api(tmp_path: Path, logistic: RiskModel) -> Api:
    return Api(tmp_path, logistic)


# ---------------------------------------------------------------- scoring

def test_risk_response_and_exact_contributions(api: Api, logistic: RiskModel) -> None:
    r = api.post("/v1/risk", {"features": PATIENT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "demo-v1" and body["outcome"] == "cvd_10y"
    assert body["attribution"] == "exact (logistic regression)"
    # Contributions plus the baseline give the log-odds exactly, and the risk is its sigmoid.
    assert body["baseline_logit"] + sum(body["contributions"].values()) == pytest.approx(
        body["logit"], abs=1e-9)
    assert body["risk"] == pytest.approx(1 / (1 + math.exp(-body["logit"])), abs=1e-12)
    assert list(body["contributions"]) == logistic.card.features
    # Same as scoring the encoded row directly.
    row, _ = logistic.encode_patient(PATIENT)
    assert body["risk"] == pytest.approx(float(logistic.risk(row[None])[0]), abs=1e-12)


def test_contributions_of_logistic_regression_by_hand(logistic: RiskModel) -> None:
    row, _ = logistic.encode_patient(PATIENT)
    z = logistic.preprocessor.standardise(row[None])[0]
    w = logistic.weights["linear.weight"].ravel().astype(np.float64)
    explained = logistic.explain(row[None])
    sex_columns = [j for j, n in enumerate(["age", "sex=male"]) if n == "sex=male"]
    assert explained.contributions[0, 0] == pytest.approx(w[0] * z[0])  # age
    assert explained.contributions[0, 1] == pytest.approx(w[sex_columns[0]] * z[1])  # sex


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-1e4, 1e4) | st.just(math.nan), min_size=64, max_size=64),
       link=st.sampled_from(["logit", "cloglog"]))
def test_one_row_in_plain_floats_is_scored_as_numpy_scores_it(
        logistic: RiskModel, values: list[float], link: str) -> None:
    """The online path (:meth:`RiskModel.explain_row`, no NumPy) against the batch path,
    for any encoded row (missing values filled, extreme log-odds), both links."""
    model = logistic if link == "logit" else logistic.with_card(
        model="cox", link="cloglog", horizon_years=10.0)
    row = values[:model.n_inputs]
    risk, logit, baseline, parts = model.explain_row(row)
    explained = model.explain(np.array([row]))
    assert logit == pytest.approx(float(explained.logit[0]), rel=1e-12, abs=1e-9)
    assert risk == pytest.approx(float(explained.risk[0]), rel=1e-9, abs=1e-15)
    assert 0.0 <= risk <= 1.0
    assert baseline == explained.baseline
    assert parts == pytest.approx(explained.contributions[0].tolist(), rel=1e-12, abs=1e-9)


def test_mlp_integrated_gradients_nearly_sum_to_the_logit() -> None:
    mlp = _trained(model="mlp")
    rows = np.vstack([mlp.encode_patient(PATIENT)[0],
                      mlp.encode_patient({**PATIENT, "age": 40, "sex": "female"})[0]])
    explained = mlp.explain(rows)
    assert explained.attribution_error is not None
    risk, logit, _, parts = mlp.explain_row(rows[1].tolist())  # the network's path, one row
    assert [risk, logit, *parts] == pytest.approx(  # float32 network, alone or in a batch
        [explained.risk[1], explained.logit[1], *explained.contributions[1]], rel=1e-5)
    gap = np.abs(explained.baseline + explained.contributions.sum(axis=1) - explained.logit)
    assert gap.max() < 0.02 * max(1.0, float(np.abs(explained.logit).max()))


def test_an_mlp_scored_without_contributions_is_not_explained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Integrated gradients (64 forward and backward passes) only when asked for."""
    mlp = _trained(model="mlp")
    api = Api(tmp_path, mlp)
    asked = api.post("/v1/risk", {"features": PATIENT}).json()

    def unasked(*_: object) -> None:
        raise AssertionError("integrated gradients computed for a score without them")

    monkeypatch.setattr(RiskModel, "_integrated_gradients", unasked)
    r = api.post("/v1/risk", {"features": PATIENT, "contributions": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["contributions"] is None and body["baseline_logit"] is None
    assert body["logit"] == pytest.approx(asked["logit"], rel=1e-6)


def test_stated_units_are_converted(api: Api) -> None:
    mgdl = api.post("/v1/risk", {"features": PATIENT}).json()["risk"]
    mmol = api.post("/v1/risk", {"features": {**PATIENT, "total_cholesterol": 213.0 / 38.67,
                                              "hdl_cholesterol": 47.0 / 38.67,
                                              "systolic_bp": 143.5 / 7.50062},
                                 "units": {"total_cholesterol": "mmol/L",
                                           "hdl_cholesterol": "mmol/L",
                                           "systolic_bp": "kPa"}}).json()["risk"]
    assert mmol == pytest.approx(mgdl, abs=1e-9)


def test_validation_names_each_bad_field_and_its_range(api: Api) -> None:
    r = api.post("/v1/risk", {"features": {**PATIENT, "age": 150, "sex": "x",
                                           "systolic_bp": 50, "weight": 80},
                              "units": {"systolic_bp": "kPa", "hdl_cholesterol": "mg/L"}})
    assert r.status_code == 422
    errors = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert errors == {
        "features.weight": "is not an input of this model; expected age, sex, "
                           "total_cholesterol, hdl_cholesterol, systolic_bp, bp_treated, "
                           "current_smoker, diabetes",
        "features.age": "150 years is outside the plausible range [18, 110] years",
        "features.sex": "must be one of female, male; got 'x'",
        "features.hdl_cholesterol": "unit 'mg/L' is not known for this feature; use one of "
                                    "mg/dL, mmol/L",
        "features.systolic_bp": "50 kPa is outside the plausible range [7.999, 40] kPa "
                                "([60, 300] mmHg)",
    }
    missing = api.post("/v1/risk", {"features": {"age": 60}}).json()["errors"]
    assert {"field": "features.sex", "message": "is required (or set impute_missing to fill "
                                                "it with the federation's median)"} in missing
    typed = api.post("/v1/risk", {"features": {**PATIENT, "age": "old"}})
    assert typed.json()["errors"] == [{"field": "features.age",
                                       "message": "must be a number in years; got 'old'"}]


def test_a_code_sent_as_a_number_past_any_float_is_refused_by_name(api: Api) -> None:
    """Found by tests/test_patient_input.py's property: a whole number past 1e308 for a
    coded feature raised an OverflowError (a 500)."""
    r = api.post("/v1/risk", {"features": {**PATIENT, "sex": 10**400}})
    assert r.status_code == 422
    (error,) = r.json()["errors"]
    assert error["field"] == "features.sex"
    assert error["message"].startswith("must be one of female, male; got 1000000")


def test_imputed_features_are_listed(api: Api) -> None:
    r = api.post("/v1/risk", {"features": {"age": 60, "sex": "female"}, "impute_missing": True})
    assert r.status_code == 200
    assert r.json()["imputed"] == ["total_cholesterol", "hdl_cholesterol", "systolic_bp",
                                   "bp_treated", "current_smoker", "diabetes"]


@pytest.mark.parametrize(("risk", "category"), [
    (0.01, "low"), (0.0499, "low"), (0.05, "borderline"), (0.075, "intermediate"),
    (0.1999, "intermediate"), (0.20, "high"), (0.9, "high")])
def test_default_risk_categories(api: Api, risk: float, category: str) -> None:
    assert api.client.app.state.serving.category(risk) == category  # type: ignore[attr-defined]


def test_category_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="risk_thresholds must increase strictly"):
        ServingSettings(risk_thresholds=[0.2, 0.1], risk_categories=["a", "b", "c"])
    with pytest.raises(ValueError, match="risk_categories needs 4 names for 3 thresholds"):
        ServingSettings(risk_categories=["low", "high"])


def test_batch_scores_in_order_and_names_the_bad_patient(api: Api) -> None:
    patients = [{"features": {**PATIENT, "age": age}} for age in (40, 55, 70)]
    r = api.post("/v1/risk/batch", {"patients": patients})
    assert r.status_code == 200
    risks = [x["risk"] for x in r.json()["results"]]
    single = [api.post("/v1/risk", p).json()["risk"] for p in patients]
    assert risks == pytest.approx(single, abs=1e-12)
    bad = api.post("/v1/risk/batch", {"patients": [*patients, {"features": {**PATIENT,
                                                                            "age": 5}}]})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "patients[3].features.age"
    too_many = api.post("/v1/risk/batch", {"patients": patients * 2})
    assert too_many.status_code == 422
    assert too_many.json()["errors"] == [{
        "field": "patients", "message": "List should have at most 5 items after validation, "
                                        "not 6"}]


def test_site_recalibration_is_applied_when_the_card_has_one(api: Api,
                                                              logistic: RiskModel) -> None:
    site, fit = next(iter(logistic.card.recalibration.items()))
    raw = api.post("/v1/risk", {"features": PATIENT}).json()
    r = api.post("/v1/risk", {"features": PATIENT, "site": site}).json()
    terms = {k.removeprefix("term:"): v for k, v in fit.items() if k.startswith("term:")}
    assert r["calibration"] == {"site": site, "applied": True, "intercept": fit["intercept"],
                                "slope": fit["slope"], "terms": terms, "reason": ""}
    row, _ = logistic.encode_patient(PATIENT)
    z = dict(zip(logistic.column_names, logistic.preprocessor.standardise(row[None])[0],
                 strict=True))
    eta = fit["intercept"] + fit["slope"] * raw["logit"] + sum(c * z[k] for k, c in terms.items())
    assert r["risk"] == pytest.approx(1 / (1 + math.exp(-eta)), abs=1e-9)
    other = api.post("/v1/risk", {"features": PATIENT, "site": "elsewhere"}).json()
    assert other["calibration"]["applied"] is False
    assert other["risk"] == raw["risk"]


def test_a_site_update_that_revises_a_term_is_applied_by_the_api_and_offline(
        tmp_path: Path, logistic: RiskModel) -> None:
    update = {"intercept": 0.1, "slope": 0.9, "term:age": 0.3}
    model = logistic.with_card(recalibration={"clinic": update})
    api = Api(tmp_path, model)
    raw = api.post("/v1/risk", {"features": PATIENT}).json()
    r = api.post("/v1/risk", {"features": PATIENT, "site": "clinic"}).json()
    assert r["calibration"]["terms"] == {"age": 0.3}
    row, _ = model.encode_patient(PATIENT)
    z_age = model.preprocessor.standardise(row[None])[0, 0]
    eta = 0.1 + 0.9 * raw["logit"] + 0.3 * z_age
    assert r["risk"] == pytest.approx(1 / (1 + math.exp(-eta)), abs=1e-9)
    csv = tmp_path / "one.csv"
    pd.DataFrame([{k: (int(v) if isinstance(v, bool) else v) for k, v in PATIENT.items()}]
                 ).to_csv(csv, index=False)
    predict_file(model, csv, tmp_path / "out.csv", site="clinic")
    assert pd.read_csv(tmp_path / "out.csv")["risk"][0] == pytest.approx(r["risk"], abs=1e-9)


# ---------------------------------------------------------------- registry and versions

def test_versions_are_pinned_or_the_promoted_one_is_served(api: Api) -> None:
    second = _trained(seed=1)
    with api.sessions() as db:
        assert registry.register(db, second) == "demo-v2"
    assert api.post("/v1/risk", {"features": PATIENT}).json()["model_version"] == "demo-v1"
    promote = api.post("/v1/models/demo-v2/promote", {}, key=api.admin_key)
    assert promote.status_code == 200
    assert api.post("/v1/risk", {"features": PATIENT}).json()["model_version"] == "demo-v2"
    pinned = api.post("/v1/risk", {"features": PATIENT, "model": "demo-v1"},
                      key=api.pin_key).json()
    assert pinned["model_version"] == "demo-v1"
    missing = api.post("/v1/risk", {"features": PATIENT, "model": "demo-v9"}, key=api.pin_key)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "No model version 'demo-v9' in the registry."
    listed = api.get("/v1/models").json()
    assert [(m["version"], m["promoted"]) for m in listed] == [("demo-v1", False),
                                                               ("demo-v2", True)]


def test_model_card_holds_the_provenance(api: Api, logistic: RiskModel) -> None:
    card = api.get("/v1/models/demo-v1").json()
    assert card["study"] == "demo" and card["source"] == "simulation"
    assert card["algorithm"] == "fedavg" and card["rounds"] == 2
    assert card["settings"]["lr"] == 0.05
    assert card["sites"] == ["tier3_01", "tier2_01", "community_01", "community_02"]
    assert card["schema_version"] == "1.0"
    assert card["content_sha256"] == logistic.content_hash()
    assert set(card["metrics"]) == {*card["sites"], "pooled test"}
    assert "auc" in card["metrics"]["tier3_01"]
    assert card["outcome_description"].startswith("First cardiovascular event")
    # Who it learnt from: sites by type, records, each continuous feature's median.
    population = card["population"]
    assert population["sites"] == 4 and population["site_types"] == {
        "community": 2, "tier2": 1, "tier3": 1}
    assert population["records"] == sum(s.n_train for s in synthetic_federation(
        n_sites=4, seed=1, size_scale=0.3).sites)
    assert set(population["medians"]) == {"age", "total_cholesterol", "hdl_cholesterol",
                                          "systolic_bp"}
    assert 40 < population["medians"]["age"] < 80
    assert logistic.learnt_from.startswith(f"4 sites (2 community, 1 tier2, 1 tier3), "
                                           f"{population['records']:,} records; medians: age ")


def test_a_private_models_card_publishes_no_exact_record_count() -> None:
    data = synthetic_federation(n_sites=3, seed=1, size_scale=0.3)
    result = run_experiment(data, SimulationConfig.create(rounds=1, dp_epsilon=1.0,
                                                          eval_every=0), baselines=False)
    card = provenance.from_experiment(result, study="dp", feature_names=data.feature_names,
                                      outcome=data.outcome).card
    assert "records" not in card.population and card.population["sites"] == 3


def test_standalone_file_scores_without_the_coordinator(tmp_path: Path,
                                                        logistic: RiskModel) -> None:
    path, card_path = logistic.save(tmp_path / "model.safetensors")
    loaded = RiskModel.load(path)
    row, _ = logistic.encode_patient(PATIENT)
    assert loaded.risk(row[None]) == pytest.approx(logistic.risk(row[None]))
    assert '"content_sha256"' in card_path.read_text()
    tampered = logistic.with_card(content_sha256="0" * 64)
    with pytest.raises(DataValidationError, match="weights do not match the card's content "
                                                  "hash"):
        RiskModel.from_bytes(tampered.to_bytes())
    with pytest.raises(DataValidationError, match="is not a CardioFed risk model file"):
        RiskModel.from_bytes(path.read_bytes().replace(b"cardiofed-risk-model/1",
                                                       b"cardiofed-risk-model/9"))


# ---------------------------------------------------------------- access

def test_scopes_are_enforced(api: Api) -> None:
    assert api.get("/v1/models", key=api.score_key).status_code == 403
    denied = api.post("/v1/risk", {"features": PATIENT}, key=api.read_key)
    assert denied.status_code == 403
    assert denied.json()["detail"] == ("API key 'reader' lacks the 'score' scope (it has "
                                       "models:read).")
    assert api.post("/v1/models/demo-v1/promote", {}, key=api.score_key).status_code == 403
    assert api.client.post("/v1/risk", json={"features": PATIENT}).status_code == 401


def test_a_plain_score_key_scores_only_with_the_promoted_version(api: Api) -> None:
    with api.sessions() as db:
        registry.register(db, _trained(seed=1))  # demo-v2, not promoted
    promoted = api.post("/v1/risk", {"features": PATIENT, "model": "demo-v1"})
    assert promoted.status_code == 200  # pinning the promoted version itself is fine
    for path, body in (("/v1/risk", {"features": PATIENT, "model": "demo-v2"}),
                       ("/v1/risk/batch", {"patients": [{"features": PATIENT}],
                                           "model": "demo-v2"})):
        r = api.post(path, body)
        assert r.status_code == 403
        assert r.json()["detail"] == (
            "API key 'partner' may score only with the promoted version (demo-v1); pinning "
            "'demo-v2' needs the 'score:any-version' scope.")
    # A version that does not exist is refused the same way: no 404 tells it apart.
    assert api.post("/v1/risk", {"features": PATIENT, "model": "demo-v9"}).status_code == 403
    assert api.post("/v1/risk", {"features": PATIENT, "model": "demo-v2"},
                    key=api.pin_key).json()["model_version"] == "demo-v2"


def test_keys_limited_to_studies(api: Api, logistic: RiskModel) -> None:
    with api.sessions() as db:
        registry.register(db, logistic.with_card(study="other"))  # other-v1
        demo_only = create_key(db, "demo-only", ["score"], 100, studies=["demo"])
        demo_pinner = create_key(db, "demo-pinner", ["score", "score:any-version"], 100,
                                 studies=["demo"])
        demo_reader = create_key(db, "demo-reader", ["models:read"], 100, studies=["demo"])
        demo_admin = create_key(db, "demo-admin", ["admin"], 100, studies=["demo"])
    assert api.post("/v1/risk", {"features": PATIENT}, key=demo_only).status_code == 200
    refused = api.post("/v1/risk", {"features": PATIENT, "model": "other-v1"}, key=demo_pinner)
    assert refused.status_code == 403
    assert refused.json()["detail"] == ("API key 'demo-pinner' is limited to the models of "
                                        "'demo'; model 'other-v1' belongs to study 'other'.")
    # Reading: the list shows only the key's studies, another study's card is refused.
    listed = api.get("/v1/models", key=demo_reader).json()
    assert [m["version"] for m in listed] == ["demo-v1"]
    assert [m["version"] for m in api.get("/v1/models").json()] == ["demo-v1", "other-v1"]
    assert api.get("/v1/models/other-v1", key=demo_reader).status_code == 403
    assert api.get("/v1/models/demo-v1", key=demo_reader).status_code == 200
    # Promoting another study's model is refused; once it is promoted (by an unrestricted
    # admin) the limited key may not score with it either.
    assert api.post("/v1/models/other-v1/promote", {}, key=demo_admin).status_code == 403
    assert api.post("/v1/models/other-v1/promote", {}, key=api.admin_key).status_code == 200
    promoted_other = api.post("/v1/risk", {"features": PATIENT}, key=demo_only)
    assert promoted_other.status_code == 403
    assert "model 'other-v1' belongs to study 'other'" in promoted_other.json()["detail"]
    assert api.post("/v1/risk", {"features": PATIENT}).json()["model_version"] == "other-v1"
    assert api.post("/v1/risk", {"features": PATIENT, "model": "demo-v1"},
                    key=demo_pinner).status_code == 200


def test_key_studies_and_scopes_are_validated(api: Api) -> None:
    with api.sessions() as db:
        with pytest.raises(ConfigurationError, match="'studies' parameter must be None"):
            create_key(db, "x", ["score"], studies=[])
        with pytest.raises(ConfigurationError, match="'score:any-version' scope widens "
                                                     "'score'; give both"):
            create_key(db, "x", ["score:any-version"])


def test_keys_cli_creates_a_key_limited_to_studies(api: Api) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    created = CliRunner().invoke(app, ["keys", "create", "cli", "--scope", "score",
                                       "--study", "demo", "--study", "other",
                                       "--db", api.url])
    assert created.exit_code == 0, created.output
    assert created.output.startswith("cfk_")
    with api.sessions() as db:
        rows = {k["name"]: k for k in list_keys(db)}
    assert rows["cli"]["studies"] == ["demo", "other"]
    assert rows["partner"]["studies"] is None
    listed = CliRunner().invoke(app, ["keys", "list", "--db", api.url])
    assert "demo, other" in listed.output and "all" in listed.output


def test_an_older_database_gains_the_key_studies_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    with session_factory(url)() as db:
        secret = create_key(db, "old", ["score"])
    with sqlite3.connect(path) as conn:  # as the table was before keys had studies
        conn.execute("ALTER TABLE api_keys DROP COLUMN studies")
        conn.execute("DROP TABLE alembic_version")  # and before migrations
    engine = make_engine(url, check_schema=False)
    upgrade(engine)  # cardiofed db upgrade
    assert "studies" in {c["name"] for c in inspect(engine).get_columns("api_keys")}
    key = KeyCache(0).authenticate(sessionmaker(engine), secret)
    assert key.studies is None and key.name == "old"


def test_revoked_key_is_refused(api: Api) -> None:
    assert api.post("/v1/risk", {"features": PATIENT}).status_code == 200
    with api.sessions() as db:
        revoke_key(db, "partner")
    r = api.post("/v1/risk", {"features": PATIENT})
    assert r.status_code == 401 and r.json()["detail"] == "Unknown or revoked API key."


def test_rate_limit_answers_429_with_retry_after(api: Api) -> None:
    with api.sessions() as db:
        key = create_key(db, "slow", ["score"], rate_limit_per_minute=2)
    codes = [api.post("/v1/risk", {"features": PATIENT}, key=key).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = api.post("/v1/risk", {"features": PATIENT}, key=key)
    assert limited.headers["Retry-After"] == "30"  # one token per 30 s at 2 per minute
    assert "Rate limit of 2 requests per minute exceeded for API key 'slow'" in \
        limited.json()["detail"]


def test_key_settings_are_validated(api: Api) -> None:
    with api.sessions() as db, pytest.raises(ConfigurationError,
                                             match="'scopes' parameter must be a non-empty"):
        create_key(db, "x", ["everything"])


def test_logs_hold_no_feature_values(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        api.post("/v1/risk", {"features": PATIENT})
        api.post("/v1/risk", {"features": {**PATIENT, "age": 150.75}})
    text = caplog.text
    assert "path=/v1/risk status=200" in text and "status=422" in text
    assert "request_id=" in text and "latency_ms=" in text
    # What remains once the fields the log is meant to hold are removed (a random request
    # id or a latency may contain any digits) must hold no patient value.
    rest = re.sub(r"(request_id|bytes_in|bytes_out|latency_ms)=\S+|\.py:\d+", "", text)
    for value in ("67.25", "143.5", "150.75", "213", "male"):
        assert value not in rest


# ---------------------------------------------------------------- offline scoring

def test_predict_file_with_a_site_mapping(tmp_path: Path, logistic: RiskModel) -> None:
    export = generate_exports(default_profiles(1, size_scale=0.1), seed=3)[0]
    csv = tmp_path / "patients.csv"
    export.raw.to_csv(csv, index=False)

    done = predict_file(logistic, csv, tmp_path / "risks.parquet", mapping=export.mapping,
                        contributions=True, impute_missing=True)

    out = pd.read_parquet(tmp_path / "risks.parquet")
    assert done.rows == done.scored == len(export.raw) == len(out)
    assert list(out.columns[:4]) == ["row", "risk", "category", "n_imputed"]
    assert out["row"].tolist() == list(range(1, len(out) + 1))
    assert out["risk"].between(0, 1).all()
    # The same risks as the API's path for one row.
    from cardiofed.data.mapping import encode, harmonise

    frame = harmonise(export.raw, export.mapping, labels=False).frame
    expected = logistic.risk(encode(frame, logistic.card.features))
    np.testing.assert_allclose(out["risk"].to_numpy(), expected, rtol=1e-12)
    contrib = out[[f"contribution_{f}" for f in logistic.card.features]].to_numpy()
    explained = logistic.explain(encode(frame, logistic.card.features))
    np.testing.assert_allclose(contrib.sum(axis=1) + explained.baseline, explained.logit)


def test_predict_cli_on_canonical_columns(tmp_path: Path, logistic: RiskModel) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    model_file, _ = logistic.save(tmp_path / "m.safetensors")
    csv = tmp_path / "in.csv"
    pd.DataFrame([{**PATIENT, "id": "p1"}, {**PATIENT, "age": 50, "id": "p2"}]).to_csv(
        csv, index=False)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["predict", str(csv), "--model", str(model_file),
                                      "--out", str(out), "--id-column", "id"])
    assert result.exit_code == 0, result.output
    scored = pd.read_csv(out)
    assert scored["id"].tolist() == ["p1", "p2"]
    row, _ = logistic.encode_patient(PATIENT)
    assert scored["risk"][0] == pytest.approx(float(logistic.risk(row[None])[0]), rel=1e-5)
    bad = CliRunner().invoke(app, ["predict", str(csv), "--model", str(model_file),
                                   "--out", str(tmp_path / "x.xlsx")])
    assert bad.exit_code == 2 and "must end in .csv or .parquet" in bad.output


def test_predict_lists_rows_it_cannot_score_and_refuses_beyond_the_limit(
        tmp_path: Path, logistic: RiskModel) -> None:
    csv = tmp_path / "in.csv"
    pd.DataFrame([PATIENT, {**PATIENT, "systolic_bp": 999}, PATIENT]).to_csv(csv, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(DataValidationError, match=r"1 of 3 rows \(33.3%\) cannot be scored, "
                                                  r"more than the 1.0% allowed"):
        predict_file(logistic, csv, out)
    assert not out.exists()
    side = pd.read_csv(tmp_path / "out.rejected.csv")
    assert side.to_dict("records") == [
        {"row": 2, "reason": "systolic_bp outside the plausible range [60, 300] mmHg"}]
    assert "999" not in (tmp_path / "out.rejected.csv").read_text()  # reasons, not values
    done = predict_file(logistic, csv, out, max_rejected=0.5)
    assert (done.scored, done.rejected) == (2, 1)
    assert pd.read_csv(out)["row"].tolist() == [1, 3]


def test_malformed_rows_are_never_scored_silently(tmp_path: Path,
                                                  logistic: RiskModel) -> None:
    """A whole line in one quoted field: every other column is empty. The API's rule:
    missing features are filled only when asked."""
    header = ",".join(PATIENT)
    good = ",".join(str(int(v) if isinstance(v, bool) else v) for v in PATIENT.values())
    csv = tmp_path / "in.csv"
    csv.write_text(f"id,{header}\np1,{good}\n\"p2,{good}\",,,,,,,,\np3,{good}\n")
    out = tmp_path / "out.csv"
    done = predict_file(logistic, csv, out, id_column="id", max_rejected=0.5)
    assert (done.rows, done.scored, done.rejected) == (3, 2, 1)
    side = pd.read_csv(done.rejected_file)
    assert side["id"].tolist() == ["p2," + good]  # the id column, as the file has it
    assert side["reason"][0] == "no feature of the model present (a malformed line?)"
    assert pd.read_csv(out)["id"].tolist() == ["p1", "p3"]
    imputed = predict_file(logistic, csv, out, id_column="id", impute_missing=True,
                           max_rejected=0.5)
    assert imputed.rejected == 1  # even imputation does not score an empty line
    one_missing = tmp_path / "one.csv"
    one_missing.write_text(f"id,{header}\np1,{good}\np2,{good.replace('67.25', '', 1)}\n")
    refused = predict_file(logistic, one_missing, out, id_column="id", max_rejected=0.5)
    assert pd.read_csv(refused.rejected_file)["reason"].tolist() == ["age missing"]
    assert predict_file(logistic, one_missing, out, id_column="id",
                        impute_missing=True).rejected == 0


def test_a_malformed_line_is_one_rejected_row_and_blank_lines_shift_nothing(
        tmp_path: Path, logistic: RiskModel) -> None:
    header = ",".join(PATIENT)
    good = ",".join(str(int(v) if isinstance(v, bool) else v) for v in PATIENT.values())
    csv = tmp_path / "in.csv"
    csv.write_bytes(f"id,{header}\np1,{good}\n\np2,{good},extra\n".encode()
                    + f"p3,\"{good}\n".encode() + b"p4,\xff" + f",{good[3:]}\n".encode()
                    + f"p5,{good}\n".encode())
    done = predict_file(logistic, csv, tmp_path / "out.csv", id_column="id",
                        max_rejected=0.9)
    assert (done.rows, done.scored, done.rejected) == (5, 2, 3)
    scored = pd.read_csv(tmp_path / "out.csv")
    assert scored["row"].tolist() == [1, 6] and scored["id"].tolist() == ["p1", "p5"]
    side = pd.read_csv(done.rejected_file)
    assert side["row"].tolist() == [3, 4, 5]
    assert side["reason"].str.startswith(("line 4 ", "line 5 ", "line 6 ")).all()
    assert [w in r for w, r in zip(("fields", "unbalanced quote", "not UTF-8"),
                                   side["reason"], strict=True)] == [True] * 3


def test_risk_categories_only_for_the_horizon_they_were_defined_for(
        tmp_path: Path, logistic: RiskModel) -> None:
    assert logistic.card.horizon_years == 10 and logistic.categorised
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ten_year = Api(tmp_path / "a", logistic).post("/v1/risk", {"features": PATIENT}).json()
    assert ten_year["category"] in RISK_CATEGORIES
    assert ten_year["risk_of"].endswith("(10-year horizon)")
    prevalent = logistic.with_card(horizon_years=None,
                                   outcome_description="Ever reported CHD or MI")
    api = Api(tmp_path / "b", prevalent)
    one = api.post("/v1/risk", {"features": PATIENT}).json()
    assert one["category"] is None
    assert one["risk_of"] == "Ever reported CHD or MI (no time horizon)"
    batch = api.post("/v1/risk/batch", {"patients": [{"features": PATIENT}]}).json()
    assert batch["results"][0]["category"] is None and batch["risk_of"] == one["risk_of"]
    form = {"api_key": api.score_key, **{f"f.{k}": str(int(v) if isinstance(v, bool) else v)
                                         for k, v in PATIENT.items()}}
    page = api.client.post("/calculator", data=form)
    assert page.status_code == 200 and "No risk category" in page.text
    assert "Ever reported CHD or MI (no time horizon)" in page.text
    frame = pd.DataFrame([PATIENT])
    assert score_frame(prevalent, frame)["category"].tolist() == [""]
    assert score_frame(logistic, frame)["category"].tolist()[0] in RISK_CATEGORIES


def test_weights_that_do_not_fit_the_card_are_refused_by_name(logistic: RiskModel) -> None:
    # A logistic model is checked with NumPy (no PyTorch), as the network would be.
    n = logistic.n_columns
    wrong = {**logistic.weights, "linear.weight": np.zeros((1, n + 1), np.float32)}
    with pytest.raises(ConfigurationError, match=rf"A logistic model of {n} columns has "
                                                 rf"weights .*; got .*\(1, {n + 1}\)"):
        RiskModel(card=logistic.card, weights=wrong, preprocessor=logistic.preprocessor)


def test_huge_numbers_and_batch_units_are_named(api: Api) -> None:
    r = api.post("/v1/risk", {"features": {**PATIENT, "age": 10**309}})
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == "features.age"
    assert "is not a finite number; the plausible range is [18, 110] years" in \
        r.json()["errors"][0]["message"]
    batch = api.post("/v1/risk/batch", {"patients": [
        {"features": PATIENT}, {"features": PATIENT, "units": {"weight": "kg"}}]})
    assert batch.json()["errors"] == [{"field": "patients[1].units.weight",
                                       "message": "names no input of this model"}]


def test_key_settings_and_duplicates_name_the_problem(api: Api) -> None:
    from cardiofed.exceptions import Conflict

    with api.sessions() as db:
        with pytest.raises(ConfigurationError, match="'rate_limit_per_minute' parameter must "
                                                     "be >= 1; got 0"):
            create_key(db, "x", ["score"], 0)
        with pytest.raises(ConfigurationError, match="'name' parameter must have 1 to 64 "
                                                     "characters; got ''"):
            create_key(db, "", ["score"])
        with pytest.raises(Conflict, match="An API key named 'partner' already exists."):
            create_key(db, "partner", ["score"])


def test_registry_errors_name_the_version(tmp_path: Path, logistic: RiskModel) -> None:
    from cardiofed.exceptions import Conflict, NotFound

    with session_factory(f"sqlite:///{tmp_path}/r.db")() as db:
        with pytest.raises(NotFound, match="No model is promoted yet; promote one with "
                                           "`cardiofed models promote VERSION`."):
            registry.promoted_version(db)
        registry.register(db, logistic, number=3)
        with pytest.raises(Conflict, match="Model version 'demo-v3' is already registered."):
            registry.register(db, logistic, number=3)
        with pytest.raises(NotFound, match="No model version 'demo-v9' in the registry."):
            registry.promote(db, "demo-v9")


def test_model_files_and_registration_refuse_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=f"Model file {tmp_path}/none.safetensors "
                                                  "does not exist."):
        RiskModel.load(tmp_path / "none.safetensors")
    data = synthetic_federation(n_sites=3, seed=1, size_scale=0.2)
    result = run_experiment(data, SimulationConfig.create(
        rounds=1, eval_every=0, standardisation="per-site"), baselines=False)
    with pytest.raises(ConfigurationError, match="Only models trained with global "
                                                 "standardisation can be registered"):
        provenance.from_experiment(result, study="x", feature_names=data.feature_names,
                                   outcome=data.outcome)


def test_predict_file_names_each_bad_input(tmp_path: Path, logistic: RiskModel) -> None:
    from cardiofed.data.mapping import ColumnMapping, LabelMapping, SiteMapping

    out = tmp_path / "out.csv"
    with pytest.raises(DataValidationError, match=f"Input file {tmp_path}/none.csv does not "
                                                  "exist."):
        predict_file(logistic, tmp_path / "none.csv", out)
    csv = tmp_path / "in.csv"
    pd.DataFrame([PATIENT]).to_csv(csv, index=False)
    with pytest.raises(ConfigurationError, match="has no recalibration for site 'nowhere' "
                                                 r"\(it has \['"):
        predict_file(logistic, csv, out, site="nowhere")
    with pytest.raises(DataValidationError, match=r"no column 'id' \(it has \['age'"):
        predict_file(logistic, csv, out, id_column="id")
    partial = SiteMapping(site="x", outcome="cvd_10y", label=LabelMapping(column="y"),
                          columns={"age": ColumnMapping(source="age")})
    with pytest.raises(DataValidationError, match="The mapping has no column for the model's "
                                                  r"features \['bp_treated'"):
        predict_file(logistic, csv, out, mapping=partial)
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(PATIENT) + "\n")
    with pytest.raises(DataValidationError, match="empty.csv has no data rows."):
        predict_file(logistic, empty, out)


def test_predict_cli_counts_the_rows_it_did_not_score(tmp_path: Path,
                                                      logistic: RiskModel) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    model_file, _ = logistic.save(tmp_path / "m.safetensors")
    csv = tmp_path / "in.csv"
    pd.DataFrame([PATIENT, {**PATIENT, "age": None}, PATIENT]).to_csv(csv, index=False)
    out = tmp_path / "out.csv"
    args = ["predict", str(csv), "--model", str(model_file), "--out", str(out)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "1 of 3 rows (33.3%) cannot be scored" in refused.output
    result = CliRunner().invoke(app, [*args, "--max-rejected", "0.5"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Scored 2 of 3 rows" in result.output and "1 rows not scored" in result.output


def test_promotion_is_in_the_admin_audit_log(api: Api) -> None:
    from cardiofed.store import AuditEvent

    r = api.client.post(f"/v1/models/{api.version}/promote",
                        headers={"Authorization": f"Bearer {api.admin_key}"})
    assert r.status_code == 200, r.text
    with api.sessions() as db:
        events = db.query(AuditEvent).all()
    assert [(e.action, e.detail, e.study_id) for e in events] == [
        ("promote model", api.version, "demo")]
    assert events[0].actor == "API key admin (risk API)"


@pytest.mark.parametrize("path", ["/v1/risk", "/v1/risk/batch"])
def test_a_60_kb_site_is_refused_without_being_echoed(api: Api, path: str) -> None:
    # Issue 29: the risk API echoed a 60 KB `site` back.
    site = "x" * 60_000
    body: dict[str, object] = ({"features": PATIENT, "site": site} if path == "/v1/risk"
                               else {"patients": [{"features": PATIENT}], "site": site})
    r = api.post(path, body)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "site"
    assert len(r.content) < 2_000 and site[:100] not in r.text
