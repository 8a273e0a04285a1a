"""Robust aggregation: weight cap, norm bound, and each rule against hand-computed values."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.aggregation.robust import (
    RobustAggregation,
    cap_shares,
    centered_clip,
    clip_scales,
    krum_selection,
    trimmed_mean,
    weighted_median,
)
from cardiofed.exceptions import ConfigurationError


def deltas(*rows: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.array(r[:-1], np.float32), "b": np.array(r[-1:], np.float32)}
            for r in rows]


def test_no_share_exceeds_the_cap_and_the_rest_keep_their_proportions() -> None:
    # 2**62 declared samples against 100, 200, 300: capped at 0.5, the rest share 0.5 as
    # 1 : 2 : 3.
    shares = cap_shares([2.0**62, 100, 200, 300], 0.5)

    np.testing.assert_allclose(shares, [0.5, 0.5 / 6, 1.0 / 6, 1.5 / 6])


def test_a_cap_below_one_over_n_gives_equal_shares() -> None:
    np.testing.assert_allclose(cap_shares([1, 2, 3], 0.2), [1 / 3] * 3)


def test_uncapped_shares_are_the_normalised_weights() -> None:
    np.testing.assert_allclose(cap_shares([1, 3], None), [0.25, 0.75])


@pytest.mark.parametrize("weights", [[-1.0, 1.0], [float("nan"), 1.0], []])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="Aggregation weights must be finite and >= 0"):
        cap_shares(weights, 0.5)


def test_norms_above_the_bound_are_scaled_to_it() -> None:
    # Median norm 2: bound 3 x 2 = 6; the norm-1e6 update is scaled by 6e-6.
    scales = clip_scales(np.array([1.0, 2.0, 1e6]), 3.0)

    np.testing.assert_allclose(scales, [1.0, 1.0, 6e-6])


def test_an_all_zero_round_is_left_alone() -> None:
    np.testing.assert_array_equal(clip_scales(np.zeros(3), 3.0), np.ones(3))


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    x = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [100.0, -100.0], [3.0, 13.0]])

    # trim 0.2 of 5: one value each side per coordinate.
    np.testing.assert_allclose(trimmed_mean(x, 0.2), [2.0, 11.0])


def test_krum_rejects_the_outlier() -> None:
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [50.0, -50.0]])

    np.testing.assert_array_equal(krum_selection(x, 1), [True, True, True, True, False])


def test_krum_keeps_everything_when_too_few_updates_for_its_guarantee() -> None:
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [50.0, -50.0]])  # n = 4 = 2 f + 2

    np.testing.assert_array_equal(krum_selection(x, 1), [True] * 4)


def test_centered_clip_stays_near_the_honest_updates() -> None:
    x = np.array([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1e6, -1e6]])

    v = centered_clip(x, np.full(4, 0.25), 3)

    assert np.linalg.norm(v - [1.0, 1.0]) < 0.5


@pytest.mark.parametrize("rule", ["mean", "trimmed-mean", "median", "weighted-median",
                                  "multi-krum", "centered-clip"])
def test_one_scaled_update_cannot_move_the_model_far(rule: str) -> None:
    honest = [[0.1, -0.1, 0.05], [0.12, -0.08, 0.04], [0.09, -0.11, 0.06], [0.11, -0.1, 0.05]]
    attacker = [1e6, 1e6, 1e6]
    robust = RobustAggregation(rule=rule)  # type: ignore[arg-type]

    out, report = robust.aggregate(deltas(*honest, attacker), [100, 100, 100, 100, 2**62],
                                   ["a", "b", "c", "d", "evil"])

    assert np.abs(np.concatenate([out["w"], out["b"]])).max() < 1.0
    evil = report[-1]
    assert evil.site == "evil" and (evil.clipped or evil.rejected)
    assert evil.weight_share <= 0.5 + 1e-12
    assert all(not r.clipped and not r.rejected for r in report[:-1]) or rule == "multi-krum"


def test_plain_mean_without_bounds_equals_the_weighted_mean() -> None:
    robust = RobustAggregation(rule="mean", norm_bound=None, max_weight_share=None)

    out, report = robust.aggregate(deltas([1.0, 2.0], [3.0, 4.0]), [1, 3], ["a", "b"])

    np.testing.assert_allclose(out["w"], [2.5])
    np.testing.assert_allclose(out["b"], [3.5])
    assert [r.weight_share for r in report] == [0.25, 0.75]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rule": "krum"}, "The 'robust_rule' parameter must be one of"),
    ({"norm_bound": 0.5}, "The 'robust_norm_bound' parameter must be finite and >= 1"),
    ({"max_weight_share": 0.0}, "The 'robust_max_weight_share' parameter must be in (0, 1]"),
    ({"trim_fraction": 0.5}, "The 'robust_trim_fraction' parameter must be in [0, 0.5)"),
    ({"byzantine": -1}, "The 'robust_byzantine' parameter must be >= 0; got -1."),
])
def test_invalid_settings_name_the_parameter(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        RobustAggregation(**kwargs)  # type: ignore[arg-type]


def test_mismatched_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        RobustAggregation().aggregate([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1],
                                      ["a", "b"])


def test_the_streamed_mean_is_the_robust_mean_without_holding_the_updates() -> None:
    from cardiofed.aggregation.robust import streamed_mean, update_norm
    from cardiofed.aggregation.weighted_mean import weighted_mean

    rng = np.random.default_rng(3)
    deltas = [{"w": rng.normal(0, 1, (4, 3)).astype(np.float32),
               "b": rng.normal(0, 1, 2).astype(np.float32)} for _ in range(9)]
    deltas[2] = {k: v * 100 for k, v in deltas[2].items()}  # clipped by the norm bound
    weights = [float(n) for n in rng.integers(10, 1000, 9)]
    weights[5] = 1e6  # capped
    sites = [f"s{i}" for i in range(9)]
    norms = [update_norm(d) for d in deltas]
    robust = RobustAggregation(rule="mean")
    expected, report = robust.aggregate(deltas, weights, sites)
    got, streamed = streamed_mean(robust, sites, weights, norms,
                                  [deltas[:4], deltas[4:7], deltas[7:]])
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7)
    assert streamed == report and report[2].clipped and report[5].weight_share == 0.5
    plain, none = streamed_mean(None, sites, weights, norms, [deltas])
    for k, v in weighted_mean(deltas, weights).items():
        np.testing.assert_allclose(plain[k], v, rtol=1e-6, atol=1e-7)
    assert none == []
    with pytest.raises(ValueError, match="needs every update"):
        streamed_mean(RobustAggregation(rule="median"), sites, weights, norms, [deltas])
    with pytest.raises(ValueError, match="got 4 updates for 9"):
        streamed_mean(robust, sites, weights, norms, [deltas[:4]])


def test_weighted_median_by_hand() -> None:
    x = np.array([[1.0, 10.0], [2.0, 20.0], [30.0, 0.0]])
    assert weighted_median(x, np.array([0.1, 0.1, 0.8])).tolist() == [30.0, 0.0]
    assert weighted_median(x, np.full(3, 1 / 3)).tolist() == [2.0, 10.0]
    assert weighted_median(x[:2], np.array([0.5, 0.5])).tolist() == [1.5, 15.0]


@settings(max_examples=50, deadline=None)
@given(honest=st.lists(st.integers(1, 2000), min_size=5, max_size=12),
       tiny=st.lists(st.integers(1, 80), min_size=2, max_size=2),
       push=st.floats(-1e3, 1e3, allow_nan=False))
def test_two_tiny_colluding_sites_move_the_weighted_median_only_within_the_honest_range(
        honest: list[int], tiny: list[int], push: float) -> None:
    # Issue 29: the median gave a 71-patient clinic the vote of a 969-patient hospital;
    # weighted by capped sample share, two small clinics stay inside the honest spread.
    rng = np.random.default_rng(len(honest))
    good = rng.normal(0.1, 0.02, size=(len(honest), 3))
    rows = [*good.tolist(), *[[push, push, push]] * 2]
    robust = RobustAggregation(rule="weighted-median", norm_bound=None, byzantine=2)
    out, _ = robust.aggregate([{"w": np.array(r, np.float32)} for r in rows],
                              [*honest, *tiny], [f"s{i}" for i in range(len(rows))])
    assert (out["w"] >= good.min(axis=0) - 1e-6).all()
    assert (out["w"] <= good.max(axis=0) + 1e-6).all()


@settings(max_examples=50, deadline=None)
@given(honest=st.lists(st.integers(1, 2000), min_size=5, max_size=12),
       declared=st.lists(st.integers(1, 2**62), min_size=2, max_size=2),
       push=st.floats(-1e3, 1e3, allow_nan=False))
def test_two_sites_of_any_declared_size_stay_inside_the_honest_range(
        honest: list[int], declared: list[int], push: float) -> None:
    rng = np.random.default_rng(len(honest))
    good = rng.normal(0.1, 0.02, size=(len(honest), 3))
    rows = [*good.tolist(), *[[push, push, push]] * 2]
    robust = RobustAggregation(rule="weighted-median", norm_bound=None, byzantine=2)
    out, report = robust.aggregate([{"w": np.array(r, np.float32)} for r in rows],
                                   [*honest, *declared], [f"s{i}" for i in range(len(rows))])
    assert (out["w"] >= good.min(axis=0) - 1e-6).all()
    assert (out["w"] <= good.max(axis=0) + 1e-6).all()
    assert sum(r.weight_share for r in report[-2:]) <= 0.4 + 1e-9
