"""The sklearn-style estimator and the command line, end to end on small runs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from typer.testing import CliRunner

from cardiofed.cli import app
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, run_experiment
from cardiofed.training.estimator import RiskEstimator


def _toy(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [10.0, 1.0, 1.0] + [60.0, 0.0, 0.0]
    logit = 0.15 * (x[:, 0] - 60.0) + 1.0 * x[:, 1]
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
    x[rng.random(x.shape) < 0.05] = np.nan
    return x, y


def test_estimator_fit_returns_self_and_learns_the_signal() -> None:
    x, y = _toy()
    est = RiskEstimator(epochs=30, random_state=1)

    assert est.fit(x, y) is est
    proba = est.predict_proba(x)

    assert proba.shape == (len(y), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y, proba[:, 1]) > 0.75  # a clear signal (true AUC about 0.85)
    assert set(np.unique(est.predict(x))) <= {0, 1}


def test_estimator_is_deterministic_by_random_state() -> None:
    x, y = _toy()
    a = RiskEstimator(random_state=3).fit(x, y).predict_proba(x)
    b = RiskEstimator(random_state=3).fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(a, b)


def test_unfitted_estimator_and_bad_input_raise() -> None:
    with pytest.raises(NotFittedError):
        RiskEstimator().predict_proba(np.zeros((1, 3)))
    x, y = _toy()
    est = RiskEstimator(epochs=1).fit(x, y)
    with pytest.raises(ValueError, match=r"X must have shape \(n, 3\); got \(2, 4\)\."):
        est.predict_proba(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="y must contain only 0 and 1"):
        RiskEstimator().fit(x, y + 2)


def test_federated_model_as_estimator_matches_the_simulator() -> None:
    data = synthetic_federation(n_sites=4, seed=2, size_scale=0.3)
    result = run_experiment(data, SimulationConfig.create(rounds=3, seed=2), baselines=False)
    site = data.sites[0]

    est = result.estimator(site.name)

    # The estimator applies the same preprocessing the site used in the federation.
    _, expected = result.predictions[site.name][FEDERATED]
    np.testing.assert_allclose(est.predict_proba(site.x_test)[:, 1], expected, rtol=1e-5)


def test_demo_runs_and_writes_the_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["demo", "--sites", "4", "--rounds", "2", "--out", str(out),
                                      "--eval-size", "2000", "--no-register"],
                                env={"COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    # The story per site type: intervals, the achievable AUC.
    flat = " ".join(result.output.split())
    assert "community (2 sites): federated+recalibrated AUC" in flat
    assert "of the AUC achievable at its sites" in flat
    # At 80 columns, every site's row keeps its name, its verdict and its effective data.
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    at = next(i for i, line in enumerate(lines) if "vs alone" in line and "eff. data" in line)
    assert lines[at].split()[0] == "site"
    for site in ("tier3_01", "tier2_01", "community_01", "community_02"):
        row = next(line for line in lines[at:] if line.split()[:1] == [site])
        assert re.search(r"[+-]\d\.\d{3} (better|worse|n\.s\.)", row), row
    for name in ("index.html", "roc_curves.png", "calibration_curves.png", "auc_per_round.png",
                 "effective_data.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    value = summary["clinical_value"]
    assert value["headline_model"] == "federated+recalibrated"
    assert set(value["effective_data"]) == set(value["sites"])
    # What loading each export did, per site and column, travels with the report.
    assert set(summary["load_reports"]) == set(value["sites"])
    assert "share of the aggregation weight" in (out / "index.html").read_text()
    page = (out / "index.html").read_text()
    # The answer opens the page: verdict, comparison and effective data first of its row.
    assert page.index("What each site gets from the federation") < page.index(
        "<h2>Summary</h2>")
    head = page[page.index("federated+recalibrated verdict"):]
    assert head.index("vs local-only") < head.index("effective data") < head.index("AUC [")


@pytest.mark.parametrize(("options", "label_quality"), [
    ([], True), (["--dp-epsilon", "1"], False)])
def test_demo_switches_exact_releases_off_under_dp(monkeypatch: pytest.MonkeyPatch,
                                                   options: list[str],
                                                   label_quality: bool) -> None:
    # The label-quality check crosses non-private local models between sites and
    # recalibration fits exact per-site updates: with a privacy budget the demo leaves
    # both off (a config with either is refused).
    import cardiofed.cli.experiments as cli

    seen: dict[str, object] = {}

    def run(dataset_name: str, settings: dict[str, object], **_: object) -> None:
        seen.update(settings)
        SimulationConfig.create(**{k: v for k, v in settings.items() if v is not None})

    monkeypatch.setattr(cli, "_run", run)
    result = CliRunner().invoke(app, ["demo", "--rounds", "1", *options])

    assert result.exit_code == 0, result.output
    assert seen["label_quality"] is label_quality
    assert seen["recalibrate"] is label_quality
    assert seen.get("feature_transform") == ("clinical" if label_quality else None)
    assert seen["dp_epsilon"] == (1.0 if options else None)
    assert seen["rounds"] == 1 and seen.get("average_last") == (1 if options else None)


def test_the_dp_demo_averages_the_last_half_of_its_rounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import cardiofed.cli.experiments as cli

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(cli, "_run", lambda _, settings, **__: seen.append(settings))
    for rounds in ([], ["--rounds", "9"]):
        assert CliRunner().invoke(app, ["demo", "--dp-epsilon", "1", *rounds]).exit_code == 0

    assert [(s["rounds"], s["average_last"]) for s in seen] == [(40, 20), (9, 4)]


def test_simulate_reports_invalid_settings_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["simulate", "--dataset", "synthetic", "--rounds", "0",
                                      "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "the 'rounds' parameter must be greater than or equal to 1; got 0" in result.output


def test_simulate_average_last_beyond_the_rounds_is_refused_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["simulate", "--rounds", "3", "--average-last", "4",
                                      "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "average_last (4) averages the last rounds' models; it cannot exceed rounds (3)" \
        in " ".join(result.output.split())


def test_simulate_unknown_dataset_names_the_choices(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["simulate", "--dataset", "mimic", "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "The 'dataset' parameter must be one of" in result.output
    assert "got 'mimic'" in result.output


def test_simulate_with_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "settings.toml"
    config.write_text('algorithm = "fedyogi"\nrounds = 2\nserver_lr = 0.03\n')
    result = CliRunner().invoke(app, ["simulate", "--dataset", "synthetic", "--config",
                                      str(config), "--out", str(tmp_path / "r"),
                                      "--no-effective-data"])  # the demo's test runs it

    assert result.exit_code == 0, result.output
    assert "fedyogi" in result.output  # the progress bar names the algorithm
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "clinical_value" in summary


def test_torch_threads_default_to_one_and_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cardiofed.exceptions import ConfigurationError
    from cardiofed.models.networks import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("CARDIOFED_TORCH_THREADS", raising=False)
        assert set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CARDIOFED_TORCH_THREADS", "2")
        assert set_threads() == 2
        monkeypatch.setenv("CARDIOFED_TORCH_THREADS", "many")
        with pytest.raises(ConfigurationError, match="CARDIOFED_TORCH_THREADS.*'many'"):
            set_threads()
    finally:
        torch.set_num_threads(before)


def test_demo_refuses_a_networked_study_name_before_training(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The quick-start's coordinator database holds a networked study named "demo".
    from cardiofed.simulation import experiment
    from cardiofed.store import Study, session_factory

    url = f"sqlite:///{tmp_path}/coordinator.db"
    with session_factory(url)() as db:
        db.add(Study(id="demo", plan={}, feature_names=[], feature_ranges=[], min_sites=1,
                     round_timeout_s=60.0))
        db.commit()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before the name was checked")

    monkeypatch.setattr(experiment, "run_experiment", never)
    result = CliRunner().invoke(app, ["demo", "--rounds", "1", "--db", url])
    assert result.exit_code != 0
    assert "networked study's name" in " ".join(result.output.split())
