"""Bias correction wired into the simulator: weighting rules, label quality, recalibration."""

from __future__ import annotations

import numpy as np
import pytest

from cardiofed.algorithms.base import ClientUpdate
from cardiofed.algorithms.weighting import WeightingRule
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, RECALIBRATED, run_experiment
from cardiofed.simulation.prepare import prepare_federation
from cardiofed.simulation.runner import run_federated


def _update(site: str, n: int, loss: float = float("nan")) -> ClientUpdate:
    return ClientUpdate(site=site, delta={"w": np.zeros(1, np.float32)}, num_samples=n,
                        num_steps=1, train_loss=0.0, global_loss=loss)


def test_sample_size_rule_is_fedavg() -> None:
    weights, _ = WeightingRule().weights([_update("a", 300), _update("b", 100)], {})
    assert weights == pytest.approx([0.75, 0.25])


def test_type_balanced_rule_gives_each_type_half() -> None:
    updates = [_update("big", 900), _update("mid", 100), _update("clinic", 50)]
    types = {"big": "tier3", "mid": "tier3", "clinic": "community"}

    weights, _ = WeightingRule(kind="type-balanced").weights(updates, types)

    # tier3 share 1/2 split 900:100; community 1/2.
    assert weights == pytest.approx([0.45, 0.05, 0.5])


def test_qffl_rule_raises_the_worse_site_and_multipliers_zero_a_site() -> None:
    updates = [_update("a", 100, loss=0.2), _update("b", 100, loss=0.4), _update("c", 100, 0.3)]
    rule = WeightingRule(kind="qffl", q=1.0, site_multipliers={"c": 0.0})

    weights, _ = rule.weights(updates, {})

    # n L^q: 20 and 40 (c zeroed), normalised.
    assert weights == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert rule.needs_loss


def test_agnostic_rule_keeps_its_mixture_across_rounds() -> None:
    rule = WeightingRule(kind="agnostic", step=0.5)
    updates = [_update("a", 10, loss=0.2), _update("b", 10, loss=0.6)]

    first, mixture = rule.weights(updates, {})
    second, _ = rule.weights(updates, {}, mixture)

    assert first[1] > first[0] and second[1] > first[1]
    assert sum(second) == pytest.approx(1.0)


def test_invalid_weighting_settings_name_the_parameter() -> None:
    with pytest.raises(ConfigurationError, match="The 'qffl_q' parameter must be >= 0; got -1"):
        WeightingRule(kind="qffl", q=-1)
    with pytest.raises(ConfigurationError, match="weighting 'qffl' needs each site's loss"):
        SimulationConfig.create(weighting="qffl", dp_epsilon=1.0)


def test_type_balanced_weighting_changes_each_sites_share() -> None:
    data = synthetic_federation(n_sites=6, seed=3, size_scale=0.3)
    sites = prepare_federation(data)

    plain = run_federated(sites, SimulationConfig.create(rounds=2, eval_every=0))
    balanced = run_federated(sites, SimulationConfig.create(rounds=2, eval_every=0,
                                                            weighting="type-balanced"))

    clinics = [s.name for s in sites if s.site_type == "community"]
    assert sum(plain.weight_share.values()) == pytest.approx(1.0)
    assert sum(balanced.weight_share[c] for c in clinics) == pytest.approx(1 / 3)
    assert sum(plain.weight_share[c] for c in clinics) < 1 / 3


@pytest.fixture(scope="module")
def corrected():  # type: ignore[no-untyped-def]
    data = synthetic_federation(seed=0)
    config = SimulationConfig.create(rounds=10, eval_every=0, label_quality=True,
                                     recalibrate=True)
    return data, run_experiment(data, config, baselines=False)


def test_label_quality_flags_the_noisy_site_and_removes_its_weight(corrected) -> None:  # type: ignore[no-untyped-def]
    _, result = corrected

    assert result.label_quality.flagged == ["tier2_04"]
    assert "labels disagree with the federation" in result.label_quality.reasons["tier2_04"]
    assert result.federated.weight_share["tier2_04"] == 0.0


def test_recalibration_is_reported_beside_the_raw_federated_model(corrected) -> None:  # type: ignore[no-untyped-def]
    data, result = corrected
    for site in data.sites:
        assert {FEDERATED, RECALIBRATED} <= set(result.metrics[site.name])
        assert site.name in result.recalibrations


def test_scaffold_control_variates_by_hand() -> None:
    from cardiofed.algorithms import scaffold

    c = {"w": np.array([0.2], np.float32)}
    c_i = {"w": np.array([0.5], np.float32)}
    delta = {"w": np.array([-0.3], np.float32)}

    # c_i+ = c_i - c - delta / (K lr) = 0.5 - 0.2 + 0.3 / (10 * 0.1) = 0.6
    new = scaffold.site_control_update(c_i, c, delta, steps=10, lr=0.1)
    # c + |S|/N mean(c_i+ - c_i) = 0.2 + (1/4) * 0.1 = 0.225
    server = scaffold.server_control_update(c, [{"w": new["w"] - c_i["w"]}], n_sites=4)

    assert new["w"] == pytest.approx([0.6])
    assert server["w"] == pytest.approx([0.225])
    assert scaffold.gradient_correction(c_i, c)["w"] == pytest.approx([-0.3])


def test_scaffold_runs_and_needs_plain_sgd() -> None:
    data = synthetic_federation(n_sites=4, seed=2, size_scale=0.3)
    run = run_federated(prepare_federation(data),
                        SimulationConfig.create(algorithm="scaffold", rounds=3, eval_every=0))

    assert run.history[-1]["pooled_auc"] > 0.55
    with pytest.raises(ConfigurationError, match="scaffold's control variates assume plain "
                                                 "local SGD"):
        SimulationConfig.create(algorithm="scaffold", optimizer="adam")
