"""Training to convergence: the plan's rounds are a maximum, and training stops once the
global model's loss at the sites has stopped improving."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardiofed.algorithms.stopping import StoppingRule, round_loss
from cardiofed.coordinator.studies import network_plan
from cardiofed.data.uci_heart import load_uci_heart
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.config import DEFAULT_ROUNDS, FIXED_ROUNDS, SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, POOLED_TEST, run_experiment

losses = st.floats(min_value=0.01, max_value=5.0)


@given(st.lists(losses, min_size=1, max_size=30), st.integers(1, 6),
       st.floats(min_value=0, max_value=0.2))
def test_a_loss_that_keeps_improving_never_stops(start: list[float], patience: int,
                                                  tolerance: float) -> None:
    rule = StoppingRule(patience=patience, tolerance=tolerance)
    best = min(start)
    improving = [best * (1 - tolerance) ** k * 0.99 ** k for k in range(1, patience + 1)]
    assert not rule.stalled(start + improving)


@given(st.lists(losses, min_size=1, max_size=30), st.integers(1, 6),
       st.lists(st.floats(min_value=0, max_value=3.0), min_size=6, max_size=6))
def test_a_loss_that_stops_improving_for_patience_rounds_stops(
        start: list[float], patience: int, worse_by: list[float]) -> None:
    rule = StoppingRule(patience=patience, tolerance=1e-3)
    best = min(start)
    flat = [best + w for w in worse_by[:patience]]
    assert rule.stalled(start + flat)
    # Rounds that released no loss (private sites) neither count nor reset the wait.
    assert rule.stalled(start + [math.nan] + flat + [math.nan])
    assert not rule.stalled([math.nan] * 50)
    assert not rule.stalled(flat[:patience])  # nothing before them to compare with


@given(honest=st.lists(losses, min_size=3, max_size=15), data=st.data())
def test_a_minority_of_sites_cannot_move_the_round_loss_outside_the_honest_ones(
        honest: list[float], data: st.DataObject) -> None:
    n_bad = data.draw(st.integers(0, (len(honest) - 1) // 2))
    lies = data.draw(st.lists(st.floats(min_value=0, max_value=1e9), min_size=n_bad,
                              max_size=n_bad))
    loss = round_loss(honest + lies)
    assert min(honest) <= loss <= max(honest)


def test_round_loss_ignores_sites_without_one() -> None:
    assert round_loss([0.5, math.nan, 0.7]) == pytest.approx(0.6)
    assert math.isnan(round_loss([math.nan, math.nan]))


@pytest.mark.parametrize("patience, tolerance, name", [(0, 1e-3, "stop_patience"),
                                                       (3, 1.0, "stop_tolerance")])
def test_a_bad_rule_names_the_parameter(patience: int, tolerance: float, name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        StoppingRule(patience=patience, tolerance=tolerance)


def test_the_rounds_default_to_a_maximum_only_where_training_can_stop() -> None:
    assert SimulationConfig.create().rounds == DEFAULT_ROUNDS
    assert SimulationConfig.create().stopping_rule() == StoppingRule(patience=5)
    # Private sites release no loss; DP-SGD spreads its budget over every planned round.
    private = SimulationConfig.create(dp_epsilon=1.0)
    assert private.rounds == FIXED_ROUNDS and private.stopping_rule() is None
    asynchronous = SimulationConfig.create(aggregation="async")
    assert asynchronous.rounds == FIXED_ROUNDS and asynchronous.stopping_rule() is None
    assert SimulationConfig.create(stop_patience=None).rounds == FIXED_ROUNDS
    assert SimulationConfig.create(rounds=7, dp_epsilon=1.0).rounds == 7
    with pytest.raises(ConfigurationError, match="stop_tolerance"):
        SimulationConfig.create(stop_tolerance=2)
    # A networked study's nodes are private by default: it runs FIXED_ROUNDS unless told.
    assert network_plan(SimulationConfig.create(), 3).rounds == FIXED_ROUNDS
    assert network_plan(SimulationConfig.create(rounds=60), 3).rounds == 60


def test_uci_heart_trains_to_convergence_and_to_a_calibrated_model() -> None:
    """20 fixed rounds left the pooled-test calibration slope at 1.22 (under-fitted);
    stopping once converged (round 39 of at most 100) brings it to 1.03."""
    data = load_uci_heart()
    converged = run_experiment(data, SimulationConfig.create(), baselines=False)
    run = converged.federated
    assert run.stopped_at is not None and 25 < run.stopped_at < DEFAULT_ROUNDS
    assert run.history[-1]["round"] == run.stopped_at
    slope = converged.metrics[POOLED_TEST][FEDERATED]["calibration_slope"]
    assert 0.9 < slope < 1.1
    fixed = run_experiment(data, SimulationConfig.create(rounds=20, stop_patience=None),
                           baselines=False)
    assert fixed.federated.stopped_at is None and len(fixed.federated.history) == 20
    assert fixed.metrics[POOLED_TEST][FEDERATED]["calibration_slope"] > 1.15
