"""The discrete-time survival model: one record per patient (its intervals at risk), trained
by the federated algorithms and by DP-SGD with each patient's gradient clipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.networks import make_model
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.survival import fit_federated_discrete
from cardiofed.survival.discrete import interval_grid, person_periods, risk_by
from cardiofed.survival.metrics import uno_c
from cardiofed.training.local import bce_loss

GRID = np.array([1.0, 2.0, 3.0])


def test_person_periods_golden() -> None:
    # an event in (1, 2]; censored in (1, 2] (at risk in (0, 1] only); followed beyond the
    # grid; an event at exactly 1 (the first interval); censored before the first point
    time = np.array([1.5, 1.5, 7.0, 1.0, 0.5])
    event = np.array([1, 0, 1, 1, 0])
    x = np.array([[10.0], [20.0], [30.0], [40.0], [50.0]])
    inputs, labels = person_periods(time, event, x, GRID)
    np.testing.assert_array_equal(labels, [[0, 1, -1], [0, -1, -1], [0, 0, 0], [1, -1, -1],
                                           [-1, -1, -1]])
    assert inputs.shape == (5, 3, 1 + 2)
    np.testing.assert_array_equal(inputs[0], [[10, 0, 0], [10, 1, 0], [10, 0, 1]])


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(0.01, 10.0), st.booleans()), min_size=1,
                     max_size=30),
       step=st.sampled_from([0.5, 1.0, 2.5]))
def test_each_patient_is_at_risk_on_a_prefix_and_has_at_most_one_event(
        rows: list[tuple[float, bool]], step: float) -> None:
    time = np.array([t for t, _ in rows])
    event = np.array([e for _, e in rows])
    grid = interval_grid(5.0, step)
    _, labels = person_periods(time, event, np.zeros((len(rows), 1)), grid)
    for t, e, row in zip(time, event, labels, strict=True):
        at_risk = row >= 0
        k = int(at_risk.sum())
        assert at_risk[:k].all() and not at_risk[k:].any()  # a prefix of the intervals
        ends_in = int(np.searchsorted(grid, t, side="left"))
        if e and ends_in < grid.size:  # an event inside the grid: its interval, then stop
            assert k == ends_in + 1 and row[k - 1] == 1 and (row[:k - 1] == 0).all()
        else:  # censored (carried down) or followed past the grid: no event
            assert k == min(ends_in, grid.size) and (row[:k] == 0).all()


def test_risk_is_one_minus_the_product_of_interval_survivals() -> None:
    logits = np.array([[-2.0, -1.5, -1.0], [0.0, 0.0, 0.0]])
    h = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(risk_by(logits, GRID, 2.0), 1 - np.prod(1 - h[:, :2], axis=1))
    np.testing.assert_allclose(risk_by(logits, GRID, 10.0), 1 - np.prod(1 - h, axis=1))
    with pytest.raises(ConfigurationError, match="before the grid's first point"):
        risk_by(logits, GRID, 0.5)
    with pytest.raises(ConfigurationError, match="'horizon'"):
        interval_grid(0.5, 1.0)


def test_a_patients_loss_is_the_sum_over_its_intervals_at_risk() -> None:
    """bce_loss on blocks equals the logistic loss of the person-period table (the rows
    at risk), so the blocks fit the usual discrete-time hazard model."""
    rng = np.random.default_rng(0)
    time, event = rng.uniform(0.1, 4.0, 40), rng.random(40) < 0.5
    inputs, labels = person_periods(time, event, rng.normal(size=(40, 2)), GRID)
    model = make_model("logistic", inputs.shape[2], seed=0)
    logits = model(torch.as_tensor(inputs))
    y = torch.as_tensor(labels)
    at_risk = y >= 0
    flat = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[at_risk], y[at_risk], reduction="sum")
    assert float(bce_loss(logits, y, reduction="sum")) == pytest.approx(float(flat), rel=1e-6)
    assert float(bce_loss(logits, y)) == pytest.approx(float(flat) / 40, rel=1e-6)


def test_dp_sgd_clips_each_patients_gradient_not_each_interval() -> None:
    """Opacus' per-sample gradient of a block is the patient's whole gradient (the sum over
    its intervals), so clipping and accounting are per patient."""
    from opacus import GradSampleModule

    rng = np.random.default_rng(1)
    inputs, labels = person_periods(rng.uniform(0.1, 4.0, 6), rng.random(6) < 0.5,
                                    rng.normal(size=(6, 2)), GRID)
    model = make_model("logistic", inputs.shape[2], seed=0)
    gsm = GradSampleModule(model, loss_reduction="sum")
    x, y = torch.as_tensor(inputs), torch.as_tensor(labels)
    bce_loss(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in gsm.named_parameters()}
    gsm._close()
    for i in range(6):
        own = make_model("logistic", inputs.shape[2], seed=0)
        bce_loss(own(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for name, p in own.named_parameters():
            torch.testing.assert_close(per_sample[f"_module.{name}"][i], p.grad)


def test_fedavg_trains_it_and_dp_charges_every_sites_ledger() -> None:
    data = synthetic_federation(n_sites=4, seed=3, survival=True)
    settings_ = dict(algorithm="fedavg", rounds=8, batch_size=64, lr=0.1,
                     feature_transform="clinical", stop_patience=None, seed=0)
    model = fit_federated_discrete(data, SimulationConfig.create(**settings_))
    site = data.sites[0]
    assert site.time_test is not None
    risk = model.risk(site.x_test, 10.0)
    assert ((risk > 0) & (risk < 1)).all() and not model.epsilon_spent
    assert uno_c(site.time_test, site.y_test, risk, 10.0) > 0.65  # it learned the risk
    assert (model.risk(site.x_test, 5.0) <= risk).all()  # risk grows with the horizon
    private = fit_federated_discrete(data, SimulationConfig.create(
        **settings_, dp_epsilon=2.0, dp_delta=1e-5))
    assert set(private.epsilon_spent) == {s.name for s in data.sites}
    assert all(0 < e <= 2.0 for e in private.epsilon_spent.values())
    assert np.isfinite(private.risk(site.x_test, 10.0)).all()
