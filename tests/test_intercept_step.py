"""The private intercept step: its sums, the step and the sites it leaves out."""

from __future__ import annotations

import json
import math
import re

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from cardiofed.aggregation.intercept_step import (
    MAX_STEP,
    SENSITIVITY,
    intercept_step,
    intercept_sums,
    shift_intercept,
)
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
from cardiofed.privacy.site_privacy import INTERCEPT_FRACTION, SitePrivacy

SITES = [f"s{k}" for k in range(8)]
NOISE = dict.fromkeys(SITES, 10.0)
COUNTS = dict.fromkeys(SITES, 1000.0)
any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


def honest(step: float, information: float = 150.0) -> dict[str, tuple[float, float]]:
    """Every site's exact sums when the model's intercept is `step` too low."""
    return {site: (step * information, information) for site in SITES}


def test_the_step_is_one_newton_step_over_the_sites_kept() -> None:
    # Golden values: exact sums of a model whose intercept is 0.2 too low, summed.
    rng = np.random.default_rng(0)
    lp = rng.normal(-1.5, 1.0, 20_000)
    y = (rng.random(lp.size) < expit(lp + 0.2)).astype(float)
    parts = np.array_split(np.arange(lp.size), 4)
    sums = {f"s{k}": intercept_sums(y[idx], expit(lp[idx])) for k, idx in enumerate(parts)}

    result = intercept_step(sums, dict.fromkeys(sums, 0.0), dict.fromkeys(sums, 5000.0))

    total_d = sum(d for d, _ in sums.values())
    total_i = sum(i for _, i in sums.values())
    assert result.step == pytest.approx(total_d / total_i)
    assert result.step == pytest.approx(0.2, abs=0.05)
    assert result.kept == list(sums) and result.left_out == []


def test_a_site_whose_events_disagree_is_left_out_and_the_others_set_the_step() -> None:
    sums = honest(0.05)
    sums["s3"] = (1.3 * 150.0, 150.0)  # flipped labels: far more events than predicted

    result = intercept_step(sums, NOISE, COUNTS)

    assert result.left_out == ["s3"]
    assert result.step == pytest.approx(0.05)
    assert result.z["s3"] > 3 and all(abs(result.z[s]) < 1e-9 for s in result.kept)


def test_a_large_site_is_not_left_out_because_of_a_small_one_far_off() -> None:
    # The furthest site goes first and the step is computed again: a site far off must not
    # make a large, agreeing site look off (both would go if all z were judged at once).
    sums = {**honest(0.0, 40.0), "big": (0.0, 600.0), "off": (2.0 * 150.0, 150.0)}
    noise, counts = dict.fromkeys(sums, 10.0), dict.fromkeys(sums, 5000.0)

    result = intercept_step(sums, noise, counts)

    assert result.left_out == ["off"] and "big" in result.kept
    assert result.step == pytest.approx(0.0)


def test_more_than_half_of_the_sites_always_set_the_step() -> None:
    sums = {f"s{k}": (k * 100.0, 100.0) for k in range(5)}  # no two sites agree

    result = intercept_step(sums, dict.fromkeys(sums, 1.0), dict.fromkeys(sums, 1000.0))

    assert len(result.kept) == 3 and len(result.left_out) == 2


@settings(max_examples=200, deadline=None)
@given(d=st.floats(-1e12, 1e12), i=st.floats(-1e12, 1e12), count=st.floats(0, 1e6),
       honest_step=st.floats(-0.5, 0.5))
def test_one_site_cannot_push_the_step_past_its_bound_or_claim_more_than_its_count(
        d: float, i: float, count: float, honest_step: float) -> None:
    # Whatever one site sends, the step is finite and within MAX_STEP. Its information
    # counts for at most count / 4; kept, it is within z_max = 3 standard errors of the
    # step, and the score equation the step solves then gives (honest_step - step) *
    # kept_honest_information = -(D - step * I): the pull of one site is at most 3 of its
    # own standard errors over the information of the honest sites kept (at least half).
    sums = {**honest(honest_step), "attacker": (d, i)}
    noise = {**NOISE, "attacker": 10.0}
    counts = {**COUNTS, "attacker": count}

    result = intercept_step(sums, noise, counts)

    assert math.isfinite(result.step) and abs(result.step) <= MAX_STEP
    weight = min(max(i, 0.0), count / 4)
    if "attacker" in result.kept and abs(result.step) < MAX_STEP:
        honest_i = 150.0 * (len(result.kept) - 1)
        assert 2 * len(result.kept) > len(sums)
        bound = 3.0 * math.sqrt(weight + 100.0 * (1 + MAX_STEP ** 2)) / honest_i
        assert abs(result.step - honest_step) <= bound + 1e-9


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_the_shift_moves_every_log_odds_by_the_step_and_nothing_else(kind: str) -> None:
    from cardiofed.models.kinds import OUTPUT_BIAS
    from cardiofed.models.networks import get_weights, make_model, score

    weights = get_weights(make_model(kind, 4, seed=0))
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)

    shifted = shift_intercept(weights, 0.3, kind)

    assert list(weights)[-1] == OUTPUT_BIAS[kind]  # the parameter added to every log-odds
    lp = lambda w: np.log(score(kind, w, x)) - np.log1p(-score(kind, w, x))  # noqa: E731
    np.testing.assert_allclose(lp(shifted) - lp(weights), 0.3, atol=1e-4)
    assert all(np.array_equal(weights[k], shifted[k]) for k in weights if k != OUTPUT_BIAS[kind])


