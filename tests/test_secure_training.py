"""DP-FedSGD over secure sums in the simulator: each record's bounded influence, the
ledger's charges at the study's noise, refusals, and a model that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.networks import get_weights, make_model
from cardiofed.privacy.accountant import GaussianEvent
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment, site_privacy
from cardiofed.simulation.prepare import prepare_federation
from cardiofed.simulation.secure_runner import run_secure_sgd
from cardiofed.training.clipped import clipped_gradient_sum, sensitivity, unflatten


def test_without_clipping_the_sum_is_the_log_loss_gradient() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), (rng.random(50) < 0.3).astype(float)
    model = make_model("logistic", 4, seed=1)
    weights = get_weights(model)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(torch.from_numpy(x).float()), torch.from_numpy(y).float(), reduction="sum")
    loss.backward()
    expected = np.concatenate([model.linear.weight.grad.numpy().ravel(),
                               model.linear.bias.grad.numpy()])
    np.testing.assert_allclose(clipped_gradient_sum(weights, x, y, clip=1e6), expected,
                               rtol=1e-4, atol=1e-5)
    assert unflatten(expected, weights)["linear.weight"].shape == (1, 4)


@settings(max_examples=150, deadline=None)
@given(x=arrays(np.float64, (12, 3), elements=st.floats(-1e3, 1e3)),
       y=arrays(np.float64, 12, elements=st.sampled_from([0.0, 1.0])),
       w=arrays(np.float32, 4, elements=st.floats(-50, 50, width=32)),
       clip=st.floats(0.01, 10), drop=st.integers(0, 11))
def test_one_record_moves_the_sum_by_at_most_the_sensitivity(
        x: np.ndarray, y: np.ndarray, w: np.ndarray, clip: float, drop: int) -> None:
    weights = {"linear.weight": w[:3].reshape(1, 3), "linear.bias": w[3:]}
    keep = np.arange(12) != drop
    moved = np.linalg.norm(clipped_gradient_sum(weights, x, y, clip)
                           - clipped_gradient_sum(weights, x[keep], y[keep], clip))
    assert moved <= sensitivity(clip) * (1 + 1e-9)


def test_a_patients_block_of_person_periods_is_one_record() -> None:
    """Unclipped, the sum over patients' blocks is the log-loss gradient of their rows at
    risk (label -1 rows left out), as bce_loss sums it. (Small hazards, as a survival
    model's are: each patient's intercept part stays within [-1, 1], its bound.)"""
    from cardiofed.models.networks import set_weights
    from cardiofed.survival.discrete import person_periods
    from cardiofed.training.local import bce_loss

    rng = np.random.default_rng(2)
    t, e, x = rng.exponential(5.0, 40) + 0.1, rng.random(40) < 0.4, rng.normal(size=(40, 3))
    inputs, labels = person_periods(t, e, x, np.arange(1.0, 6.0))
    model = make_model("logistic", inputs.shape[2], seed=1)
    set_weights(model, {"linear.weight": rng.normal(0, 0.1, (1, inputs.shape[2])),
                        "linear.bias": np.array([-4.0])})
    bce_loss(model(torch.from_numpy(inputs)), torch.from_numpy(labels),
             reduction="sum").backward()
    expected = np.concatenate([model.linear.weight.grad.numpy().ravel(),
                               model.linear.bias.grad.numpy()])
    np.testing.assert_allclose(clipped_gradient_sum(get_weights(model), inputs, labels, 1e6),
                               expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(x=arrays(np.float64, (8, 4, 3), elements=st.floats(-1e3, 1e3)),
       y=arrays(np.float64, (8, 4), elements=st.sampled_from([-1.0, 0.0, 1.0])),
       w=arrays(np.float32, 4, elements=st.floats(-50, 50, width=32)),
       clip=st.floats(0.01, 10), drop=st.integers(0, 7))
def test_one_patients_block_moves_the_sum_by_at_most_the_sensitivity(
        x: np.ndarray, y: np.ndarray, w: np.ndarray, clip: float, drop: int) -> None:
    """Whatever a patient's rows and labels (any number of intervals, events or none), the
    sum moves by at most the logistic sensitivity when the patient leaves."""
    weights = {"linear.weight": w[:3].reshape(1, 3), "linear.bias": w[3:]}
    keep = np.arange(8) != drop
    moved = np.linalg.norm(clipped_gradient_sum(weights, x, y, clip)
                           - clipped_gradient_sum(weights, x[keep], y[keep], clip))
    assert moved <= sensitivity(clip) * (1 + 1e-9)


def test_a_discrete_time_survival_model_trains_over_secure_sums() -> None:
    """Statistics and every round's gradient sums are secure sums with distributed noise;
    each site's ledger is charged within its budget; without a budget it is refused."""
    from cardiofed.simulation.survival import fit_federated_discrete
    from cardiofed.survival.metrics import uno_c

    data = synthetic_federation(n_sites=4, seed=3, survival=True)
    settings_ = dict(algorithm="fedavg", rounds=60, server_lr=4.0, average_last=30,
                     feature_transform="clinical", stop_patience=None, seed=0,
                     secure_aggregation=True)
    model = fit_federated_discrete(data, SimulationConfig.create(
        **settings_, dp_epsilon=1.0, dp_delta=1e-5))
    assert set(model.epsilon_spent) == {s.name for s in data.sites}
    assert all(0.5 < e <= 1.0 for e in model.epsilon_spent.values())
    site = data.sites[0]
    risk = model.risk(site.x_test, 10.0)
    assert ((risk > 0) & (risk < 1)).all()
    assert uno_c(site.time_test, site.y_test, risk, 10.0) > 0.65  # it learned the risk
    with pytest.raises(ConfigurationError, match="secure_aggregation trains with "
                                                 "distributed DP: set dp_epsilon"):
        fit_federated_discrete(data, SimulationConfig.create(**settings_))


