"""Site weighting rules: type-balanced shares, q-FFL, agnostic FL, quality, combination."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cardiofed.aggregation.site_weights import (
    agnostic_weights,
    combine,
    project_to_simplex,
    qffl_weights,
    quality_weights,
    type_balanced_weights,
)
from cardiofed.aggregation.weighted_mean import sample_size_weights
from cardiofed.exceptions import ConfigurationError

TYPES = ["tier3", "tier3", "tier2", "community", "community"]
SIZES = [3000, 1000, 800, 300, 100]

# --- Type-balanced ----------------------------------------------------------------------------


def test_type_balanced_equal_shares_by_hand() -> None:
    w = type_balanced_weights(TYPES, SIZES)

    # Three types present -> 1/3 each, split within a type by size:
    # tier3: N = 4000 -> 1/3 * 3000/4000 = 1/4, 1/3 * 1000/4000 = 1/12
    # tier2: one site -> 1/3
    # community: N = 400 -> 1/3 * 300/400 = 1/4, 1/3 * 100/400 = 1/12
    np.testing.assert_allclose(w, [1 / 4, 1 / 12, 1 / 3, 1 / 4, 1 / 12])
    assert math.isclose(sum(w), 1.0)


def test_type_balanced_custom_shares_are_relative_and_ignore_absent_types() -> None:
    w = type_balanced_weights(TYPES, SIZES,
                              shares={"tier3": 2.0, "tier2": 1.0, "community": 1.0,
                                      "hospital": 5.0})

    # "hospital" is absent; shares 2:1:1 over the present types -> 1/2, 1/4, 1/4:
    # tier3: 1/2 * 3/4 = 3/8, 1/2 * 1/4 = 1/8;  tier2: 1/4;
    # community: 1/4 * 3/4 = 3/16, 1/4 * 1/4 = 1/16
    np.testing.assert_allclose(w, [3 / 8, 1 / 8, 1 / 4, 3 / 16, 1 / 16])


def test_type_balanced_type_without_samples_counts_as_absent() -> None:
    w = type_balanced_weights(["a", "b", "b"], [10, 0, 0])

    # type b has N = 0 -> weight 0, and type a takes everything.
    assert w == [1.0, 0.0, 0.0]


def test_type_balanced_with_one_type_is_sample_size_weighting() -> None:
    sizes = [5, 15, 30]
    w = type_balanced_weights(["tier2"] * 3, sizes)

    # 5/50, 15/50, 30/50
    np.testing.assert_allclose(w, [0.1, 0.3, 0.6])


@pytest.mark.parametrize(
    ("types", "sizes", "shares", "error", "match"),
    [
        (["a"], [1, 2], None, ValueError, "lengths"),
        ([], [], None, ValueError, "num_samples"),
        (["a", "b"], [1, -1], None, ValueError, "num_samples must be integers >= 0"),
        (["a", "b"], [1, 2.5], None, ValueError, "num_samples"),
        (["a", ""], [1, 2], None, ValueError, "site_types"),
        (["a", "b"], [1, 2], {"a": 1.0}, ConfigurationError, r"'shares'.*\['b'\]"),
        (["a", "b"], [1, 2], {"a": 1.0, "b": -1.0}, ConfigurationError, "'shares'.*-1.0"),
        (["a", "b"], [1, 2], {"a": 0.0, "b": 0.0}, ValueError, "every site's weight is 0"),
        (["a", "b"], [0, 0], None, ValueError, "every site's weight is 0"),
    ],
)
def test_type_balanced_validation(types: list[str], sizes: list[int],
                                  shares: dict[str, float] | None, error: type[Exception],
                                  match: str) -> None:
    with pytest.raises(error, match=match):
        type_balanced_weights(types, sizes, shares)


# --- q-FFL ------------------------------------------------------------------------------------


def test_qffl_by_hand() -> None:
    w = qffl_weights([0.5, 0.2, 0.4], [100, 300, 100], q=2.0)

    # n * L^2 = 100 * 0.25 = 25, 300 * 0.04 = 12, 100 * 0.16 = 16; total 53
    np.testing.assert_allclose(w, [25 / 53, 12 / 53, 16 / 53])


def test_qffl_q0_equals_sample_size_weights() -> None:
    sizes = [120, 30, 50]
    w = qffl_weights([0.7, 0.1, 0.0], sizes, q=0)
    raw = sample_size_weights(sizes)

    # L^0 = 1 (also for a zero loss): 120/200, 30/200, 50/200
    np.testing.assert_allclose(w, np.array(raw) / sum(raw))
    np.testing.assert_allclose(w, [0.6, 0.15, 0.25])


def test_qffl_large_q_concentrates_on_the_worst_site_without_overflow() -> None:
    w = qffl_weights([2.0, 1.0, 1.9], [10, 1000, 10], q=500.0)

    # 2^500 overflows nothing in log space; (1.9/2)^500 ~ 7e-12 -> all weight on site 0.
    assert w[0] == pytest.approx(1.0)
    assert w[1] < 1e-100
    assert all(math.isfinite(v) for v in w)


def test_qffl_zero_loss_with_positive_q_gets_zero_weight() -> None:
    # 10 * 0^1 = 0, 10 * 0.5 = 5 -> [0, 1]
    assert qffl_weights([0.0, 0.5], [10, 10], q=1.0) == [0.0, 1.0]


@pytest.mark.parametrize(
    ("losses", "sizes", "q", "error", "match"),
    [
        ([0.1], [1], -1.0, ConfigurationError, "'q' parameter must be a finite number >= 0"),
        ([0.1], [1], math.nan, ConfigurationError, "'q'"),
        ([0.1], [1], True, ConfigurationError, "'q'"),
        ([0.1, -0.2], [1, 1], 1.0, ValueError, "losses must be >= 0"),
        ([0.1, math.inf], [1, 1], 1.0, ValueError, "losses must be finite"),
        ([0.1, 0.2], [1], 1.0, ValueError, "lengths"),
        ([0.0, 0.0], [1, 1], 1.0, ValueError, "every site's weight is 0"),
    ],
)
def test_qffl_validation(losses: list[float], sizes: list[int], q: float,
                         error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        qffl_weights(losses, sizes, q)


# --- Simplex projection and agnostic FL -------------------------------------------------------


def test_project_to_simplex_known_example() -> None:
    # v = (0.5, 0.3, -0.1): u sorted = (0.5, 0.3, -0.1), cumsum - 1 = (-0.5, -0.2, -0.3);
    # u_j - css_j / j = (1.0, 0.4, 0.0) -> rho = 2, theta = -0.2 / 2 = -0.1;
    # w = max(v + 0.1, 0) = (0.6, 0.4, 0)
    np.testing.assert_allclose(project_to_simplex([0.5, 0.3, -0.1]), [0.6, 0.4, 0.0])
    # (2, 0): theta = (2 - 1)/1 = 1 at rho = 1 (0 - (2 - 1)/2 < 0) -> (1, 0)
    np.testing.assert_allclose(project_to_simplex([2.0, 0.0]), [1.0, 0.0])
    # constant shifts: (5, 5, 5, 5) -> uniform
    np.testing.assert_allclose(project_to_simplex([5.0] * 4), [0.25] * 4)


def test_project_to_simplex_properties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(scale=3.0, size=int(rng.integers(1, 12)))
        w = np.array(project_to_simplex(v))
        assert w.min() >= 0.0
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        # Idempotent on the simplex.
        np.testing.assert_allclose(project_to_simplex(w), w, atol=1e-12)
        # Optimality (Duchi et al.): w = max(v - theta, 0) for one theta, so the
        # positive entries all moved by the same amount and zeroed ones were <= theta.
        theta = (v - w)[w > 0]
        assert np.ptp(theta) < 1e-9
        assert np.all(v[w == 0] <= theta[0] + 1e-9)


def test_project_to_simplex_validation() -> None:
    with pytest.raises(ValueError, match="v must be a non-empty 1-D"):
        project_to_simplex([])
    with pytest.raises(ValueError, match="v must be finite"):
        project_to_simplex([0.1, math.nan])


def test_agnostic_weights_by_hand() -> None:
    # From uniform (1/3 each), step 1, losses (0.6, 0.3, 0.0):
    # lambda + L = (0.9333, 0.6333, 0.3333), sum 1.9 -> theta = 0.9/3 = 0.3 with all
    # three positive (0.3333 - 0.3 > 0) -> (0.6333, 0.3333, 0.0333)
    w = agnostic_weights([0.6, 0.3, 0.0], None, step=1.0)
    np.testing.assert_allclose(w, [19 / 30, 10 / 30, 1 / 30])

    # Next step from there with the same losses and step 1:
    # (1.2333, 0.6333, 0.0333): rho = 2 -> theta = (1.8667 - 1)/2 = 0.4333
    # -> (0.8, 0.2, 0)
    w2 = agnostic_weights([0.6, 0.3, 0.0], w, step=1.0)
    np.testing.assert_allclose(w2, [0.8, 0.2, 0.0], atol=1e-12)


def test_agnostic_weights_equal_losses_keep_the_mixture() -> None:
    prev = [0.5, 0.3, 0.2]
    np.testing.assert_allclose(agnostic_weights([0.4, 0.4, 0.4], prev, step=0.7), prev)


def test_agnostic_weights_iterate_toward_the_worst_site() -> None:
    lam: list[float] | None = None
    for _ in range(50):
        lam = agnostic_weights([0.30, 0.50, 0.45], lam, step=0.5)
    assert lam == pytest.approx([0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("losses", "previous", "step", "error", "match"),
    [
        ([0.1, 0.2], None, 0.0, ConfigurationError, "'step' parameter must be .* > 0; got 0.0"),
        ([0.1, 0.2], None, math.inf, ConfigurationError, "'step'"),
        ([0.1, 0.2], [1.0], 1.0, ValueError, "lengths"),
        ([0.1, 0.2], [0.7, 0.7], 1.0, ValueError, "summing to 1"),
        ([0.1, 0.2], [1.5, -0.5], 1.0, ValueError, "previous must be >= 0"),
        ([0.1, math.nan], None, 1.0, ValueError, "losses must be finite"),
    ],
)
def test_agnostic_weights_validation(losses: list[float], previous: list[float] | None,
                                     step: float, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        agnostic_weights(losses, previous, step=step)


# --- Quality weights and combine --------------------------------------------------------------


def test_quality_weights() -> None:
    assert quality_weights([False, True, False]) == [1.0, 0.0, 1.0]
    assert quality_weights([np.bool_(True), False], downweight=0.25) == [0.25, 1.0]


@pytest.mark.parametrize("downweight", [-0.1, 1.5, math.nan, True])
def test_quality_weights_rejects_downweight(downweight: float) -> None:
    with pytest.raises(ConfigurationError, match=r"'downweight' parameter must be in \[0, 1\]"):
        quality_weights([True], downweight=downweight)


def test_quality_weights_rejects_non_boolean_flags() -> None:
    with pytest.raises(ValueError, match="flags must be booleans"):
        quality_weights([1, 0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="flags"):
        quality_weights([])


def test_combine_by_hand() -> None:
    balanced = type_balanced_weights(TYPES, SIZES)  # [1/4, 1/12, 1/3, 1/4, 1/12]
    quality = quality_weights([False, False, True, False, False], downweight=0.5)

    w = combine(balanced, quality)

    # products: 1/4, 1/12, 1/6, 1/4, 1/12 = (3, 1, 2, 3, 1)/12; sum 10/12
    # -> (3, 1, 2, 3, 1)/10
    np.testing.assert_allclose(w, [0.3, 0.1, 0.2, 0.3, 0.1])


def test_combine_single_list_normalises() -> None:
    np.testing.assert_allclose(combine([2.0, 6.0]), [0.25, 0.75])


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        ((), "at least one"),
        (([1.0, 0.0], [0.0, 1.0]), "every site's weight is 0"),
        (([1.0, 2.0], [1.0]), "lengths"),
        (([1.0, -2.0],), "must be >= 0"),
    ],
)
def test_combine_validation(lists: tuple[list[float], ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        combine(*lists)
