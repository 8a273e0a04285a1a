"""A site's privacy budget: validation, the persisted ledger, refusals, and DP in the
simulated federation.

Most schedules here use a sampling rate of 1 (the lot is the whole site): its RDP has a
closed form, so calibration takes milliseconds; subsampled accounting is covered in
``test_privacy_accounting.py``.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cardiofed.algorithms.base import FederatedAlgorithm
from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import get_weights, make_model
from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget, open_site_ledger
from cardiofed.privacy.dp_sgd import DPConfig, train_local_dp
from cardiofed.privacy.ledger_file import open_ledger_file
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import ExperimentResult, run_experiment, site_privacy
from cardiofed.simulation.prepare import prepare_federation
from cardiofed.simulation.runner import run_federated
from cardiofed.training.local import LocalTrainingConfig


def event(sigma: float, q: float = 1.0, steps: int = 1) -> GaussianEvent:
    return GaussianEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)


# --- SiteBudget -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epsilon_max": 0.0}, "The 'epsilon_max' parameter must be finite and > 0; got 0.0."),
    ({"epsilon_max": -1.0}, "The 'epsilon_max' parameter must be finite and > 0; got -1.0."),
    ({"epsilon_max": math.inf}, "The 'epsilon_max' parameter must be finite and > 0; got inf."),
    ({"epsilon_max": math.nan}, "The 'epsilon_max' parameter must be finite and > 0; got nan."),
    ({"delta": 0.0}, "The 'delta' parameter must be in (0, 1); got 0.0."),
    ({"delta": 1.0}, "The 'delta' parameter must be in (0, 1); got 1.0."),
    ({"accountant": "gdp"}, "The 'accountant' parameter must be 'rdp' or 'prv'; got 'gdp'."),
])
def test_invalid_budget_names_parameter_and_value(kwargs: dict[str, object],
                                                  message: str) -> None:
    settings = {"epsilon_max": 1.0, **kwargs}
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        SiteBudget(**settings)  # type: ignore[arg-type]


def test_delta_defaults_to_the_smaller_of_1e5_and_one_tenth_of_one_over_n() -> None:
    budget = SiteBudget(epsilon_max=1.0)

    # A hospital-sized site: 1/(10 n) = 4e-4 would be a weak delta; 1e-5 caps it.
    assert budget.delta_for(250) == 1e-5
    assert PrivacyLedger(site="a", budget=budget, n_records=250).delta == 1e-5
    assert budget.delta_for(10_000) == 1e-5  # 1/(10 n) = 1e-5 exactly
    # A large site: 1/(10 n) is the smaller.
    assert budget.delta_for(1_000_000) == 1 / 10_000_000
    assert PrivacyLedger(site="a", budget=budget, n_records=1_000_000).delta == 1e-7


def test_explicit_delta_below_one_over_n_is_kept() -> None:
    assert SiteBudget(epsilon_max=1.0, delta=1e-4).delta_for(200) == 1e-4


@pytest.mark.parametrize("delta", [0.01, 1 / 200])
def test_delta_of_one_over_n_or_more_is_rejected(delta: float) -> None:
    budget = SiteBudget(epsilon_max=1.0, delta=delta)

    with pytest.raises(ConfigurationError, match=re.escape(
            "The 'delta' parameter must be below 1/n = 0.005 for a site of 200 records "
            f"(delta >= 1/n allows releasing a record outright); got {delta!r}.")):
        budget.delta_for(200)
    with pytest.raises(ConfigurationError, match=re.escape("below 1/n = 0.005")):
        PrivacyLedger(site="a", budget=budget, n_records=200)


def test_a_budget_needs_records() -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "A privacy budget needs n_records >= 1; got 0.")):
        SiteBudget(epsilon_max=1.0).delta_for(0)


# --- PrivacyLedger -----------------------------------------------------------------------------

def test_new_ledger_has_spent_nothing() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=2.0), n_records=100)

    assert ledger.spent() == 0.0
    assert ledger.remaining() == 2.0
    assert ledger.entries == []


def test_check_refuses_with_site_numbers_and_budget() -> None:
    ledger = PrivacyLedger(site="tier3_01", budget=SiteBudget(epsilon_max=2.0), n_records=250)
    ledger.record([event(3.0)], "round 1")
    spent = ledger.spent()
    projected = ledger.accountant.get_epsilon(ledger.delta, [event(1.0)])

    with pytest.raises(PrivacyBudgetExceeded) as refusal:
        ledger.check([event(1.0)], "round 2")

    match = re.fullmatch(
        r"Site 'tier3_01' refuses round 2: it would bring epsilon from (\d+\.\d{2}) to "
        r"(\d+\.\d{2}), above the site's epsilon_max 2 \(delta 1e-05\)\.",
        str(refusal.value))
    assert match is not None, str(refusal.value)
    # Two decimals: a refusal does not quote the ledger precisely enough to fingerprint it.
    assert float(match[1]) == pytest.approx(spent, abs=5e-3)
    assert float(match[2]) == pytest.approx(projected, abs=5e-3)
    assert spent <= 2.0 < projected
    assert ledger.spent() == spent  # a refused check records nothing
    assert len(ledger.entries) == 1


def test_check_returns_projected_epsilon_within_budget() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=5.0), n_records=100)

    projected = ledger.check([event(3.0)], "round 1")

    assert projected == pytest.approx(ledger.accountant.get_epsilon(ledger.delta, [event(3.0)]))
    assert ledger.spent() == 0.0


# --- Release kinds, studies, shares ----------------------------------------------------------

def test_entries_are_tagged_by_kind_and_study_and_spent_per_kind() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=5.0), n_records=100)
    ledger.record([event(4.0)], "statistics release", kind="statistics", study="s1")
    ledger.record([event(3.0)], "round 1", study="s1")  # kind defaults to 'train'
    ledger.record([event(3.0)], "round 2", kind="train", study="s1")
    ledger.record([event(4.0)], "evaluation release", kind="evaluate", study="s1")
    ledger.record([event(4.0)], "statistics release", kind="statistics", study="s2")

    assert [(e["kind"], e["study"]) for e in ledger.entries] == [
        ("statistics", "s1"), ("train", "s1"), ("train", "s1"), ("evaluate", "s1"),
        ("statistics", "s2")]
    assert [e["what"] for e in ledger.releases("train", "s1")] == ["round 1", "round 2"]
    assert len(ledger.releases("statistics")) == 2
    assert ledger.releases("statistics", "s3") == []

    def alone(*sigmas: float) -> float:
        return PrivacyAccountant(events=[event(s) for s in sigmas]).get_epsilon(ledger.delta)

    assert ledger.spent("statistics") == pytest.approx(alone(4.0, 4.0), rel=1e-12)
    assert ledger.spent("train") == pytest.approx(alone(3.0, 3.0), rel=1e-12)
    assert ledger.spent("evaluate") == pytest.approx(alone(4.0), rel=1e-12)
    assert ledger.spent() == pytest.approx(alone(4.0, 3.0, 3.0, 4.0, 4.0), rel=1e-12)
    by_kind = ledger.spent_by_kind()
    assert by_kind == {"statistics": ledger.spent("statistics"),
                       "train": ledger.spent("train"),
                       "evaluate": ledger.spent("evaluate"), "total": ledger.spent()}
    assert max(by_kind[k] for k in ("statistics", "train", "evaluate")) < by_kind["total"]


def test_an_unknown_release_kind_is_refused() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=5.0), n_records=100)

    with pytest.raises(ConfigurationError, match=re.escape(
            "Unknown release kind 'predict'; expected one of statistics, train, evaluate or "
            "attribution.")):
        ledger.record([event(4.0)], "?", kind="predict")
    assert ledger.entries == [] and ledger.spent() == 0.0


def test_targets_are_the_cumulative_shares_of_what_other_studies_left() -> None:
    budget = SiteBudget(epsilon_max=2.0)
    assert budget.shares == {"statistics": 0.1, "train": 0.8, "evaluate": 0.1}
    assert [budget.cumulative_share(k) for k in ("statistics", "train", "evaluate")] == \
        pytest.approx([0.1, 0.9, 1.0])
    ledger = PrivacyLedger(site="a", budget=budget, n_records=100)
    assert ledger.target("statistics", "s1") == pytest.approx(0.2)
    assert ledger.target("train", "s1") == pytest.approx(1.8)
    assert ledger.target("evaluate", "s1") == pytest.approx(2.0)

    ledger.record([event(3.0)], "round 1", study="s1")
    before = ledger.spent()
    # This study's own releases do not shrink its targets; another study's do.
    assert ledger.target("train", "s1") == pytest.approx(1.8)
    assert ledger.target("statistics", "s2") == pytest.approx(before + 0.1 * (2.0 - before))
    assert ledger.target("evaluate", "s2") == pytest.approx(2.0)


@pytest.mark.parametrize("shares", [
    {"statistics": 0.2, "train": 0.7},                                   # a kind missing
    {"statistics": 0.2, "train": 0.7, "evaluate": 0.2},                  # sums to 1.1
    {"statistics": 0.0, "train": 0.9, "evaluate": 0.1},                  # a zero share
    {"statistics": -0.1, "train": 1.0, "evaluate": 0.1},                 # negative
    {"statistics": 0.1, "train": 0.8, "evaluate": 0.1, "predict": 0.0},  # unknown kind
    {"statistics": math.nan, "train": 0.8, "evaluate": 0.1},
])
def test_invalid_shares_are_refused_naming_the_parameter(shares: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "The 'shares' parameter must give each of statistics, train, evaluate a share "
            f"> 0, summing to 1; got {shares!r}.")):
        SiteBudget(epsilon_max=1.0, shares=shares)


def test_custom_shares_set_the_targets() -> None:
    budget = SiteBudget(epsilon_max=1.0, shares={"statistics": 0.25, "train": 0.5,
                                                 "evaluate": 0.25})
    ledger = PrivacyLedger(site="a", budget=budget, n_records=100)

    assert ledger.target("statistics") == pytest.approx(0.25)
    assert ledger.target("train") == pytest.approx(0.75)
    assert ledger.target("evaluate") == pytest.approx(1.0)


# --- DPConfig --------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_multiplier": 0.0}, "The 'noise_multiplier' parameter must be finite and > 0; "
                                "got 0.0."),
    ({"noise_multiplier": math.inf}, "The 'noise_multiplier' parameter must be finite and > 0; "
                                     "got inf."),
    ({"max_grad_norm": 0.0}, "The 'max_grad_norm' parameter must be finite and > 0; got 0.0."),
    ({"max_grad_norm": math.nan}, "The 'max_grad_norm' parameter must be finite and > 0; "
                                  "got nan."),
])
def test_invalid_dp_config_names_parameter_and_value(kwargs: dict[str, float],
                                                     message: str) -> None:
    settings = {"noise_multiplier": 1.0, **kwargs}
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        DPConfig(**settings)


# --- SitePrivacy: calibrate, check, train, record ----------------------------------------------

def counted(privacy: SitePrivacy, n: int) -> SitePrivacy:
    """`privacy` after a statistics release whose noisy count is `n`, at a negligible cost
    (sigma 1e4): DP-SGD plans its schedule on that public count, never the exact one."""
    privacy.ledger.record([event(1e4)], "statistics release", kind="statistics",
                          study=privacy.study, released_n=float(n))
    return privacy


def site_rows(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=n) > 0).astype(np.float32)
    return x, y


@pytest.mark.parametrize(("batch_size", "n"), [
    (64, 60),   # q = 1: the whole site every step
    (10, 200),  # q = 0.05: Poisson-subsampled
])
def test_planned_rounds_fit_the_training_share_and_training_past_the_budget_is_refused(
        batch_size: int, n: int) -> None:
    # The noise is calibrated at the first round for all 3 planned rounds, to the
    # cumulative share of statistics + train (0.1 + 0.8 of epsilon_max): the planned rounds
    # leave room for the evaluation. A 4th round would take the ledger past the training
    # share, so it is refused (the evaluation's share is never eaten by extra training),
    # and a refused round trains and records nothing.
    x, y = site_rows(n)
    config = LocalTrainingConfig(batch_size=batch_size, local_steps=2)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=n)
    privacy = counted(SitePrivacy(ledger=ledger, local=config, rounds=3), n)
    model = make_model("logistic", 5, seed=0)

    spent = []
    for rnd in (1, 2, 3):
        privacy.train(model, x, y, config, seed=rnd, what=f"round {rnd}")
        spent.append(ledger.spent())

    assert privacy.dp is not None and privacy.dp.noise_multiplier > 0
    assert spent == sorted(spent)
    assert 0.85 < spent[-1] <= 0.9  # the training share, nearly all of it
    trained = ledger.entries[1:]
    assert [e["what"] for e in trained] == ["round 1", "round 2", "round 3"]
    assert all(e["kind"] == "train" for e in trained)
    assert ledger.spent("train") == pytest.approx(spent[-1], abs=1e-3)
    before, total = get_weights(model), ledger.spent()

    with pytest.raises(PrivacyBudgetExceeded, match=r"^Site 'a' refuses round 4: it would "
                       r"bring epsilon from 0\.\d{2} to \d\.\d{2}, above 0\.90, what its "
                       r"budget share allows once train releases are made"):
        privacy.train(model, x, y, config, seed=4, what="round 4")

    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained
    assert ledger.spent() == total  # ... and nothing recorded
    assert len(ledger.entries) == 4


def test_the_evaluation_still_fits_after_the_planned_rounds() -> None:
    x, y = site_rows(60)
    config = LocalTrainingConfig(batch_size=64, local_steps=2)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    privacy = counted(SitePrivacy(ledger=ledger, local=config, rounds=3, study="s1"), 60)
    model = make_model("logistic", 5, seed=0)
    for rnd in (1, 2, 3):
        privacy.train(model, x, y, config, seed=rnd)
    trained = ledger.spent()

    neg, pos, noise_std = privacy.release_evaluation(
        y, np.linspace(0.01, 0.99, len(y)), np.linspace(0.0, 1.0, 11))

    assert neg.shape == pos.shape == (10,) and noise_std > 0
    assert trained < ledger.spent() <= 1.0
    assert ledger.spent() == pytest.approx(1.0, abs=0.01)  # the last share, used up
    assert [e["kind"] for e in ledger.entries] == ["statistics"] + ["train"] * 3 + ["evaluate"]
    assert all(e["study"] == "s1" for e in ledger.entries)
    assert ledger.entries[-1]["noise_multiplier"] == noise_std  # sensitivity 1 (counts)


def test_calibration_accounts_for_what_the_ledger_already_holds() -> None:
    # An earlier study spent part of the budget: this study's training share is of what
    # is left, so its noise is larger and the total stays within the budget.
    config = LocalTrainingConfig(batch_size=64, local_steps=2)
    fresh = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=2.0), n_records=60)
    used = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=2.0), n_records=60)
    used.record([event(3.0)], "earlier release", kind="train", study="earlier")
    before = used.spent()

    sigma_fresh = counted(SitePrivacy(ledger=fresh, local=config, rounds=3, study="s2"),
                          60).training_noise().noise_multiplier
    sigma_used = counted(SitePrivacy(ledger=used, local=config, rounds=3, study="s2"),
                         60).training_noise().noise_multiplier

    assert sigma_used > sigma_fresh
    total = used.accountant.get_epsilon(used.delta, [event(sigma_used, steps=6)])
    before = used.epsilon_of([e for e in used.entries if e["study"] != "s2"])
    target = before + 0.9 * (2.0 - before)  # statistics + train shares of what is left
    assert used.target("train", "s2") == pytest.approx(target)
    assert total <= target + 1e-9
    assert total == pytest.approx(target, rel=0.02)  # calibrated tight, not wasteful


def test_training_noise_is_calibrated_once_and_kept_in_the_ledger() -> None:
    # After a restart (a new SitePrivacy over the same ledger) the noise calibrated for the
    # whole schedule is reused, not recalibrated for the rounds that are left.
    x, y = site_rows(60)
    config = LocalTrainingConfig(batch_size=64, local_steps=2)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    first = counted(SitePrivacy(ledger=ledger, local=config, rounds=3, study="s1"), 60)
    first.train(make_model("logistic", 5, seed=0), x, y, config, seed=1)

    restarted = SitePrivacy(ledger=ledger, rounds=3, study="s1")  # no 'local' needed

    assert restarted.training_noise() == first.dp
    with pytest.raises(ConfigurationError, match=re.escape(
            "SitePrivacy needs the study's local training config ('local') to calibrate "
            "DP-SGD.")):
        counted(SitePrivacy(ledger=ledger, rounds=3, study="s2"), 60).training_noise()


def test_training_without_a_statistics_release_is_refused_and_charges_nothing() -> None:
    # The DP-SGD schedule (sampling rate, steps, expected batch) is planned on the noisy
    # count of the study's statistics release; without one the exact count would leak.
    x, y = site_rows(60)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    privacy = SitePrivacy(ledger=ledger, local=LocalTrainingConfig(), rounds=3, study="s1")

    with pytest.raises(PrivacyBudgetExceeded, match="only after the study's statistics "
                                                     "release"):
        privacy.train(make_model("logistic", 5, seed=0), x, y, LocalTrainingConfig(), seed=0)
    assert ledger.entries == []


@pytest.mark.parametrize("n_exact", [50, 60, 61, 500])
def test_what_training_charges_depends_on_the_public_count_only(n_exact: int) -> None:
    # Sites of different exact sizes that released the same noisy count charge their
    # ledgers identically: epsilon_spent (published on the model card) reveals nothing
    # about the exact count.
    x, y = site_rows(n_exact)
    config = LocalTrainingConfig(batch_size=16, local_epochs=1)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=1000)
    privacy = counted(SitePrivacy(ledger=ledger, local=config, rounds=2, study="s1"), 64)

    privacy.train(make_model("logistic", 5, seed=0), x, y, config, seed=0)

    assert ledger.entries[-1]["events"] == [{"noise_multiplier": privacy.dp.noise_multiplier,
                                             "sample_rate": 16 / 64, "steps": 4}]
    reference = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=1000)
    counted(SitePrivacy(ledger=reference, local=config, rounds=2, study="s1"), 64).train(
        make_model("logistic", 5, seed=0), *site_rows(64), config, seed=0)
    assert ledger.spent() == reference.spent()


@pytest.mark.parametrize("earlier_study", ["s1", "another study"])
def test_a_spent_ledger_cannot_be_calibrated(earlier_study: str) -> None:
    # Spent by this study's own statistics release, or by another study: either way
    # nothing is left for this study's releases.
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    ledger.record([event(0.5)], "earlier release", kind="statistics",
                  study=earlier_study)  # alone more than epsilon 1
    privacy = SitePrivacy(ledger=ledger, local=LocalTrainingConfig(), rounds=1, study="s1")

    with pytest.raises(PrivacyBudgetExceeded, match=re.escape(
            f"Site 'a' has spent epsilon {ledger.spent():.2f}; its budget share for train "
            f"releases allows ")) as refusal:
        privacy.training_noise()
    assert str(refusal.value).endswith("(epsilon_max 1): it makes no further train release.")
    with pytest.raises(PrivacyBudgetExceeded, match="it makes no further statistics release"):
        privacy.release_statistics(np.zeros((60, 2)), np.tile(np.linspace(0, 1, 17), (2, 1)))
    with pytest.raises(PrivacyBudgetExceeded, match="it makes no further evaluate release"):
        privacy.release_evaluation(np.zeros(10), np.full(10, 0.5), np.linspace(0, 1, 11))
    assert len(ledger.entries) == 1  # nothing released, nothing recorded


def test_dp_sgd_refuses_the_proximal_term() -> None:
    x, y = site_rows()
    model = make_model("logistic", 5, seed=0)
    before = get_weights(model)

    with pytest.raises(ConfigurationError, match=re.escape(
            "DP-SGD does not support FedProx's proximal term (proximal_mu=0.1); use fedavg, "
            "fedadam or fedyogi with differential privacy.")):
        train_local_dp(model, x, y, LocalTrainingConfig(proximal_mu=0.1),
                       DPConfig(noise_multiplier=1.0))

    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_site_privacy_refuses_fedprox_without_spending() -> None:
    x, y = site_rows()
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    privacy = SitePrivacy(ledger=ledger, dp=DPConfig(noise_multiplier=5.0))

    with pytest.raises(ConfigurationError, match=re.escape(
            "DP-SGD does not support FedProx's proximal term (proximal_mu=0.01)")):
        privacy.train(make_model("logistic", 5, seed=0), x, y,
                      LocalTrainingConfig(proximal_mu=0.01), seed=0)

    assert ledger.spent() == 0.0
    assert ledger.entries == []


def test_the_coordinator_has_no_handle_on_a_site_budget() -> None:
    # The budget is read only from the site's own configuration and ledger: nothing a
    # coordinator calls takes an epsilon, delta or budget.
    budget_like = re.compile(r"epsilon|delta|budget|ledger|noise|clip|grad_norm")
    for function in (SitePrivacy.train, FederatedAlgorithm.client_update):
        names = inspect.signature(function).parameters
        assert not [n for n in names if budget_like.search(n)], function.__qualname__


# --- DP in the simulated federation -------------------------------------------------------------

DP_SETTINGS: dict[str, object] = {
    "dp_epsilon": 2.0, "rounds": 3, "seed": 0, "local_steps": 2,
    "batch_size": 512,  # larger than any site: q = 1, fast closed-form accounting
}


def test_dp_with_fedprox_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "Invalid simulation config: differential privacy does not support fedprox's "
            "proximal term; use fedavg, fedadam or fedyogi.")):
        SimulationConfig.create(dp_epsilon=1.0, algorithm="fedprox")


@pytest.mark.parametrize(("setting", "message"), [
    ({"label_quality": True},
     "Invalid simulation config: label_quality cross-evaluates each site's non-private local "
     "model at the other sites, a release differential privacy does not cover; switch "
     "label_quality off with dp_epsilon."),
    ({"recalibrate": True},
     "Invalid simulation config: recalibrate fits each site's intercept and slope on its own "
     "rows without noise (one patient moves the intercept), a release differential privacy "
     "does not cover; switch recalibrate off with dp_epsilon."),
    ({"standardisation": "per-site"},
     "Invalid simulation config: standardisation 'per-site' uses each site's exact mean and "
     "SD, which differential privacy does not cover; use 'global' (from the sites' noisy "
     "statistics) with dp_epsilon."),
])
def test_dp_with_a_release_it_does_not_cover_is_a_configuration_error(
        setting: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        SimulationConfig.create(dp_epsilon=1.0, **setting)
    SimulationConfig.create(**setting)  # fine without DP


@pytest.fixture(scope="module")
def dp_federation() -> FederatedDataset:
    return synthetic_federation(n_sites=3, seed=1, size_scale=0.2)


@pytest.fixture(scope="module")
def dp_run(dp_federation: FederatedDataset,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentResult, Path]:
    ledger_dir = tmp_path_factory.mktemp("ledgers")
    config = SimulationConfig.create(**DP_SETTINGS)
    return run_experiment(dp_federation, config, baselines=False, ledger_dir=ledger_dir), \
        ledger_dir


def ledger_entries(ledger_dir: Path, site: str) -> list[dict[str, object]]:
    """The entries of the one sealed ledger a simulated site keeps in `ledger_dir/<site>`."""
    return open_ledger_file(ledger_dir / site).entries


def test_history_records_each_site_epsilon_every_round(
        dp_run: tuple[ExperimentResult, Path], dp_federation: FederatedDataset) -> None:
    result, _ = dp_run
    history = result.federated.history

    assert [h["round"] for h in history] == [1.0, 2.0, 3.0]
    for site in dp_federation.sites:
        spent = [h[f"epsilon/{site.name}"] for h in history]
        assert spent[0] > 0
        assert spent == sorted(spent)
        assert spent[-1] <= 2.0
    assert result.federated.refusals == []
    # The pre-noise training loss is not released, so it is not in the history either.
    assert all(math.isnan(h["train_loss"]) for h in history)


def test_result_reports_each_site_spend_within_its_budget(
        dp_run: tuple[ExperimentResult, Path]) -> None:
    result, ledger_dir = dp_run

    assert set(result.privacy) == set(result.site_sizes)
    for site, spend in result.privacy.items():
        assert spend["epsilon_spent"] <= spend["epsilon_max"] == 2.0
        assert spend["delta"] == min(1e-5, 1 / (10 * result.site_sizes[site]))
        assert spend["n_records"] == result.site_sizes[site]
        assert spend["rounds_trained"] == 3
        entries = ledger_entries(ledger_dir, site)
        assert [e["kind"] for e in entries] == [
            "statistics", "train", "train", "train", "train", "evaluate"]
        assert entries[-2]["what"] == "intercept step release"  # training's last part
        assert len({e["study"] for e in entries}) == 1
        assert entries[-1]["epsilon_after"] == pytest.approx(spend["epsilon_spent"])
        # The history shows the ledger after each round; the evaluation release comes
        # after the last one, within the share the training left for it.
        last_round = result.federated.history[-1][f"epsilon/{site}"]
        assert last_round <= 0.9 * 2.0 < spend["epsilon_spent"]


def test_the_budget_is_split_across_statistics_training_and_evaluation(
        dp_run: tuple[ExperimentResult, Path]) -> None:
    # Shares 0.1 / 0.8 / 0.1 of epsilon_max 2: the statistics release alone is calibrated
    # to 0.1 x 2; training brings the composed total to 0.9 x 2 and the evaluation to 2.
    # Each kind alone spends less than its cumulative share; the composed total is the
    # figure that counts, and it never exceeds epsilon_max.
    result, _ = dp_run

    for site, spend in result.privacy.items():
        assert spend["epsilon_spent"] <= 2.0, site
        assert spend["epsilon_spent"] == pytest.approx(2.0, rel=0.01)  # nothing wasted
        assert spend["epsilon_statistics"] == pytest.approx(0.1 * 2.0, rel=0.01)
        assert spend["epsilon_statistics"] <= 0.1 * 2.0
        for kind in ("statistics", "train", "evaluate"):
            assert 0 < spend[f"epsilon_{kind}"] < spend["epsilon_spent"], (site, kind)
        assert spend["epsilon_statistics"] + spend["epsilon_train"] + \
            spend["epsilon_evaluate"] >= spend["epsilon_spent"]  # composition is subadditive
        assert spend["noise_multiplier"] > 0
    # What a model card may publish under DP: metrics from the noisy evaluation releases.
    assert set(result.released_metrics) == set(result.privacy)
    for metrics in result.released_metrics.values():
        assert {"auc", "auc_ci_low", "auc_ci_high", "brier", "prevalence"} <= set(metrics)


def test_a_second_run_on_the_same_ledgers_composes_on_top(
        dp_run: tuple[ExperimentResult, Path], dp_federation: FederatedDataset) -> None:
    # The ledgers survive the first run and a simulation's study id is new every run, so
    # the second run's shares are of what is left: much more noise, and the total stays
    # within epsilon_max.
    first, ledger_dir = dp_run
    config = SimulationConfig.create(**DP_SETTINGS)

    second = run_experiment(dp_federation, config, baselines=False, ledger_dir=ledger_dir)

    for site, spend in second.privacy.items():
        assert first.privacy[site]["epsilon_spent"] < spend["epsilon_spent"] <= 2.0
        assert spend["noise_multiplier"] > first.privacy[site]["noise_multiplier"]
        entries = ledger_entries(ledger_dir, site)
        assert len(entries) == 12
        studies = [e["study"] for e in entries]
        assert len(set(studies[:6])) == len(set(studies[6:])) == 1
        assert studies[0] != studies[6]


def test_sites_refuse_rounds_beyond_their_budget(dp_federation: FederatedDataset) -> None:
    # Noise is calibrated for 3 rounds (to the training share); a coordinator asking for
    # 5 gets refusals from every site once a round would exceed the training share, and
    # the budgets hold.
    planned = SimulationConfig.create(**DP_SETTINGS)
    privacy = site_privacy(dp_federation, planned)
    sites = prepare_federation(dp_federation, "global", privacy=privacy)

    run = run_federated(sites, SimulationConfig.create(**{**DP_SETTINGS, "rounds": 5}),
                        privacy=privacy)

    names = [s.name for s in sites]
    assert [(rnd, site) for rnd, site, _ in run.refusals] == [
        (rnd, name) for rnd in (4, 5) for name in names]
    for rnd, site, reason in run.refusals:
        assert reason.startswith(f"Site {site!r} refuses round {rnd}:")
    assert run.participation == dict.fromkeys(names, 3)
    for name in names:
        assert privacy[name].ledger.spent() <= 2.0
        assert run.history[-1][f"epsilon/{name}"] == run.history[2][f"epsilon/{name}"]


def _spend_ledger(ledger_dir: Path, site: SiteData) -> None:
    """`site`'s ledger, which an earlier study spent beyond epsilon 2."""
    ledger = open_site_ledger(site=site.name, budget=SiteBudget(epsilon_max=2.0),
                              ledger_dir=ledger_dir / site.name)
    ledger.record([event(0.3)], "an earlier study", kind="train", study="earlier",
                  noise_multiplier=0.3)
    assert ledger.spent() > 2.0


