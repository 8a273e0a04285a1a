"""A federated Cox model served: the risk API, offline scoring and the model file give its
risk by the card's horizon."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_serving import PATIENT, Api  # type: ignore[import-not-found]
from typer.testing import CliRunner

from cardiofed.cli import app
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.serving.model import RiskModel
from cardiofed.serving.survival import cox_risk_model
from cardiofed.simulation.survival import fit_federated_cox


@pytest.fixture(scope="module")
def fitted():  # type: ignore[no-untyped-def]
    data = synthetic_federation(n_sites=4, survival=True, size_scale=0.3, seed=5)
    model = fit_federated_cox(data)
    return data, model, cox_risk_model(model, data, study="survival", horizon=10.0)


def test_the_served_risk_is_the_cox_models_risk_by_the_horizon(fitted) -> None:  # type: ignore[no-untyped-def]
    data, model, served = fitted
    x = data.sites[0].x_test[:50]
    assert np.abs(served.risk(x) - model.risk(x, 10.0)).max() < 1e-12
    again = RiskModel.from_bytes(served.to_bytes())
    assert np.abs(again.risk(x) - model.risk(x, 10.0)).max() < 1e-12
    assert (served.card.model, served.card.link, served.card.horizon_years) == (
        "cox", "cloglog", 10.0)
    explained = served.explain(x)
    assert np.allclose(explained.baseline + explained.contributions.sum(axis=1),
                       explained.logit, atol=1e-12)
    five = cox_risk_model(model, data, study="survival", horizon=5.0)
    assert (five.risk(x) < served.risk(x)).all() and not five.categorised
    assert served.categorised  # risk bands are defined for 10 years


def test_a_card_must_say_how_its_risk_is_made(fitted) -> None:  # type: ignore[no-untyped-def]
    _, _, served = fitted
    with pytest.raises(ConfigurationError, match="link"):
        served.with_card(link="logit")
    with pytest.raises(ConfigurationError, match="horizon_years"):
        served.with_card(horizon_years=None)
    stratified = fit_federated_cox(fitted[0], stratified=True)
    with pytest.raises(ConfigurationError, match="name the site to serve"):
        cox_risk_model(stratified, fitted[0], study="s")
    with pytest.raises(ConfigurationError, match="leave 'site' out"):
        cox_risk_model(fitted[1], fitted[0], study="s", site="tier3_01")


def test_a_stratified_model_is_served_per_site_on_its_own_baseline(fitted) -> None:  # type: ignore[no-untyped-def]
    data = fitted[0]
    stratified = fit_federated_cox(data, stratified=True)
    for site in data.sites[:2]:
        served = cox_risk_model(stratified, data, study="s", site=site.name)
        x = site.x_test[:40]
        np.testing.assert_allclose(served.risk(x), stratified.risk(x, 10.0, site.name),
                                   atol=1e-12)
        assert served.card.study == f"s-{site.name}" and served.card.settings["stratified"]


def test_the_risk_api_and_predict_score_a_cox_model(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, served = fitted
    api = Api(tmp_path, served)
    r = api.post("/v1/risk", {"features": PATIENT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["risk"] == pytest.approx(-math.expm1(-math.exp(body["logit"])), abs=1e-12)
    row, _ = served.encode_patient(PATIENT)
    assert body["risk"] == pytest.approx(float(served.risk(row[None])[0]), abs=1e-12)
    assert "10-year horizon" in body["risk_of"] and body["category"] is not None
    assert body["attribution"].startswith("exact (Cox model")
    path, _ = served.save(tmp_path / "cox.safetensors")
    patients = pd.DataFrame([{k: int(v) if isinstance(v, bool) else v
                              for k, v in PATIENT.items()}] * 3)
    patients.to_csv(tmp_path / "patients.csv", index=False)
    out = tmp_path / "risks.csv"
    done = CliRunner().invoke(app, ["predict", str(tmp_path / "patients.csv"), "--model",
                                    str(path), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert pd.read_csv(out)["risk"].to_numpy() == pytest.approx([body["risk"]] * 3,
                                                                abs=1e-12)


def test_the_calculator_names_a_cox_models_scale(fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, served = fitted
    api = Api(tmp_path, served)
    form = {"api_key": api.score_key, **{f"f.{k}": str(int(v) if isinstance(v, bool) else v)
                                         for k, v in PATIENT.items()}}
    page = api.client.post("/calculator", data=form)
    assert page.status_code == 200, page.text
    assert "log cumulative hazard" in page.text and "10-year horizon" in page.text


SURVEY = Path(__file__).resolve().parents[1] / "examples" / "survey"


def test_the_survival_command_fits_judges_and_writes_a_model(tmp_path: Path) -> None:
    import json

    result = CliRunner().invoke(app, ["survival", "--sites", "4", "--out", str(tmp_path)],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    report = json.loads((tmp_path / "survival.json").read_text())
    assert set(report["sites"]) <= {"tier3_01", "tier2_01", "community_01", "community_02"}
    assert all(s["verdict"] in ("acceptable", "insufficient evidence", "not acceptable")
               for s in report["sites"].values())
    # The page answers each site first: its verdict beside Uno's C and calibration.
    page = (tmp_path / "index.html").read_text()
    assert page.index("Each site's answer") < page.index("The model: Cox")
    for site, judged in report["sites"].items():
        row = page[page.index(f"<tr><td>{site}</td>"):]
        row = row[:row.index("</tr>")]
        assert f"{judged['uno_c']:.3f}" in row and judged["verdict"] in row
    model = RiskModel.load(tmp_path / "cox.safetensors")
    assert (model.card.model, model.card.horizon_years) == ("cox", 10.0)
    exports = ["survival", "--csv", str(SURVEY / "site_a.csv"), "--mapping",
               str(SURVEY / "site_a.toml"), "--csv", str(SURVEY / "site_b.csv"),
               "--mapping", str(SURVEY / "site_b.toml"), "--features",
               str(SURVEY / "features.toml")]
    refusals = {
        "go together": ["survival", "--csv", str(SURVEY / "site_a.csv")],
        "goes with them": ["survival", "--features", str(SURVEY / "features.toml")],
        "follow_up": [*exports, "--no-label-check"],
        "3 sites or more": exports,
    }
    for message, args in refusals.items():
        bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path)],
                                 env={"COLUMNS": "200"})
        assert bad.exit_code != 0 and message in " ".join(bad.output.split()), (
            message, bad.output)


def _survival_export(folder: Path, site: str, seed: int, follow_up: bool = True) -> tuple[Path,
                                                                                           Path]:
    """A small survival export and its mapping: older patients are treated more often
    and have more events; treatment halves the hazard."""
    rng = np.random.default_rng(seed)
    n = 400
    age = rng.uniform(40, 75, n)
    treated = rng.random(n) < 1 / (1 + np.exp(-(age - 57) / 6))
    hazard = 0.02 * np.exp((age - 57) / 10) * np.where(treated, 0.5, 1.0)
    event_time, end = rng.exponential(1 / hazard), rng.uniform(2, 12, n)
    frame = pd.DataFrame({"AGE": np.round(age), "SEX": rng.choice(["M", "F"], n),
                          "TREATED": treated.astype(int),
                          "EVENT": (event_time <= end).astype(int),
                          "FU_DAYS": np.ceil(np.minimum(event_time, end) * 365.25)})
    csv = folder / f"{site}.csv"
    frame.to_csv(csv, index=False)
    mapping = folder / f"{site}.toml"
    mapping.write_text(f'site = "{site}"\noutcome = "cvd_10y"\n'
                       '[label]\ncolumn = "EVENT"\n'
                       + ('[follow_up]\ncolumn = "FU_DAYS"\nunit = "days"\n' if follow_up
                          else "")
                       + '[columns.age]\nsource = "AGE"\n'
                       '[columns.sex]\nsource = "SEX"\ncodes = { M = "male", F = "female" }\n'
                       '[columns.bp_treated]\nsource = "TREATED"\n')
    return csv, mapping


def test_attribution_of_a_time_to_event_outcome_on_exports(tmp_path: Path) -> None:
    import json

    from cardiofed.causal.sources import export_sites, export_survival_site
    from cardiofed.causal.survival import survival_effect

    files = [_survival_export(tmp_path, f"site_{k}", k) for k in range(3)]
    exports = [arg for csv, mapping in files for arg in ("--csv", str(csv), "--mapping",
                                                         str(mapping))]
    analysis = ["--treatment", "bp_treated", "--covariate", "age", "--covariate", "sex",
                "--estimand", "ATE", "--horizon", "5", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["attribution", *exports, *analysis],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    report = json.loads((tmp_path / "out" / "attribution_survival.json").read_text())
    sites, _ = export_sites([c for c, _ in files], [m for _, m in files],
                            treatment="bp_treated", covariates=["age", "sex"],
                            build=export_survival_site)
    expected = survival_effect(sites, horizon=5.0)
    assert report["difference"] == pytest.approx(expected.difference, abs=1e-12)
    assert report["hazard_ratio"] < 1  # treatment halves the hazard, adjusted for age
    plain = _survival_export(tmp_path, "plain", 9, follow_up=False)
    refusals = {
        "has no [follow_up]": ["attribution", *exports, "--csv", str(plain[0]), "--mapping",
                               str(plain[1]), *analysis],
        "one --method, iptw or overlap": ["attribution", *exports, *analysis, "--method",
                                          "matching"],
        "go with --csv": ["attribution", "--horizon", "5"],
    }
    for message, args in refusals.items():
        bad = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert bad.exit_code != 0 and message in " ".join(bad.output.split()), (
            message, bad.output)


def test_a_horizon_before_any_event_is_refused(fitted) -> None:  # type: ignore[no-untyped-def]
    data, model, _ = fitted
    with pytest.raises(ConfigurationError, match="No event before"):
        cox_risk_model(model, data, study="s", horizon=float(model.grid[0]) / 2)


def test_the_survival_command_writes_one_model_per_site_when_stratified(
        tmp_path: Path) -> None:
    import json

    result = CliRunner().invoke(app, ["survival", "--sites", "4", "--stratified",
                                      "--out", str(tmp_path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "survival.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("cox-*.safetensors"))
    kept = [s for s in ("tier3_01", "tier2_01", "community_01", "community_02")
            if s not in report["excluded"]]
    assert files == sorted(f"cox-{s}.safetensors" for s in kept)
    assert not (tmp_path / "cox.safetensors").exists()
    model = RiskModel.load(tmp_path / files[0])
    assert model.card.settings["stratified"] and model.card.horizon_years == 10.0