def test_secure_aggregation_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="secure_aggregation in simulation: "
                                                 "dp_epsilon must be set"):
        run_experiment(synthetic_federation(n_sites=3, seed=3, size_scale=0.2),
                       SimulationConfig.create(secure_aggregation=True), baselines=False)
    with pytest.raises(ConfigurationError, match="model must be 'logistic'.*robust_rule needs "
                                                 "secure_group_size"):
        SimulationConfig.create(secure_aggregation=True, dp_epsilon=1.0, model="mlp",
                                robust_rule="median")


@pytest.fixture(scope="module")
def federation():  # type: ignore[no-untyped-def]
    return synthetic_federation(n_sites=6, seed=3, size_scale=0.5)


def test_every_round_is_charged_at_the_studys_noise_within_budget(federation) -> None:  # type: ignore[no-untyped-def]
    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=15,
                                     eval_every=0)
    result = run_experiment(federation, config, baselines=False)
    noise = {p["noise_multiplier"] for p in result.privacy.values()}
    assert len(noise) == 1 and noise.pop() > 1  # one study-wide noise
    for name, spent in result.privacy.items():
        assert spent["epsilon_spent"] <= 1.0 + 1e-9, name
        assert spent["rounds_trained"] == 15
    assert result.federated.history[-1]["pooled_auc"] > 0.62  # it learns (0.5: no model)


def test_a_site_without_budget_sits_out_and_too_few_sites_stop_training(federation) -> None:  # type: ignore[no-untyped-def]
    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=5,
                                     eval_every=0, secure_dropout=0.0)
    privacy = site_privacy(federation, config)
    sites = prepare_federation(federation, privacy=privacy)
    spent = privacy[sites[0].name].ledger
    spent.record([GaussianEvent(noise_multiplier=0.3, sample_rate=1.0, steps=50)],
                 "an earlier study", kind="train", study="earlier")
    run = run_secure_sgd(sites, config, privacy=privacy)
    assert run.refusals[0][:2] == (0, sites[0].name)
    assert "1 sites in the round" not in str(run.refusals)
    assert run.rounds == 1 and run.participation[sites[1].name] == 0
    assert "fewer than the 6 its noise is split over: training stops" in run.refusals[-1][2]


def test_the_report_says_how_a_secure_run_trained(federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.experiments.summary import training_summary

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=3,
                                     eval_every=0)
    result = run_experiment(federation, config, baselines=False)
    assert training_summary(result) == (
        "DP-FedSGD over secure sums: each round one server step on the sites' summed "
        "clipped gradients, the noise split over the sites; ran all 3 planned rounds.")


def test_the_simulate_command_takes_secure_aggregation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cardiofed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--sites", "4", "--rounds", "3",
                                      "--dp-epsilon", "1", "--secure-aggregation",
                                      "--no-effective-data", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "DP-FedSGD over secure sums" in (tmp_path / "r" / "index.html").read_text()
    refused = CliRunner().invoke(app, ["simulate", "--sites", "4", "--secure-aggregation",
                                       "--out", str(tmp_path / "s")])
    assert refused.exit_code != 0
    assert "dp_epsilon must be set" in refused.output