def test_a_site_with_a_spent_ledger_sits_out_and_the_others_go_on(
        tmp_path: Path, dp_federation: FederatedDataset) -> None:
    # A site whose ledger is already spent must not crash the federation: its statistics
    # release is refused (it contributes nothing), it refuses each round by name, and it
    # publishes no metrics; the other sites train as planned.
    spent_site = dp_federation.sites[0]
    _spend_ledger(tmp_path, spent_site)
    config = SimulationConfig.create(**DP_SETTINGS)

    result = run_experiment(dp_federation, config, baselines=False, ledger_dir=tmp_path)

    name = spent_site.name
    assert [(rnd, site) for rnd, site, _ in result.federated.refusals] == [
        (rnd, name) for rnd in (1, 2, 3)]
    assert all(reason.startswith(f"Site {name!r} has spent epsilon ") and
               reason.endswith("it makes no further train release.")
               for _, _, reason in result.federated.refusals)
    assert result.privacy[name]["rounds_trained"] == 0
    assert result.privacy[name]["epsilon_statistics"] == 0.0
    assert name not in result.released_metrics
    assert [e["what"] for e in ledger_entries(tmp_path, name)] == [
        "an earlier study"]  # nothing more
    others = [s.name for s in dp_federation.sites[1:]]
    for other in others:
        assert result.privacy[other]["rounds_trained"] == 3
        assert result.privacy[other]["epsilon_spent"] <= 2.0
        assert other in result.released_metrics
    assert result.federated.participation == {name: 0, **dict.fromkeys(others, 3)}


def test_a_federation_whose_every_site_is_spent_cannot_start(
        tmp_path: Path, dp_federation: FederatedDataset) -> None:
    for site in dp_federation.sites:
        _spend_ledger(tmp_path, site)

    with pytest.raises(PrivacyBudgetExceeded, match=re.escape(
            "No site has privacy budget left for its statistics release; the federation "
            "cannot start.")):
        run_experiment(dp_federation, SimulationConfig.create(**DP_SETTINGS),
                       baselines=False, ledger_dir=tmp_path)


def test_a_node_config_with_bad_shares_is_refused_at_load(tmp_path: Path) -> None:
    from cardiofed.node.config import NodeConfig

    with pytest.raises(ConfigurationError, match=re.escape(
            "The 'shares' parameter must give each of statistics, train, evaluate a share > 0, "
            "summing to 1")):
        NodeConfig.create(coordinator_url="http://127.0.0.1:1", state_dir=tmp_path / "s",
                          data={"dataset": "synthetic", "site": "tier3_01"},
                          privacy={"epsilon_max": 1.0, "ledger_dir": tmp_path / "l",
                                   "shares": {"statistics": 0.5, "train": 0.8,
                                              "evaluate": 0.1}})