@pytest.mark.parametrize(("args", "message"), [
    (({}, {}, {}), "An intercept step needs at least one site's sums; got none."),
    (({"a": (math.nan, 1.0)}, {"a": 1.0}, {"a": 10.0}),
     "Site 'a''s intercept sums must be two finite numbers (D, I); got (nan, 1.0)."),
    (({"a": (0.0, 1.0)}, {}, {"a": 10.0}), "Site 'a''s noise_std must be finite and >= 0; "
                                           "got None."),
    (({"a": (0.0, 1.0)}, {"a": 1.0}, {"a": -1.0}),
     "Site 'a''s record count must be finite and >= 0; got -1.0."),
])
def test_bad_inputs_are_refused_by_name(args: tuple[dict, dict, dict], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        intercept_step(*args)


@settings(max_examples=100, deadline=None)
@given(probs=hnp.arrays(np.float64, 30, elements=any_float),
       extra_prob=any_float, extra_label=st.integers(0, 1),
       labels=hnp.arrays(np.int64, 30, elements=st.integers(0, 1)))
def test_one_record_moves_the_sums_by_at_most_the_sensitivity(
        probs: np.ndarray, extra_prob: float, extra_label: int, labels: np.ndarray) -> None:
    # Whatever risks the coordinator's model gives (NaN, inf, out of [0, 1]), the sums are
    # finite and adding one patient moves them by at most SENSITIVITY.
    without = np.array(intercept_sums(labels, probs))
    with_one = np.array(intercept_sums(np.append(labels, extra_label),
                                       np.append(probs, extra_prob)))

    assert np.isfinite(without).all() and np.isfinite(with_one).all()
    assert np.linalg.norm(with_one - without) <= SENSITIVITY + 1e-9


def test_the_release_takes_what_training_left_of_its_share() -> None:
    # With the intercept step planned, DP-SGD stops short of the training share by
    # INTERCEPT_FRACTION of it; the release brings the ledger to the share and is charged
    # first, as a training release; a second one is refused, charging nothing.
    from cardiofed.training.local import LocalTrainingConfig

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 3)), (rng.random(400) < 0.3).astype(float)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=400)
    ledger.record([], "statistics release", kind="statistics", study="s", released_n=400.0)
    config = LocalTrainingConfig(batch_size=64, local_epochs=1)
    privacy = SitePrivacy(ledger=ledger, local=config, rounds=2, study="s",
                          intercept_step=True)
    from cardiofed.models.networks import make_model

    model = make_model("logistic", 3, seed=0)
    for rnd in (1, 2):
        privacy.train(model, x, y, config, seed=rnd)
    trained = ledger.spent()
    assert trained == pytest.approx(0.9 * (1 - INTERCEPT_FRACTION), rel=0.02)

    d, i, std = privacy.release_intercept_sums(y, np.full(400, 0.3))

    assert math.isfinite(d) and math.isfinite(i) and std > 0
    assert ledger.spent() == pytest.approx(0.9, rel=0.01) and ledger.spent() <= 0.9 + 1e-9
    assert ledger.entries[-1]["kind"] == "train" and ledger.entries[-1]["intercept_step"]
    entries = len(ledger.entries)
    with pytest.raises(PrivacyBudgetExceeded, match=re.escape(
            "Site 'a' has made this study's intercept step release; it makes one per study.")):
        privacy.release_intercept_sums(y, np.full(400, 0.3))
    assert len(ledger.entries) == entries


@pytest.mark.parametrize("settings", [
    {"dp_intercept_step": True, "dp_epsilon": 1.0, "secure_aggregation": True},
    {"dp_intercept_step": True, "attribution": {"covariates": ["age"]}},
])
def test_an_intercept_step_over_secure_sums_or_in_an_analysis_is_refused(
        settings: dict[str, object]) -> None:
    from cardiofed.simulation.config import SimulationConfig

    with pytest.raises(ConfigurationError, match=re.escape(
            "dp_intercept_step ends a model's training rounds with each site's own intercept "
            "sums: switch it off under secure_aggregation (its secure sums are not built "
            "yet) and in attribution and survival studies")):
        SimulationConfig.create(**settings)
    assert SimulationConfig.create(dp_epsilon=1.0).intercept_step  # on by default under DP
    assert not SimulationConfig.create(dp_epsilon=1.0, secure_aggregation=True).intercept_step
    assert not SimulationConfig.create().intercept_step