def test_the_demo_takes_secure_aggregation_with_a_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cardiofed.cli import app

    args = ["demo", "--sites", "4", "--rounds", "3", "--eval-size", "500",
            "--no-effective-data", "--no-register", "--secure-aggregation"]
    result = CliRunner().invoke(app, [*args, "--dp-epsilon", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "DP-FedSGD over secure sums" in (tmp_path / "r" / "index.html").read_text()
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s")])
    assert refused.exit_code != 0
    assert "--secure-aggregation needs --dp-epsilon" in refused.output


def test_secure_statistics_are_the_pooled_ones_up_to_their_noise(federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges, site_statistics
    from cardiofed.simulation.secure_statistics import secure_statistics

    config = SimulationConfig.create(dp_epsilon=1e4, secure_aggregation=True)
    privacy = site_privacy(federation, config)
    edges = bin_edges(federation.feature_ranges, PRIVATE_BINS)
    (merged,) = secure_statistics(federation.sites, edges, privacy, dropout=0.2)
    pooled = site_statistics(np.concatenate([s.x_train for s in federation.sites]), edges)
    noise = privacy[federation.sites[0].name].ledger.releases("statistics")[0][
        "noise_multiplier"]
    assert noise < 0.05  # a huge epsilon: counts to within a record
    np.testing.assert_allclose(merged.histogram, pooled.histogram, atol=2.0)
    for p in privacy.values():  # one charge per site, at the study's noise
        (entry,) = p.ledger.releases("statistics")
        assert entry["secure_sum"] and entry["noise_multiplier"] == noise


def test_a_secure_study_sums_its_statistics(federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=2,
                                     eval_every=0)
    result = run_experiment(federation, config, baselines=False, ledger_dir=tmp_path)
    assert all(0 < v["epsilon_statistics"] <= 0.1 + 1e-9 for v in result.privacy.values())
    ledgers = sorted(tmp_path.rglob("ledger.jsonl"))
    assert len(ledgers) == len(federation.sites)
    for ledger in ledgers:
        kinds = [json.loads(line) for line in ledger.read_text().splitlines()]
        statistics = [e for e in kinds if e.get("entry", e).get("kind") == "statistics"]
        assert len(statistics) == 1
        assert statistics[0].get("entry", statistics[0])["secure_sum"] is True
    refusal = ("no per-site payloads, and a statistics gate only across groups' sums "
               r"\(secure_group_size\)")
    with pytest.raises(ConfigurationError, match=refusal):
        run_experiment(federation, config, baselines=False,
                       outbox=lambda site, kind, payload: None)
    with pytest.raises(ConfigurationError, match=refusal):  # one sum: nothing to gate
        prepare_federation(federation, privacy=site_privacy(federation, config), robust=True,
                           secure_dropout=config.secure_dropout)


def test_a_grouped_secure_simulation_gates_its_groups_statistics_and_evaluation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As on the network: one statistics sum and one evaluation sum per group, each site
    charged once for each, the groups' sums through the statistics gate (such a study
    used to be refused as ungated)."""
    import json

    from cardiofed.simulation.secure_evaluation import POOLED_SECURE

    data = synthetic_federation(n_sites=9, seed=0, size_scale=0.2)
    config = SimulationConfig.create(dp_epsilon=4.0, secure_aggregation=True, rounds=2,
                                     eval_every=0, secure_group_size=3, robust_rule="median")
    result = run_experiment(data, config, baselines=False, ledger_dir=tmp_path)
    assert 0.5 < result.released_metrics[POOLED_SECURE]["auc"] <= 1.0
    for ledger in sorted(tmp_path.rglob("ledger.jsonl")):
        entries = [json.loads(line).get("entry", json.loads(line))
                   for line in ledger.read_text().splitlines()]
        for kind in ("statistics", "evaluate"):
            assert [e["secure_sum"] for e in entries if e.get("kind") == kind] == [True]


def test_a_grouped_statistics_round_needs_three_groups_with_budget(federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges
    from cardiofed.exceptions import PrivacyBudgetExceeded
    from cardiofed.simulation.secure_statistics import secure_statistics

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True)
    privacy = site_privacy(federation, config)
    names = [s.name for s in federation.sites]
    groups = [names[k::3] for k in range(3)]
    for name in groups[0]:  # one group's sites have spent their budgets
        privacy[name].ledger.record([GaussianEvent(noise_multiplier=0.3, sample_rate=1.0,
                                                   steps=50)], "earlier", kind="train",
                                    study="earlier")
    with pytest.raises(PrivacyBudgetExceeded, match=r"2 group\(s\) have as many sites with "
                                                    "budget for the statistics sum as their "
                                                    "noise is split over, fewer than the 3"):
        secure_statistics(federation.sites, bin_edges(federation.feature_ranges, PRIVATE_BINS),
                          privacy, dropout=0.2, groups=groups)
    # Nothing was charged: no sum was formed.
    assert all(not privacy[n].ledger.releases("statistics") for n in names)
    from cardiofed.simulation.secure_evaluation import secure_evaluation

    outcomes = [(s.name, s.y_test, np.full(len(s.y_test), 0.2)) for s in federation.sites]
    assert secure_evaluation(outcomes, privacy, 0.2, np.random.default_rng(0),
                             groups=groups) is None
    assert all(not privacy[n].ledger.releases("evaluate") for n in names)


def test_too_few_sites_with_budget_for_the_statistics_sum_stop_the_study(federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges
    from cardiofed.exceptions import PrivacyBudgetExceeded
    from cardiofed.simulation.secure_statistics import secure_statistics

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True)
    privacy = site_privacy(federation, config)
    for s in federation.sites[:3]:
        privacy[s.name].ledger.record([GaussianEvent(noise_multiplier=0.3, sample_rate=1.0,
                                                     steps=50)], "earlier", kind="train",
                                      study="earlier")
    with pytest.raises(PrivacyBudgetExceeded, match="3 sites have budget for the "
                                                    "statistics sum, fewer than the 5"):
        secure_statistics(federation.sites, bin_edges(federation.feature_ranges, PRIVATE_BINS),
                          privacy, dropout=0.2)


def test_a_secure_evaluation_is_the_pooled_tests_histograms_up_to_their_noise(
        federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.evaluation.private_metrics import (
        metrics_from_histograms,
        score_bin_edges,
        score_histograms,
    )
    from cardiofed.simulation.secure_evaluation import secure_evaluation

    config = SimulationConfig.create(dp_epsilon=1e4, secure_aggregation=True)
    privacy = site_privacy(federation, config)
    rng = np.random.default_rng(0)
    outcomes = [(s.name, s.y_test, rng.random(len(s.y_test))) for s in federation.sites]
    pooled = secure_evaluation(outcomes, privacy, 0.2, np.random.default_rng(1))
    assert pooled is not None
    edges = score_bin_edges()
    neg, pos = score_histograms(np.concatenate([o[1] for o in outcomes]),
                                np.concatenate([o[2] for o in outcomes]), edges)
    exact = metrics_from_histograms(neg, pos, edges)
    assert pooled["auc"] == pytest.approx(exact["auc"], abs=0.01)
    assert pooled["prevalence"] == pytest.approx(exact["prevalence"], abs=0.01)
    noise = {p.ledger.releases("evaluate")[0]["noise_multiplier"] for p in privacy.values()}
    assert len(noise) == 1  # one charge per site, at the study's noise
    assert all(p.ledger.releases("evaluate")[0]["secure_sum"] for p in privacy.values())


def test_a_secure_run_publishes_only_the_pooled_metrics_of_its_evaluation_sum(
        federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.serving import provenance
    from cardiofed.simulation.secure_evaluation import CARD_NOTE, POOLED_SECURE

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=3,
                                     eval_every=0)
    result = run_experiment(federation, config, baselines=False)
    assert list(result.released_metrics) == [POOLED_SECURE]
    metrics = result.released_metrics[POOLED_SECURE]
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
    for spent in result.privacy.values():  # the evaluation is charged, within budget
        assert spent["epsilon_evaluate"] > 0 and spent["epsilon_spent"] <= 1.0 + 1e-9
    model = provenance.from_experiment(result, study="s", feature_names=federation.feature_names,
                                       outcome=federation.outcome)
    assert list(model.card.metrics) == [POOLED_SECURE] and CARD_NOTE in model.card.notes


def test_too_few_sites_with_budget_for_the_evaluation_sum_release_nothing(
        federation) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.simulation.secure_evaluation import secure_evaluation

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True)
    privacy = site_privacy(federation, config)
    for s in federation.sites[:3]:  # their budgets are spent
        privacy[s.name].ledger.record([GaussianEvent(noise_multiplier=0.3, sample_rate=1.0,
                                                     steps=50)], "earlier", kind="train",
                                      study="earlier")
    outcomes = [(s.name, s.y_test, np.full(len(s.y_test), 0.2)) for s in federation.sites]
    assert secure_evaluation(outcomes, privacy, 0.2, np.random.default_rng(0)) is None
    assert not any(p.ledger.releases("evaluate") for p in privacy.values())


def test_sites_are_dealt_into_groups_of_at_least_the_size() -> None:
    from cardiofed.simulation.secure_runner import secure_groups

    names = [f"s{i:02d}" for i in range(14)]
    groups = secure_groups(names, 4, seed=1)
    assert sorted(n for g in groups for n in g) == names
    assert len(groups) == 3 and {len(g) for g in groups} <= {4, 5}
    assert secure_groups(names, 4, seed=1) == groups != secure_groups(names, 4, seed=2)
    with pytest.raises(ConfigurationError, match="leaves 2 group.* needs at least 3"):
        secure_groups(names, 5, seed=1)


def test_group_settings_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="robust_rule needs secure_group_size"):
        SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, robust_rule="median")
    with pytest.raises(ConfigurationError, match="set secure_aggregation = true"):
        SimulationConfig.create(secure_group_size=3)


def test_a_robust_rule_across_groups_outvotes_a_malicious_site() -> None:
    """One of 12 sites sends its vector times -1000: one secure sum is wrecked; groups of
    3 with the median across them are not."""
    data = synthetic_federation(n_sites=12, seed=0, size_scale=0.3)
    bad = data.sites[0].name

    def attack(site: str, vector: np.ndarray) -> np.ndarray:
        return -1000.0 * vector if site == bad else vector

    aucs = {}
    for label, extra, hook in [("one sum", {}, attack),
                               ("groups", {"secure_group_size": 3,
                                           "robust_rule": "median"}, None),
                               ("groups attacked", {"secure_group_size": 3,
                                                    "robust_rule": "median"}, attack)]:
        config = SimulationConfig.create(dp_epsilon=8.0, secure_aggregation=True, rounds=20,
                                         eval_every=0, **extra)  # type: ignore[arg-type]
        privacy = site_privacy(data, config)
        sites = prepare_federation(data, privacy=privacy,
                                   secure_dropout=config.secure_dropout)
        run = run_secure_sgd(sites, config, privacy=privacy, attack=hook)
        aucs[label] = run.history[-1]["pooled_auc"]
    assert aucs["one sum"] < 0.6
    assert aucs["groups attacked"] > aucs["groups"] - 0.05


def test_a_site_refuses_a_sum_noisier_for_others_than_for_itself(federation) -> None:  # type: ignore[no-untyped-def]
    """The study's noise below what this site's own budget needs is refused by name,
    for training and statistics alike, and nothing is charged."""
    from cardiofed.exceptions import PrivacyBudgetExceeded

    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=5)
    site = site_privacy(federation, config)[federation.sites[0].name]
    needed = site.secure_training_noise()
    with pytest.raises(PrivacyBudgetExceeded, match=(
            f"refuses round 1: the sum's noise multiplier {needed / 2:.3g} is below the "
            f"{needed:.3g} its budget needs")):
        site.charge_secure_round(needed / 2, "round 1")
    with pytest.raises(PrivacyBudgetExceeded, match=r"refuses statistics release \(secure "
                                                    r"sum\): the sum's noise multiplier"):
        site.charge_secure_sum("statistics", site.secure_sum_noise("statistics") / 2)
    assert site.ledger.spent() == 0.0 and site.charged_secure_noise() is None
    site.charge_secure_round(needed, "round 1")
    assert site.charged_secure_noise() == needed


def test_a_secure_run_ends_with_the_mean_of_its_last_rounds(  # type: ignore[no-untyped-def]
        federation, monkeypatch) -> None:
    from cardiofed.simulation import secure_runner
    from cardiofed.simulation.runner import round_metrics

    averaged: list[list[dict[str, np.ndarray]]] = []
    real = secure_runner.tail_average
    monkeypatch.setattr(secure_runner, "tail_average",
                        lambda models: averaged.append(list(models)) or real(models))
    config = SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True, rounds=4,
                                     average_last=3, eval_every=1)
    privacy = site_privacy(federation, config)
    sites = prepare_federation(federation, privacy=privacy)

    run = run_secure_sgd(sites, config, privacy=privacy)

    (last_three,) = averaged
    assert len(last_three) == 3
    for name, value in run.weights.items():
        np.testing.assert_allclose(value, np.mean([m[name] for m in last_three], axis=0),
                                   rtol=1e-6)
    for rnd, model in zip((2, 3, 4), last_three, strict=True):  # each round's own model
        assert run.history[rnd - 1]["pooled_auc"] == round_metrics(
            config.model, model, sites)["pooled_auc"]
