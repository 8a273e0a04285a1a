"""The release gate, as an active coordinator would test it: whatever numbers it sends,
every release a site makes is finite and each patient's part in it is bounded, and what
the site refuses depends on the numbers sent, never on a record.

The attacks come from the audit of 2026-12-06: a tiny standard deviation or huge
coefficients overflowed inside the node, inf - inf gave NaN, clipping does not bound NaN
and noise does not hide it, so each release answered "does any patient satisfy P?".
Adversarial inputs are drawn by hypothesis, not picked by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cardiofed.causal.study import (
    AttributionPlan,
    SiteArrays,
    check_state,
    release_blocks,
    site_step,
)
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.evaluation.private_metrics import score_bin_edges
from cardiofed.exceptions import ConfigurationError, TaskRefused
from cardiofed.models.networks import get_weights, make_model, score, set_weights
from cardiofed.names import is_safe_name, safe_name
from cardiofed.privacy.accountant import GaussianEvent
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
from cardiofed.privacy.dp_sgd import DPConfig, train_local_dp
from cardiofed.privacy.release_gate import (
    WEIGHT_MAX,
    Z_MAX,
    bounded_rows,
    check_preprocessor,
    check_weights,
)
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.training.local import LocalTrainingConfig

RANGES = [(18.0, 110.0), (0.0, 1.0), (60.0, 300.0), (0.0, 700.0)]
D = len(RANGES)
SLOW = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Anything a float can be: the coordinator's numbers and a patient's (unchecked) values.
anything = st.floats(allow_nan=True, allow_infinity=True, width=64)
extreme = st.one_of(anything, st.sampled_from([0.0, 1e-300, -1e-300, 1e300, -1e300, 5e-324]))


def vectors(size: int) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, size, elements=extreme)


def site_rows(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    low, high = np.array(RANGES).T
    x = low + rng.random((n, D)) * (high - low)
    x[:, 1] = rng.integers(0, 2, n)
    x[rng.random(x.shape) < 0.1] = np.nan
    return x, rng.integers(0, 2, n).astype(np.float32)


def valid_preprocessor() -> Preprocessor:
    return Preprocessor(fill=np.array([55.0, 0.0, 130.0, 200.0]),
                        mean=np.array([55.0, 0.5, 130.0, 200.0]),
                        std=np.array([10.0, 0.5, 20.0, 40.0]))


# --- the preprocessor and the rows ------------------------------------------------------------

@SLOW
@given(fill=vectors(D), mean=vectors(D), std=vectors(D),
       patient=hnp.arrays(np.float64, (3, D), elements=extreme))
def test_any_preprocessor_is_refused_or_gives_bounded_rows(
        fill: np.ndarray, mean: np.ndarray, std: np.ndarray, patient: np.ndarray) -> None:
    x, _ = site_rows()
    rows = np.vstack([x, patient])
    sent = Preprocessor(fill=fill, mean=mean, std=std)
    try:
        pre = check_preprocessor(sent, RANGES)
    except TaskRefused:
        # The refusal depends on what was sent alone: the same with other records.
        with pytest.raises(TaskRefused):
            check_preprocessor(sent, RANGES)
        return
    with np.errstate(all="raise"):  # nothing overflows on the way
        z = bounded_rows(pre, rows, RANGES)
    assert z.dtype == np.float32 and np.isfinite(z).all() and np.abs(z).max() <= Z_MAX


@pytest.mark.parametrize(("change", "message"), [
    ({"fill": [55.0, 0.0, 130.0, math.nan]}, "fill value of column 3 (nan) is not within"),
    ({"fill": [500.0, 0.0, 130.0, 200.0]}, "fill value of column 0 (500.0) is not within "
                                           "the site's range [18, 110]"),
    ({"std": [10.0, 0.5, -1.0, 40.0]}, "scales must be finite, scales >= 0"),
    ({"mean": [55.0, 0.5, 1e12, 200.0]}, "mean of model column 2"),
])
def test_a_bad_preprocessor_is_refused_naming_the_value(change: dict[str, list[float]],
                                                        message: str) -> None:
    values = {**valid_preprocessor().to_arrays(), **{k: np.array(v) for k, v in change.items()}}
    with pytest.raises(TaskRefused, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        check_preprocessor(Preprocessor(**values), RANGES)


def test_a_tiny_scale_is_floored_so_a_threshold_cannot_be_planted() -> None:
    # The attack: mean at a threshold, SD 1e-300: (age - 70) / 1e-300 is +-inf (or NaN),
    # "is any patient over 70?". Floored, it is a bounded, ordinary feature.
    sent = Preprocessor(fill=np.array([55.0, 0.0, 130.0, 200.0]),
                        mean=np.array([70.0, 0.5, 130.0, 200.0]),
                        std=np.array([1e-300, 0.5, 20.0, 40.0]))
    pre = check_preprocessor(sent, RANGES)
    assert pre.std[0] == pytest.approx(1e-3 * (110 - 18))
    z = bounded_rows(pre, np.array([[71.0, 1, 120, 180], [69.0, 0, 120, 180]]), RANGES)
    assert np.isfinite(z).all() and np.abs(z).max() <= Z_MAX


@SLOW
@given(weights=hnp.arrays(np.float32, (1, D), elements=st.floats(width=32, allow_nan=True)),
       bias=hnp.arrays(np.float32, (1,), elements=st.floats(width=32, allow_nan=True)))
def test_any_weights_are_refused_or_bounded(weights: np.ndarray, bias: np.ndarray) -> None:
    expected = get_weights(make_model("logistic", D, seed=0))
    sent = {"linear.weight": weights, "linear.bias": bias}
    try:
        checked = check_weights(sent, expected)
    except TaskRefused:
        assert not all(np.isfinite(v).all() and np.abs(v).max() <= WEIGHT_MAX
                       for v in sent.values())
        return
    assert all(np.abs(v).max() <= WEIGHT_MAX for v in checked.values())


def test_weights_of_another_model_are_refused() -> None:
    expected = get_weights(make_model("logistic", D, seed=0))
    with pytest.raises(TaskRefused, match="named"):
        check_weights({"linear.weight": expected["linear.weight"]}, expected)
    with pytest.raises(TaskRefused, match=r"has shape \(1, 5\)"):
        check_weights({**expected, "linear.weight": np.zeros((1, 5), np.float32)}, expected)


# --- DP-SGD: one patient's part is bounded, whatever was sent -----------------------------------

bounded_weight = st.floats(min_value=-WEIGHT_MAX, max_value=WEIGHT_MAX, width=32)


@SLOW
@given(model_kind=st.sampled_from(["logistic", "mlp"]), seed=st.integers(0, 2**16),
       where=hnp.arrays(np.float64, D, elements=st.floats(-1.0, 2.0)),
       std=hnp.arrays(np.float64, D, elements=st.one_of(
           st.floats(0.0, 1e3), st.sampled_from([1e-300, 5e-324, 1e-12]))),
       scale=st.floats(min_value=-WEIGHT_MAX, max_value=WEIGHT_MAX),
       patient=hnp.arrays(np.float64, D, elements=extreme), label=st.integers(0, 1))
def test_one_patient_moves_a_dp_sgd_step_by_at_most_the_clipping_bound(
        model_kind: str, seed: int, where: np.ndarray, std: np.ndarray, scale: float,
        patient: np.ndarray, label: int) -> None:
    # Neighbouring data sets, with and without an adversarial patient; a coordinator's
    # preprocessor and (huge) weights that pass the gate; one full-batch step with the
    # same noise draw: the two models differ by lr x the patient's clipped gradient /
    # the public expected batch, at most lr * C / expected batch. Without the gate the
    # difference is NaN or unbounded (the old behaviour). The bound is the sensitivity:
    # the weights' clipping bound and the output bias's, sqrt(2^2 + 1^2).
    x, y = site_rows()
    low, high = np.array(RANGES).T
    mean = low + where * (high - low)  # anywhere within a span of the column's values
    pre = check_preprocessor(Preprocessor(fill=valid_preprocessor().fill, mean=mean, std=std),
                             RANGES)
    model = make_model(model_kind, D, seed=seed)
    weights = {k: np.clip(v * scale, -WEIGHT_MAX, WEIGHT_MAX)
               for k, v in get_weights(model).items()}
    lr, n_public = 0.1, 50
    dp = DPConfig(noise_multiplier=1e-6, max_grad_norm=2.0)  # the output bias's bound: 1
    config = LocalTrainingConfig(lr=lr, batch_size=10_000, local_steps=1)

    def step(rows: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        m = make_model(model_kind, D, seed=0)
        set_weights(m, check_weights(weights, get_weights(m)))
        train_local_dp(m, bounded_rows(pre, rows, RANGES), labels, config, dp,
                       n_public=n_public, insecure_generator=torch.Generator().manual_seed(7))
        return get_weights(m)

    without = step(x, y)
    with_patient = step(np.vstack([x, patient]), np.append(y, np.float32(label)))
    diff = np.sqrt(sum(float(np.sum((with_patient[k].astype(np.float64) - without[k]) ** 2))
                       for k in without))
    assert all(np.isfinite(v).all() for v in with_patient.values())
    # float32 weights: each coordinate is rounded to the spacing at its magnitude.
    largest = max(float(np.abs(v).max()) for v in without.values())
    params = sum(v.size for v in without.values())
    rounding = 2 * math.sqrt(params) * float(np.spacing(np.float32(max(largest, 1.0))))
    assert diff <= lr * dp.sensitivity / n_public * (1 + 1e-3) + rounding


def test_a_failure_inside_dp_sgd_releases_noise_alone_and_is_charged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import cardiofed.privacy.site_privacy as site_privacy

    def fail(*args: Any, **kwargs: Any) -> None:
        raise FloatingPointError("as if a record overflowed")

    monkeypatch.setattr(site_privacy, "train_local_dp", fail)
    x, y = site_rows()
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=len(y))
    privacy = SitePrivacy(ledger=ledger, local=LocalTrainingConfig(), rounds=1, study="s")
    ledger.record([GaussianEvent(noise_multiplier=1e4, sample_rate=1.0, steps=1)],
                  "statistics", kind="statistics", study="s", released_n=40.0)
    model = make_model("logistic", D, seed=0)
    before = get_weights(model)

    privacy.train(model, bounded_rows(valid_preprocessor(), x, RANGES), y,
                  LocalTrainingConfig(), seed=0)

    after = get_weights(model)
    assert [e["kind"] for e in ledger.entries] == ["statistics", "train"]  # charged
    moved = np.concatenate([(after[k] - before[k]).ravel() for k in before])
    assert np.isfinite(moved).all() and np.abs(moved).max() > 0  # noise, not a signal


# --- evaluation ---------------------------------------------------------------------------------

@SLOW
@given(probs=hnp.arrays(np.float64, 40, elements=extreme))
def test_an_evaluation_release_is_computed_whatever_the_scores(probs: np.ndarray) -> None:
    # A NaN score used to crash the node before anything was charged: an uncharged
    # one-bit answer per query. Now the release is charged first and always computed.
    _, y = site_rows()
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=40)
    privacy = SitePrivacy(ledger=ledger, study="s")

    neg, pos, noise = privacy.release_evaluation(y, probs, score_bin_edges())

    assert np.isfinite(neg).all() and np.isfinite(pos).all() and noise > 0
    assert [e["kind"] for e in ledger.entries] == ["evaluate"]


@SLOW
@given(weights=hnp.arrays(np.float32, (1, D), elements=bounded_weight),
       patient=hnp.arrays(np.float64, D, elements=extreme), label=st.integers(0, 1))
def test_one_patient_changes_the_score_histograms_by_one_count(
        weights: np.ndarray, patient: np.ndarray, label: int) -> None:
    from cardiofed.evaluation.private_metrics import score_histograms

    x, y = site_rows()
    pre = valid_preprocessor()
    model = {"linear.weight": weights, "linear.bias": np.zeros(1, np.float32)}

    def hist(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            p = score("logistic", model, bounded_rows(pre, rows, RANGES))
        assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
        return np.concatenate(score_histograms(labels, p, score_bin_edges()))

    changed = hist(np.vstack([x, patient]), np.append(y, label)) - hist(x, y)
    assert np.abs(changed).sum() == 1


# --- attribution --------------------------------------------------------------------------------

PRIVATE_PLAN = AttributionPlan.model_validate({
    "treatment": "bp_treated", "covariates": ["age", "sex", "systolic_bp",
                                              "total_cholesterol"],
    "private": True, "methods": ["overlap", "iptw"], "trim": 0.05})


def attribution_rows(n: int = 40) -> SiteArrays:
    x, y = site_rows(n)
    x = np.nan_to_num(x, nan=50.0)
    return SiteArrays("a", x, (np.arange(n) % 2).astype(int), y.astype(int))


@SLOW
@given(step=st.sampled_from(["newton", "estimate", "sandwich"]),
       mean=hnp.arrays(np.float64, D, elements=extreme),
       sd=hnp.arrays(np.float64, D, elements=extreme),
       beta=hnp.arrays(np.float64, D + 1, elements=extreme),
       means=hnp.arrays(np.float64, 4, elements=extreme),
       patient=hnp.arrays(np.float64, D, elements=extreme), treated=st.integers(0, 1),
       outcome=st.integers(0, 1))
def test_any_attribution_state_is_refused_or_each_patients_part_is_bounded(
        step: str, mean: np.ndarray, sd: np.ndarray, beta: np.ndarray, means: np.ndarray,
        patient: np.ndarray, treated: int, outcome: int) -> None:
    # The attack: saturating coefficients or a tiny SD made one patient's row overflow,
    # and NaN carried a one-bit answer through the noise. Through the gate, every
    # block of every step moves by at most its bound when one patient joins.
    state: dict[str, Any] = {
        "step": step, "columns": PRIVATE_PLAN.covariates, "iterations": 1,
        "inputs": {"mean": mean.tolist(), "sd": sd.tolist(), "beta": beta.tolist(),
                   "means": {"overlap": means[:2].tolist(), "iptw": means[2:].tolist()}}}
    try:
        check_state(PRIVATE_PLAN, state, RANGES)
    except (ConfigurationError, ValueError, TypeError):
        return
    rows = attribution_rows()
    joined = SiteArrays("a", np.vstack([rows.x, patient]), np.append(rows.treated, treated),
                        np.append(rows.outcome, outcome))
    with np.errstate(all="ignore"):
        before = site_step(PRIVATE_PLAN, state, rows, 0, RANGES)
        after = site_step(PRIVATE_PLAN, state, joined, 0, RANGES)
    blocks = release_blocks(PRIVATE_PLAN, step, D, state["inputs"]["means"])
    for names, bound in blocks.values():
        change = np.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in names))
        assert np.isfinite(change) and change <= bound * (1 + 1e-9) + 1e-9, names


def test_a_saturating_state_is_refused_naming_the_value() -> None:
    state = {"step": "newton", "columns": PRIVATE_PLAN.covariates, "iterations": 1,
             "inputs": {"mean": [55.0, 0.5, 130.0, 200.0], "sd": [1e-9, 0.5, 20.0, 40.0],
                        "beta": [0.0] * 5}}
    with pytest.raises(ConfigurationError, match="SDs .* must be > 0 and at least 0.05 of "
                                                 "each half range"):
        check_state(PRIVATE_PLAN, state, RANGES)
    state["inputs"]["sd"] = [10.0, 0.5, 20.0, 40.0]
    state["inputs"]["beta"] = [0.0, 1e6, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigurationError, match="'beta' must be 5 finite numbers at most"):
        check_state(PRIVATE_PLAN, state, RANGES)


# --- names --------------------------------------------------------------------------------------

@settings(deadline=None)
@given(name=st.text(max_size=80))
def test_a_name_is_safe_only_in_the_safe_character_set(name: str) -> None:
    if is_safe_name(name):
        assert "/" not in name and "\\" not in name and name not in (".", "..")
        assert name[0].isascii() and name[0].isalnum() and len(name) <= 64
        assert safe_name(name) == name
    else:
        with pytest.raises(ConfigurationError, match="must start with a letter or digit"):
            safe_name(name, "site name")


@pytest.mark.parametrize("name", ["../../outside/tier2_a", "..", ".", "tier2 a", "", "a/b",
                                  "a" * 65, "tier2_a\n", "ü"])
def test_unsafe_names_are_refused(name: str) -> None:
    assert not is_safe_name(name)