def test_a_private_simulation_ends_training_with_the_step_and_reports_it() -> None:
    # Each site sends its two noisy sums (and nothing else new); the step the coordinator
    # took is in the result and its summary, and it moved the released model's intercept.
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.experiments.summary import intercept_summary
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import run_experiment

    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.2)
    sent: list[tuple[str, str, bytes]] = []
    settings = {"dp_epsilon": 2.0, "rounds": 2, "seed": 0, "local_steps": 2, "batch_size": 512}
    result = run_experiment(data, SimulationConfig.create(**settings), baselines=False,
                            outbox=lambda *message: sent.append(message))
    off = run_experiment(data, SimulationConfig.create(**settings, dp_intercept_step=False),
                         baselines=False)

    step = result.intercept_step
    assert step is not None and off.intercept_step is None
    assert sorted(step.kept + step.left_out) == sorted(s.name for s in data.sites)
    releases = [payload for _, kind, payload in sent if kind == "intercept"]
    assert len(releases) == len(data.sites)
    assert all(set(json.loads(p)) == {"score", "information", "noise_std"} for p in releases)
    summary = intercept_summary(result)
    assert summary is not None and summary.startswith(f"Intercept step: {step.step:+.3f} ")
    assert intercept_summary(off) is None


def test_a_non_private_simulation_takes_the_step_from_exact_sums_when_asked() -> None:
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import run_experiment

    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.2)
    config = SimulationConfig.create(rounds=2, seed=0, dp_intercept_step=True)
    result = run_experiment(data, config, baselines=False)

    step = result.intercept_step
    assert step is not None and step.left_out == []  # 2 rounds: far from converged
    total = np.array([intercept_sums(s.y_train, score_raw(result, s)) for s in result.sites])
    assert step.step == pytest.approx(total[:, 0].sum() / total[:, 1].sum(), abs=1e-4)


def score_raw(result: object, site: object) -> np.ndarray:
    """The trained model's risks on a site's training rows, before the step."""
    from cardiofed.models.networks import score

    weights = shift_intercept(result.federated.weights,  # type: ignore[attr-defined]
                              -result.intercept_step.step, "logistic")  # type: ignore[attr-defined]
    return score("logistic", weights, site.x_train)  # type: ignore[attr-defined]


def test_the_summary_names_a_site_left_out_and_which_way_it_disagrees() -> None:
    from types import SimpleNamespace

    from cardiofed.experiments.summary import intercept_summary

    sums = {**honest(0.05), "s3": (1.3 * 150.0, 150.0), "s5": (-1.3 * 150.0, 150.0)}
    result = SimpleNamespace(intercept_step=intercept_step(sums, NOISE, COUNTS))

    assert intercept_summary(result) == (  # type: ignore[arg-type]
        "Intercept step: +0.050 on the log-odds scale, from the private sums of 6 of 8 "
        "sites; left out: s5 (z -12.8: fewer events than the model predicts; check its "
        "outcome coding); s3 (z +11.9: more events than the model predicts; check its "
        "outcome coding)")


@pytest.mark.parametrize(("arrays", "manifest", "message"), [
    ({"sums": np.zeros(3), "noise_std": np.zeros(1)}, {"num_samples": "10"},
     "Intercept payload must hold finite float64 'sums' of shape (2,) and 'noise_std' of "
     "shape (1,); got {'sums': ((3,), dtype('float64')), 'noise_std': ((1,), "
     "dtype('float64'))}."),
    ({"sums": np.array([np.inf, 1.0]), "noise_std": np.zeros(1)}, {"num_samples": "10"},
     "Intercept payload must hold finite float64 'sums'"),
    ({"sums": np.zeros(2), "noise_std": np.array([-1.0])}, {"num_samples": "10"},
     "Intercept field 'noise_std' must be in [0, "),
    ({"sums": np.array([11.0, 1.0]), "noise_std": np.zeros(1)}, {"num_samples": "10"},
     "Intercept sums (11, 1) are beyond what 10 records allow (|D| <= n, 0 <= I <= n / 4, "
     "give or take 10 noise SDs)."),
    ({"sums": np.array([0.0, 3.0]), "noise_std": np.zeros(1)}, {"num_samples": "10"},
     "Intercept sums (0, 3) are beyond what 10 records allow"),
    ({"sums": np.zeros(2), "noise_std": np.zeros(1)}, {"num_samples": "0"},
     "Manifest field 'num_samples' must be an integer in [1, "),
])
def test_the_coordinator_refuses_intercept_sums_no_site_could_release(
        arrays: dict[str, np.ndarray], manifest: dict[str, str], message: str) -> None:
    from cardiofed.coordinator.payloads import check_intercept
    from cardiofed.exceptions import InvalidUpdate

    with pytest.raises(InvalidUpdate, match=re.escape(message)):
        check_intercept(arrays, manifest)
    noisy = {"sums": np.array([12.0, 3.0]), "noise_std": np.array([1.0])}
    assert check_intercept(noisy, {"num_samples": "10"}) == 10  # within 10 noise SDs
