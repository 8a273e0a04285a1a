"""The in-process simulator: configuration, federated rounds and the full experiment."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    FEDERATED,
    FINETUNED,
    LOCAL,
    POOLED,
    POOLED_TEST,
    RECALIBRATED,
    TRUE_RISK,
    run_experiment,
)
from cardiofed.simulation.prepare import PreparedSite, prepare_federation
from cardiofed.simulation.runner import run_federated, train_centralised
from cardiofed.training.personalise import PROXIMAL_GRID


@pytest.fixture(scope="module")
def prepared(small_federation: FederatedDataset) -> list[PreparedSite]:
    return prepare_federation(small_federation, "global")


# --- Configuration --------------------------------------------------------------------------

def test_rounds_must_be_at_least_one() -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "Invalid simulation config: the 'rounds' parameter must be greater than or equal "
            "to 1; got 0.")):
        SimulationConfig.create(rounds=0)


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"lr": -1.0}, "the 'lr' parameter must be greater than 0; got -1.0"),
    ({"fraction_fit": 1.5}, "the 'fraction_fit' parameter must be less than or equal to 1; "
                            "got 1.5"),
    ({"algorithm": "fedsgd"}, "the 'algorithm' parameter must be 'fedavg', 'fedprox', "
                              "'fedadam', 'fedyogi' or 'scaffold'; got 'fedsgd'"),
    ({"standardisation": "x"}, "the 'standardisation' parameter must be 'global' or "
                               "'per-site'; got 'x'"),
    ({"colour": "red"}, "unknown setting 'colour'"),
])
def test_invalid_settings_name_parameter_and_value(settings: dict[str, object],
                                                   fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(fragment)):
        SimulationConfig.create(**settings)


def test_every_invalid_setting_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "Invalid simulation config: the 'lr' parameter must be greater than 0; got -1; "
            "the 'fraction_fit' parameter must be less than or equal to 1; got 1.5.")):
        SimulationConfig.create(lr=-1, fraction_fit=1.5)


def test_config_from_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text('algorithm = "fedprox"\nproximal_mu = 0.1\nrounds = 3\nlr = 0.2\n')

    config = SimulationConfig.from_toml(path, rounds=7)

    assert (config.algorithm, config.proximal_mu, config.rounds, config.lr) == (
        "fedprox", 0.1, 7, 0.2)
    algorithm = config.make_algorithm()
    assert algorithm.local.proximal_mu == 0.1
    assert algorithm.local.lr == 0.2


def test_config_from_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            f"Config file {tmp_path / 'absent.toml'} does not exist.")):
        SimulationConfig.from_toml(tmp_path / "absent.toml")

    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = \n")
    with pytest.raises(ConfigurationError, match=re.escape(
            f"Config file {bad} is not valid TOML:")):
        SimulationConfig.from_toml(bad)

    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epochs = 3\n")
    with pytest.raises(ConfigurationError, match=re.escape(
            "Invalid simulation config: unknown setting 'epochs'.")):
        SimulationConfig.from_toml(unknown)


# --- Federated rounds -------------------------------------------------------------------------

def test_run_federated_is_deterministic_by_seed(prepared: list[PreparedSite]) -> None:
    config = SimulationConfig.create(rounds=3, local_steps=5, seed=0)

    first = run_federated(prepared, config)
    again = run_federated(prepared, config)
    other = run_federated(prepared, SimulationConfig.create(rounds=3, local_steps=5, seed=1))

    for k in first.weights:
        np.testing.assert_array_equal(first.weights[k], again.weights[k])
    assert first.history == again.history
    assert any(not np.array_equal(first.weights[k], other.weights[k]) for k in first.weights)


def test_history_records_pooled_auc_every_round(prepared: list[PreparedSite]) -> None:
    run = run_federated(prepared, SimulationConfig.create(rounds=3, local_steps=5))

    assert [h["round"] for h in run.history] == [1.0, 2.0, 3.0]
    for record in run.history:
        assert 0.0 <= record["pooled_auc"] <= 1.0
        assert record["train_loss"] > 0
        assert {f"auc/{s.name}" for s in prepared} <= set(record)


@pytest.mark.parametrize(("rounds", "eval_every", "recorded"), [
    (5, 2, [2.0, 4.0, 5.0]),  # every 2nd round and always the last
    (4, 0, [4.0]),            # 0: only after the last round
])
def test_eval_every(prepared: list[PreparedSite], rounds: int, eval_every: int,
                    recorded: list[float]) -> None:
    config = SimulationConfig.create(rounds=rounds, eval_every=eval_every, local_steps=1)

    run = run_federated(prepared, config)

    assert [h["round"] for h in run.history] == recorded


def test_fraction_fit_samples_a_subset_each_round(prepared: list[PreparedSite]) -> None:
    # 4 sites x 0.5 = 2 sites per round.
    config = SimulationConfig.create(rounds=6, fraction_fit=0.5, local_steps=1)
    calls: list[int] = []

    run = run_federated(prepared, config, on_round=lambda rnd, _: calls.append(rnd))

    assert calls == [1, 2, 3, 4, 5, 6]
    assert set(run.participation) == {s.name for s in prepared}
    assert sum(run.participation.values()) == 2 * 6
    assert all(0 <= n <= 6 for n in run.participation.values())
    assert min(run.participation.values()) < 6  # not everyone every round


def test_full_participation_counts_every_round(prepared: list[PreparedSite]) -> None:
    run = run_federated(prepared, SimulationConfig.create(rounds=2, local_steps=1))

    assert run.participation == {s.name: 2 for s in prepared}


def test_fedavg_on_two_identical_sites_equals_centralised_training() -> None:
    # With full-batch gradient steps both sites compute the same local model, so their
    # average is that model: FedAvg takes exactly the centralised steps on the pooled
    # (duplicated) rows. Exact in exact arithmetic; float32 rounding only (atol 1e-6).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=200) > 0).astype(np.float32)
    identity = Preprocessor(fill=np.zeros(5), mean=np.zeros(5), std=np.ones(5))
    sites = [PreparedSite(name=name, site_type="hospital", x_train=x, y_train=y, x_test=x,
                          y_test=y.astype(np.int64), preprocessor=identity)
             for name in ("a", "b")]
    # batch_size >= 400 makes every step full-batch, at a site and on the pooled rows.
    config = SimulationConfig.create(rounds=10, local_steps=3, batch_size=400, lr=0.1)

    federated = run_federated(sites, config).weights
    centralised = train_centralised(np.concatenate([x, x]), np.concatenate([y, y]), config,
                                    seed=5)

    for k in centralised:
        np.testing.assert_allclose(federated[k], centralised[k], atol=1e-6)
    assert np.abs(federated["linear.weight"]).max() > 0.1  # it did learn something


# --- The full experiment ---------------------------------------------------------------------

@pytest.mark.slow
def test_run_experiment_end_to_end(small_federation: FederatedDataset) -> None:
    config = SimulationConfig.create(rounds=5, seed=0)

    result = run_experiment(small_federation, config)

    sites = [s.name for s in small_federation.sites]
    assert list(result.metrics) == [*sites, POOLED_TEST]
    for by_model in result.metrics.values():
        # The synthetic cohort knows every test patient's true risk: the yardstick.
        assert set(by_model) == {FEDERATED, LOCAL, POOLED, TRUE_RISK}
        for metrics in by_model.values():
            assert {"auc", "accuracy", "brier", "calibration_slope"} <= set(metrics)
    assert set(result.predictions) == set(sites)
    assert len(result.federated.history) == 5
    assert result.site_sizes == {s.name: s.n_train for s in small_federation.sites}
    # A seeded run: the federated model clearly beats chance on the pooled test split.
    assert result.metrics[POOLED_TEST][FEDERATED]["auc"] > 0.6
    rows = result.summary_rows()
    assert [r["site"] for r in rows] == [*sites, POOLED_TEST]
    assert f"{FEDERATED} auc" in rows[0]


def test_personalisation_holds_out_a_calibration_split_at_every_site(
        small_federation: FederatedDataset) -> None:
    config = SimulationConfig.create(rounds=3, seed=0, recalibrate=True, finetune=True,
                                     calibration_fraction=0.3)

    result = run_experiment(small_federation, config)

    for s in small_federation.sites:
        held = result.calibration_sizes[s.name]
        assert held == pytest.approx(0.3 * s.n_train, abs=1)
        prepared = next(p for p in result.sites if p.name == s.name)
        assert prepared.n_train == s.n_train - held  # the federation never saw them
        assert {RECALIBRATED, FINETUNED} <= set(result.predictions[s.name])
        assert result.recalibrations[s.name].reason
        assert result.personalisations[s.name].lam in (math.inf, *PROXIMAL_GRID)
    assert result.headline_model == RECALIBRATED
    assert result.site_sizes == {s.name: s.n_train for s in small_federation.sites}


def test_site_with_one_class_in_its_test_split_gets_nan_auc(
        small_federation: FederatedDataset) -> None:
    site = small_federation.sites[3]
    no_events = dataclasses.replace(site, y_test=np.zeros_like(site.y_test))
    dataset = dataclasses.replace(small_federation,
                                  sites=[*small_federation.sites[:3], no_events])

    result = run_experiment(dataset, SimulationConfig.create(rounds=2, local_steps=2))

    for label in (FEDERATED, LOCAL, POOLED):
        assert math.isnan(result.metrics[site.name][label]["auc"])
        assert not math.isnan(result.metrics[POOLED_TEST][label]["auc"])
    assert math.isnan(result.federated.history[-1][f"auc/{site.name}"])
    assert not math.isnan(result.federated.history[-1]["pooled_auc"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_local_only_models_penalty_is_scikit_learns_neg_log_loss_choice(seed: int) -> None:
    """train_alone's NumPy folds and fits are scikit-learn's ``LogisticRegressionCV``
    with the ``neg_log_loss`` scorer: the same penalty and the same model (scikit-learn
    converged tightly: at its default tolerance its coefficients are 1e-4 off the
    optimum, ours are at it)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from cardiofed.simulation.alone import FOLDS, PENALTY_GRID, train_alone

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150 + 200 * seed, 6))
    y = (rng.random(len(x)) < 1 / (1 + np.exp(1.5 - x[:, 0] - 0.5 * x[:, 1]))).astype(float)
    ours = train_alone(x, y, SimulationConfig.create(), seed=seed)
    reference = LogisticRegressionCV(
        Cs=list(PENALTY_GRID), cv=StratifiedKFold(n_splits=FOLDS, shuffle=True,
                                                  random_state=seed),
        scoring="neg_log_loss", max_iter=5000, solver="newton-cholesky", tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference.fit(x, y.astype(int))
    np.testing.assert_allclose(ours["linear.weight"].ravel(), reference.coef_.ravel(),
                               rtol=1e-5)
    np.testing.assert_allclose(ours["linear.bias"], reference.intercept_, rtol=1e-5)


def test_label_quality_with_fewer_than_three_sites_is_refused_by_name() -> None:
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.exceptions import ConfigurationError
    from cardiofed.simulation.experiment import run_experiment

    data = synthetic_federation(n_sites=2, seed=0, size_scale=0.2)
    with pytest.raises(ConfigurationError, match="label_quality .* needs at least 3 sites; "
                                                 "this federation has 2"):
        run_experiment(data, SimulationConfig.create(rounds=1, label_quality=True))


def test_average_last_ends_with_the_mean_of_the_last_rounds_models(
        prepared: list[PreparedSite]) -> None:
    models: list[dict[str, np.ndarray]] = []
    config = SimulationConfig.create(rounds=5, average_last=3, local_steps=1, stop_patience=None)

    run = run_federated(prepared, config,
                        on_round=lambda _, w: models.append({n: v.copy() for n, v in w.items()}))

    for name, value in run.weights.items():
        np.testing.assert_allclose(value, np.mean([m[name] for m in models[-3:]], axis=0),
                                   rtol=1e-6)
    last = run_federated(prepared, config.model_copy(update={"average_last": 1}))
    for name, value in last.weights.items():
        np.testing.assert_array_equal(value, models[-1][name])


@pytest.mark.parametrize(("settings", "message"), [
    ({"rounds": 4, "average_last": 5}, "average_last (5) averages the last rounds' models; "
                                      "it cannot exceed rounds (4)"),
    ({"rounds": 4, "average_last": 2, "aggregation": "async"},
     "with aggregation = 'async' leave it at 1"),
])
def test_average_last_refusals_name_the_setting(settings: dict[str, object],
                                                message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        SimulationConfig.create(**settings)
