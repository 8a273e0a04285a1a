"""A study's own features and outcome: declared once, used by mapping, training, the model
card and the risk API; a survey export trains with all its predictors, unedited."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from survey_export import EXAMPLES, write_survey_sites

from cardiofed.data.mapping import SiteMapping, harmonise
from cardiofed.data.sites import federation_from_csv
from cardiofed.data.study_features import StudyFeatures
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.schema import CATALOGUE
from cardiofed.serving import provenance
from cardiofed.serving.model import RiskModel
from cardiofed.serving.patient_input import PatientErrors
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, POOLED_TEST, run_experiment

BUILT_IN = ["age", "sex", "bmi", "current_smoker", "diabetes", "prevalent_stroke"]


@pytest.fixture(scope="module")
def declared() -> StudyFeatures:
    return StudyFeatures.from_toml(EXAMPLES / "features.toml")


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    folder = tmp_path_factory.mktemp("survey")
    return write_survey_sites(folder, {"survey_a": (1800, 1.0), "survey_b": (1200, 0.0),
                                       "survey_c": (700, -1.0), "survey_d": (400, -1.5)},
                              seed=0)


def test_the_declaration_extends_the_built_in_catalogue(declared: StudyFeatures) -> None:
    catalogue = declared.catalogue()
    assert set(CATALOGUE.features) < set(catalogue.features)
    health = catalogue.feature("general_health")
    assert health.kind == "ordinal" and health.encoded_range() == (0.0, 4.0)
    assert catalogue.encoded_names(["race"]) == [
        "race=black", "race=asian", "race=american indian/alaskan native", "race=hispanic",
        "race=other"]
    assert catalogue.outcomes["heart_disease_ever"].horizon_years is None
    assert "general_health" not in CATALOGUE.features  # the built-in one is untouched


@pytest.mark.parametrize(("declaration", "message"), [
    ({"features": {"age": {"kind": "binary"}}}, "'age' is built in"),
    ({"features": {"Sleep": {"kind": "binary"}}}, "must be lower-case"),
    ({"features": {"x": {"kind": "continuous", "low": 5, "high": 1}}}, "low < high"),
    ({"features": {"x": {"kind": "ordinal", "levels": ["a", "A"]}}}, "two distinct levels"),
    ({"features": {"x": {"kind": "binary", "levels": ["a", "b"]}}}, "binary feature has no"),
    ({"features": {"x": {"kind": "ordinal", "levels": ["a", "b"], "unit": "kg"}}}, "no unit"),
    ({"features": {"x": {"kind": "continuous", "low": 0, "high": 9, "log_scale": True}}},
     "positive lower end"),
    ({"outcome": {"name": "chd_10y", "description": "x"}}, "'chd_10y' is built in"),
    ({"features": {"x": {"kind": "binary", "colour": "red"}}}, "colour"),
])
def test_declarations_are_validated_with_the_name_and_the_reason(
        tmp_path: Path, declaration: dict[str, object], message: str) -> None:
    import json

    path = tmp_path / "f.toml"
    # TOML from JSON-compatible dicts: tables of inline tables.
    lines = []
    for section, body in declaration.items():
        if section == "outcome":
            lines.append("[outcome]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in body.items()]  # type: ignore[union-attr]
        else:
            for name, spec in body.items():  # type: ignore[union-attr]
                lines.append(f"[features.{json.dumps(name)}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigurationError, match=message):
        StudyFeatures.from_toml(path)


def test_the_mapping_reads_bands_levels_and_the_declared_outcome(
        declared: StudyFeatures, survey: tuple[list[Path], list[Path]]) -> None:
    csvs, mappings = survey
    catalogue = declared.catalogue()
    mapping = SiteMapping.from_toml(mappings[0], catalogue)
    raw = pd.read_csv(csvs[0], dtype=str, keep_default_na=False)
    site = harmonise(raw, mapping)
    assert site.report.invalid_set_missing == dict.fromkeys(mapping.columns, 0)
    assert set(site.frame["age"]) <= {21, 27, 32, 37, 42, 47, 52, 57, 62, 67, 72, 77, 85}
    assert set(site.frame["general_health"]) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert site.frame["race"].isin(catalogue.feature("race").codes).all()
    # Without the study's declaration the mapping names an unknown outcome and features.
    with pytest.raises(DataValidationError, match="'heart_disease_ever' is not a known "
                                                  "outcome"):
        SiteMapping.from_toml(mappings[0])


def test_codes_on_a_numeric_feature_must_be_numbers() -> None:
    with pytest.raises(DataValidationError, match="codes of a numeric feature map local "
                                                  "values to numbers"):
        SiteMapping.from_dict({"site": "s", "outcome": "chd_10y", "label": {"column": "y"},
                               "columns": {"age": {"source": "a", "codes": {"old": "senior"}}}})


@pytest.fixture(scope="module")
def trained(declared: StudyFeatures, survey: tuple[list[Path], list[Path]]
            ) -> dict[str, object]:
    csvs, mappings = survey
    config = SimulationConfig.create(rounds=15, seed=0, eval_every=0, study_features=declared)
    catalogue = config.catalogue()
    everything = federation_from_csv(csvs, mappings, catalogue=catalogue)
    built_in = federation_from_csv(csvs, mappings, features=BUILT_IN, catalogue=catalogue)
    return {"all": everything, "built_in": built_in, "config": config,
            "all_result": run_experiment(everything, config, baselines=False),
            "built_in_result": run_experiment(built_in, config, baselines=False)}


def test_a_survey_trains_with_all_its_predictors_and_gains_from_them(
        trained: dict[str, object]) -> None:
    everything, result = trained["all"], trained["all_result"]
    assert len(everything.sites) == 4  # type: ignore[attr-defined]
    features = [f for f in dict.fromkeys(n.split("=")[0]
                                         for n in everything.feature_names)]  # type: ignore[attr-defined]
    assert len(features) == 17 and set(BUILT_IN) < set(features)
    all_auc = result.metrics[POOLED_TEST][FEDERATED]["auc"]  # type: ignore[attr-defined]
    built_in_auc = trained["built_in_result"].metrics[POOLED_TEST][FEDERATED]["auc"]  # type: ignore[attr-defined]
    assert all_auc > built_in_auc + 0.02


def test_the_card_carries_the_declaration_and_the_api_validates_against_it(
        trained: dict[str, object], survey: tuple[list[Path], list[Path]],
        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    survey_files = survey
    everything, result = trained["all"], trained["all_result"]
    model = provenance.from_experiment(result, study="survey",  # type: ignore[arg-type]
                                       feature_names=everything.feature_names,  # type: ignore[attr-defined]
                                       outcome="heart_disease_ever")
    assert model.card.study_features == trained["config"].study_features  # type: ignore[attr-defined]
    assert model.card.outcome_description.startswith("Ever reported coronary heart disease")
    path, _ = model.save(tmp_path / "survey.safetensors")
    again = RiskModel.load(path)
    patient = {"age": 67, "sex": "male", "bmi": 31.0, "current_smoker": True,
               "diabetes": False, "prevalent_stroke": False, "alcohol_heavy": False,
               "physical_health_days": 4, "mental_health_days": 0,
               "difficulty_walking": False, "race": "White", "physical_activity": True,
               "general_health": "Fair", "sleep_hours": 6, "asthma": False,
               "kidney_disease": False, "skin_cancer": False}
    row, _ = again.encode_patient(patient)
    poor, _ = again.encode_patient({**patient, "general_health": "poor"})
    assert float(again.risk(poor[None])[0]) > float(again.risk(row[None])[0])
    with pytest.raises(PatientErrors) as bad:
        again.encode_patient({**patient, "general_health": "awful", "sleep_hours": 30})
    fields = dict(bad.value.problems)
    assert "must be one of excellent, very good, good, fair, poor" in \
        fields["features.general_health"]
    assert "outside the plausible range [1, 24] hours" in fields["features.sleep_hours"]
    np.testing.assert_allclose(again.risk(row[None]), model.risk(row[None]))
    # Offline scoring of a site's own export reads its mapping with the card's
    # declarations (the mapping names the study's outcome and features).
    csvs, mappings = survey_files
    out = tmp_path / "risks.csv"
    scored = CliRunner().invoke(app, ["predict", str(csvs[0]), "--model", str(path),
                                      "--mapping", str(mappings[0]), "--out", str(out),
                                      "--max-rejected", "0.5"])
    assert scored.exit_code == 0, scored.output
    assert len(pd.read_csv(out)) > 0


def test_a_networked_study_carries_its_declaration_to_every_node(
        declared: StudyFeatures, survey: tuple[list[Path], list[Path]], tmp_path: Path) -> None:
    """Coordinator and nodes in-process: the plan holds the declaration, each node reads its
    own unedited survey export with it, and the final card names the study's outcome."""
    from fastapi.testclient import TestClient

    from cardiofed.coordinator import administration
    from cardiofed.coordinator.app import create_app
    from cardiofed.coordinator.deps import app_settings
    from cardiofed.coordinator.settings import CoordinatorSettings
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig
    from cardiofed.serving import registry
    from cardiofed.store import session_factory

    csvs, mappings = survey
    settings = CoordinatorSettings(database_url=f"sqlite:///{tmp_path}/c.db", long_poll_s=0)
    app = create_app()
    app.dependency_overrides[app_settings] = lambda: settings
    client = TestClient(app)
    with session_factory(settings.database_url)() as db:
        admin = administration.create_admin_key(db)
    plan = SimulationConfig.create(rounds=2, seed=0, study_features=declared)
    features = list(SiteMapping.from_toml(mappings[0], plan.catalogue()).columns)
    names = plan.catalogue().encoded_names(features)
    sites = [p.stem for p in csvs[:2]]
    created = client.post("/v1/studies", headers={"Authorization": f"Bearer {admin}"}, json={
        "id": "survey", "plan": plan.model_dump(), "sites": sites, "feature_names": names,
        "feature_ranges": plan.catalogue().ranges(names), "outcome": "heart_disease_ever"})
    assert created.status_code == 201, created.text
    tokens = created.json()["enrolment_tokens"]

    def agent(site: str, csv: Path, mapping: Path, **data: str) -> NodeAgent:
        return NodeAgent(NodeConfig.create(
            coordinator_url="http://testserver", state_dir=str(tmp_path / site),
            enrolment_token=tokens[site], poll_wait_s=0, privacy="off",
            data={"csv": str(csv), "mapping": str(mapping), **data}), client=client)

    # The site decides: a node with no feature file of its own refuses the declaration.
    unaware = agent(sites[1], csvs[1], mappings[1])
    unaware.run(max_tasks=1)
    status = client.get("/v1/studies/survey/status",
                        headers={"Authorization": f"Bearer {admin}"}).json()
    assert "declares its own features, and this node's config names no feature file" in \
        json.dumps(status["refusals"])
    agents = [agent(site, csv, mapping, features=str(EXAMPLES / "features.toml"))
              for site, csv, mapping in zip(sites, csvs, mappings, strict=False)]
    for _ in range(10):
        for node in agents:
            node.run(max_tasks=1)
    with session_factory(settings.database_url)() as db:
        card = registry.card(db, "survey-v2")
    assert card["outcome"] == "heart_disease_ever"
    assert card["study_features"]["features"]["general_health"]["kind"] == "ordinal"
    assert set(card["metrics"]) == set(sites)  # the refusal cost survey_b only round 0


def test_the_readme_commands_on_the_shipped_example_exports_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    readme = (EXAMPLES.parents[1] / "docs" / "simulation.md").read_text()
    block = readme[readme.index("cd examples/survey"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    commands = [line.split()[1:] for line in block.splitlines()
                if line.startswith("cardiofed ")]
    assert [c[0] for c in commands] == ["check", "simulate"]
    monkeypatch.chdir(EXAMPLES)
    for command in commands:
        extra = ["--out", str(tmp_path / "report")] if command[0] == "simulate" else []
        result = CliRunner().invoke(app, [*command, *extra], env={"COLUMNS": "100"})
        assert result.exit_code == 0, result.output
