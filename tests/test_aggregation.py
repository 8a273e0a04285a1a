"""Aggregation: weighted means of updates and the server optimisers of Reddi et al. 2021."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import numpy as np
import pytest

from cardiofed.aggregation import (
    ServerAdaptive,
    ServerSGD,
    accumulate,
    finalize,
    sample_size_weights,
    weighted_mean,
)
from cardiofed.exceptions import ConfigurationError

# --- Weighted mean -------------------------------------------------------------------------


def test_weighted_mean_by_hand() -> None:
    a = {"w": np.array([1.0, 2.0]), "b": np.array([0.0])}
    b = {"w": np.array([3.0, 6.0]), "b": np.array([4.0])}

    mean = weighted_mean([a, b], [1.0, 3.0])

    # w: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5;  b: (1*0 + 3*4)/4 = 3
    np.testing.assert_array_equal(mean["w"], [2.5, 5.0])
    np.testing.assert_array_equal(mean["b"], [3.0])
    assert mean["w"].dtype == np.float32


def test_accumulating_one_at_a_time_equals_the_batch_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=1)} for _ in range(4)]
    weights = [10.0, 0.0, 2.5, 7.0]

    acc = None
    for u, w in zip(updates, weights, strict=True):
        acc = accumulate(acc, u, w)
    assert acc is not None
    folded = finalize(acc)

    batch = weighted_mean(updates, weights)
    assert acc.count == 4
    assert acc.total_weight == 19.5
    for k in batch:
        np.testing.assert_array_equal(folded[k], batch[k])
        expected = sum(w * u[k] for u, w in zip(updates, weights, strict=True)) / 19.5
        np.testing.assert_allclose(folded[k], expected, rtol=1e-6)


def test_all_zero_update_aggregates_to_zero() -> None:
    zero = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division or invalid-value warnings
        mean = weighted_mean([zero, zero], [5.0, 1.0])

    for v in mean.values():
        np.testing.assert_array_equal(v, 0.0)


def test_single_update_is_returned_unchanged() -> None:
    u = {"w": np.array([0.25, -1.5], dtype=np.float32)}

    np.testing.assert_array_equal(weighted_mean([u], [7.0])["w"], u["w"])


@pytest.mark.parametrize(("weight", "shown"), [(-1.0, "-1.0"), (math.nan, "nan"),
                                               (math.inf, "inf")])
def test_negative_or_non_finite_weight_is_an_error(weight: float, shown: str) -> None:
    u = {"w": np.ones(2)}

    with pytest.raises(ValueError, match=re.escape(
            f"Aggregation weight must be finite and >= 0; got {shown}.")):
        weighted_mean([u, u], [1.0, weight])


def test_weights_summing_to_zero_is_an_error() -> None:
    u = {"w": np.ones(2)}

    with pytest.raises(ValueError, match=re.escape(
            "Cannot average updates whose weights sum to 0.")):
        weighted_mean([u, u], [0.0, 0.0])


def test_updates_and_weights_must_match_in_number() -> None:
    u = {"w": np.ones(2)}

    with pytest.raises(ValueError, match=re.escape("Got 2 updates but 1 weights.")):
        weighted_mean([u, u], [1.0])
    with pytest.raises(ValueError, match=re.escape("weighted_mean needs at least one update.")):
        weighted_mean([], [])


def test_updates_must_have_the_same_names() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "Update names ['b'] differ from ['w'].")):
        weighted_mean([{"w": np.ones(2)}, {"b": np.ones(2)}], [1.0, 1.0])


def test_updates_must_have_the_same_shapes() -> None:
    # (2, 1) and (2,) would silently broadcast to (2, 2) without the check.
    with pytest.raises(ValueError, match=re.escape(
            "Update 'w' has shape (2,); earlier updates have (2, 1).")):
        weighted_mean([{"w": np.zeros((2, 1))}, {"w": np.ones(2)}], [1.0, 1.0])


def test_sample_size_weights() -> None:
    assert sample_size_weights([30, 10, 0]) == [30.0, 10.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("Sample counts must be >= 0; got [3, -1].")):
        sample_size_weights([3, -1])


# --- Server optimisers -----------------------------------------------------------------------

def test_server_sgd_moves_by_lr_times_delta() -> None:
    opt = ServerSGD(lr=0.5)
    weights = {"w": np.array([1.0, -1.0], dtype=np.float32)}
    state = opt.init(weights)

    new, state = opt.step(weights, {"w": np.array([0.2, 0.4])}, state)

    # x + 0.5 * delta = [1 + 0.1, -1 + 0.2]
    np.testing.assert_allclose(new["w"], [1.1, -0.8], rtol=1e-7)
    assert new["w"].dtype == np.float32
    assert state.step == 1


# Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated
# Optimization", ICLR 2021, Algorithm 2 (no bias correction, v initialised to tau^2):
#   m_t = b1 m_{t-1} + (1 - b1) delta_t
#   FedAdam: v_t = b2 v_{t-1} + (1 - b2) delta_t^2
#   FedYogi: v_t = v_{t-1} - (1 - b2) delta_t^2 sign(v_{t-1} - delta_t^2)
#   x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
TAU, BETA1, BETA2, LR = 1e-3, 0.9, 0.99, 0.01
X0 = [0.5, -0.5]
DELTA1 = [0.1, -0.2]
DELTA2 = [-0.05, 0.001]  # coordinate 1: delta^2 < v, so Yogi's sign term is +1


def sign(z: float) -> float:
    return (z > 0) - (z < 0)


def reddi_by_hand(variant: str, deltas: list[list[float]]
                  ) -> tuple[list[float], list[float], list[float]]:
    """x, m, v after len(deltas) server steps, one coordinate at a time, in Python floats."""
    x, m, v = list(X0), [0.0, 0.0], [TAU**2, TAU**2]
    for delta in deltas:
        for i, d in enumerate(delta):
            m[i] = BETA1 * m[i] + (1 - BETA1) * d
            if variant == "adam":
                v[i] = BETA2 * v[i] + (1 - BETA2) * d * d
            else:
                v[i] = v[i] - (1 - BETA2) * d * d * sign(v[i] - d * d)
            x[i] = x[i] + LR * m[i] / (math.sqrt(v[i]) + TAU)
    return x, m, v


def run_server(variant: str, deltas: list[list[float]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    opt = ServerAdaptive(variant=variant, lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU)
    weights = {"w": np.array(X0, dtype=np.float32)}
    state = opt.init(weights)
    for d in deltas:
        weights, state = opt.step(weights, {"w": np.array(d, dtype=np.float32)}, state)
    return weights["w"], state.m["w"], state.v["w"], state.step


def test_fedadam_first_step_golden_value() -> None:
    # m = 0.1 * 0.1 = 0.01;  v = 0.99 * 1e-6 + 0.01 * 0.1^2 = 1.0099e-4;
    # x = 0.5 + 0.01 * 0.01 / (sqrt(1.0099e-4) + 1e-3) = 0.50905028...
    x, _, _, _ = run_server("adam", [DELTA1])

    assert float(x[0]) == pytest.approx(0.5090502831185222, rel=1e-6)


@pytest.mark.parametrize("variant", ["adam", "yogi"])
@pytest.mark.parametrize("n_steps", [1, 2])
def test_adaptive_server_matches_reddi_formulas(variant: str, n_steps: int) -> None:
    deltas = [DELTA1, DELTA2][:n_steps]
    x_hand, m_hand, v_hand = reddi_by_hand(variant, deltas)

    x, m, v, steps = run_server(variant, deltas)

    # Weights are float32 (rel 1e-6); the moments are kept in float64 (deltas enter as
    # float32, so rel 1e-6 there too).
    np.testing.assert_allclose(x, x_hand, rtol=1e-6)
    np.testing.assert_allclose(m, m_hand, rtol=1e-6)
    np.testing.assert_allclose(v, v_hand, rtol=1e-6)
    assert steps == n_steps


def test_fedadam_and_fedyogi_differ_after_the_first_step() -> None:
    # Adam: v = b2 tau^2 + (1 - b2) d^2; Yogi: v = tau^2 + (1 - b2) d^2 (as v < d^2).
    _, _, v_adam, _ = run_server("adam", [DELTA1])
    _, _, v_yogi, _ = run_server("yogi", [DELTA1])

    assert v_adam[0] == pytest.approx(1.0099e-4, rel=1e-6)
    assert v_yogi[0] == pytest.approx(1.01e-4, rel=1e-6)


@pytest.mark.parametrize("variant", ["adam", "yogi"])
def test_adaptive_server_with_zero_delta_is_finite(variant: str) -> None:
    x, _, v, _ = run_server(variant, [[0.0, 0.0], [0.0, 0.0]])

    np.testing.assert_array_equal(x, np.array(X0, dtype=np.float32))
    assert np.all(v > 0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ServerSGD(lr=0.0), "The 'server_lr' parameter must be > 0; got 0.0."),
    (lambda: ServerAdaptive(lr=-1.0), "The 'server_lr' parameter must be > 0; got -1.0."),
    (lambda: ServerAdaptive(tau=0.0), "The 'tau' parameter must be > 0; got 0.0."),
    (lambda: ServerAdaptive(beta1=1.0), "The 'beta1' parameter must be in [0, 1); got 1.0."),
    (lambda: ServerAdaptive(beta2=-0.1),
     "The 'beta2' parameter must be in [0, 1); got -0.1."),
    (lambda: ServerAdaptive(variant="adagrad"),
     "The 'variant' parameter must be 'adam' or 'yogi'; got 'adagrad'."),
])
def test_invalid_server_settings_name_the_parameter(make: Callable[[], object],
                                                   message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        make()
