"""A site's privacy budget: validation, the persisted ledger, refusals, and DP in the
simulated federation.

Most schedules here use a sampling rate of 1 (the lot is the whole site): its RDP has a
closed form, so calibration takes milliseconds; subsampled accounting is covered in
``test_privacy_accounting.py``.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from cardiofed.algorithms.base import FederatedAlgorithm
from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import get_weights, make_model
from cardiofed.privacy import budget as budget_module
from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import ExperimentResult, run_experiment, site_privacy
from cardiofed.simulation.prepare import prepare_federation
from cardiofed.simulation.runner import run_federated
from cardiofed.training.dp import DPConfig, train_local_dp
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


def test_delta_defaults_to_one_tenth_of_one_over_n() -> None:
    budget = SiteBudget(epsilon_max=1.0)

    assert budget.delta_for(250) == 1 / 2500
    assert PrivacyLedger(site="a", budget=budget, n_records=250).delta == 1 / 2500


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
        r"Site 'tier3_01' refuses round 2: it would bring epsilon from (\d+\.\d{4}) to "
        r"(\d+\.\d{4}), above the site's epsilon_max 2 \(delta 0\.0004\)\.",
        str(refusal.value))
    assert match is not None, str(refusal.value)
    assert float(match[1]) == pytest.approx(spent, abs=5e-5)
    assert float(match[2]) == pytest.approx(projected, abs=5e-5)
    assert spent <= 2.0 < projected
    assert ledger.spent() == spent  # a refused check records nothing
    assert len(ledger.entries) == 1


def test_check_returns_projected_epsilon_within_budget() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=5.0), n_records=100)

    projected = ledger.check([event(3.0)], "round 1")

    assert projected == pytest.approx(ledger.accountant.get_epsilon(ledger.delta, [event(3.0)]))
    assert ledger.spent() == 0.0


def test_record_persists_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledgers" / "a.json"
    budget = SiteBudget(epsilon_max=5.0)
    ledger = PrivacyLedger(site="a", budget=budget, n_records=100, path=path)
    ledger.record([event(4.0)], "round 1", noise_multiplier=4.0)
    ledger.record([event(4.0), event(6.0)], "round 2")

    restarted = PrivacyLedger(site="a", budget=budget, n_records=100, path=path)

    assert restarted.spent() == ledger.spent() > 0
    assert restarted.entries == ledger.entries
    assert [e["what"] for e in restarted.entries] == ["round 1", "round 2"]
    assert restarted.entries[0]["noise_multiplier"] == 4.0
    # ... and goes on composing where it stopped.
    after = restarted.record([event(5.0)], "round 3")
    in_memory = PrivacyAccountant(events=[event(4.0), event(4.0), event(6.0), event(5.0)])
    assert after == pytest.approx(in_memory.get_epsilon(1 / 1000), rel=1e-12)
    assert PrivacyLedger(site="a", budget=budget, n_records=100, path=path).spent() == after


def test_ledger_file_is_written_atomically(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.json"
    budget = SiteBudget(epsilon_max=5.0)
    ledger = PrivacyLedger(site="a", budget=budget, n_records=100, path=path)
    ledger.record([event(4.0)], "round 1")
    saved = path.read_text(encoding="utf-8")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no .tmp left behind
    assert json.loads(saved)["site"] == "a"

    # A crash between writing the new state and renaming it leaves the old file intact.
    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(budget_module.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ledger.record([event(4.0)], "round 2")
    assert path.read_text(encoding="utf-8") == saved
    monkeypatch.undo()
    assert len(PrivacyLedger(site="a", budget=budget, n_records=100, path=path).entries) == 1


def test_ledger_of_another_site_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=100,
                  path=path).record([event(5.0)], "round 1")

    with pytest.raises(ConfigurationError, match=re.escape(
            f"Privacy ledger {path} belongs to site 'a' (version 1), not to 'b' (version 1).")):
        PrivacyLedger(site="b", budget=SiteBudget(epsilon_max=1.0), n_records=100, path=path)


@pytest.mark.parametrize("content", [
    b'{"version": 1, "site": "a", "accou',  # truncated write
    b"",
    b"\xff\xfe\x00 not text",
    b"[]",
    b'{"version": 1, "site": "a"}',
    b'{"version": 1, "site": "a", "entries": [], '
    b'"accountant": {"kind": "rdp", "events": [{"sigma": 1}]}}',
], ids=["truncated", "empty", "binary", "not-an-object", "missing-keys", "bad-event"])
def test_corrupt_ledger_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(content)

    with pytest.raises(ConfigurationError, match=re.escape(
            f"Privacy ledger {path} is corrupt (")) as error:
        PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=100, path=path)
    assert str(error.value).endswith("refusing to guess what was spent.")


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

def site_rows(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=n) > 0).astype(np.float32)
    return x, y


@pytest.mark.parametrize(("batch_size", "n"), [
    (64, 60),   # q = 1: the whole site every step
    (10, 200),  # q = 0.05: Poisson-subsampled
])
def test_planned_rounds_fit_the_budget_and_one_more_is_refused(batch_size: int,
                                                                n: int) -> None:
    x, y = site_rows(n)
    config = LocalTrainingConfig(batch_size=batch_size, local_steps=2)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=n)
    privacy = SitePrivacy.calibrated(ledger, config, rounds=3)
    model = make_model("logistic", 5, seed=0)

    spent = []
    for rnd in (1, 2, 3):
        privacy.train(model, x, y, config, seed=rnd, what=f"round {rnd}")
        spent.append(ledger.spent())

    assert spent == sorted(spent)
    assert spent[-1] <= 1.0
    assert [e["what"] for e in ledger.entries] == ["round 1", "round 2", "round 3"]
    before = get_weights(model)
    with pytest.raises(PrivacyBudgetExceeded, match=re.escape("Site 'a' refuses round 4:")):
        privacy.train(model, x, y, config, seed=4, what="round 4")
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained
    assert ledger.spent() == spent[-1]  # ... and nothing recorded
    assert len(ledger.entries) == 3


def test_calibration_accounts_for_what_the_ledger_already_holds() -> None:
    config = LocalTrainingConfig(batch_size=64, local_steps=2)
    fresh = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=2.0), n_records=60)
    used = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=2.0), n_records=60)
    used.record([event(3.0)], "earlier release")

    sigma_fresh = SitePrivacy.calibrated(fresh, config, rounds=3).dp.noise_multiplier
    sigma_used = SitePrivacy.calibrated(used, config, rounds=3).dp.noise_multiplier

    assert sigma_used > sigma_fresh
    total = used.accountant.get_epsilon(used.delta, [event(sigma_used, steps=6)])
    assert total <= 2.0


def test_a_spent_ledger_cannot_be_calibrated() -> None:
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0), n_records=60)
    ledger.record([event(0.5)], "earlier release")  # alone more than epsilon 1

    with pytest.raises(PrivacyBudgetExceeded, match=re.escape(
            "of its epsilon_max 1; it takes part in no further training.")):
        SitePrivacy.calibrated(ledger, LocalTrainingConfig(), rounds=1)


def test_dp_sgd_refuses_the_proximal_term() -> None:
    x, y = site_rows()
    model = make_model("logistic", 5, seed=0)
    before = get_weights(model)

    with pytest.raises(ConfigurationError, match=re.escape(
            "DP-SGD does not support FedProx's proximal term (proximal_mu=0.1); use fedavg, "
            "fedadam or fedyogi with differential privacy.")):
        train_local_dp(model, x, y, LocalTrainingConfig(proximal_mu=0.1),
                       DPConfig(noise_multiplier=1.0), seed=0)

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


def test_result_reports_each_site_spend_within_its_budget(
        dp_run: tuple[ExperimentResult, Path]) -> None:
    result, ledger_dir = dp_run

    assert set(result.privacy) == set(result.site_sizes)
    for site, spend in result.privacy.items():
        assert spend["epsilon_spent"] <= spend["epsilon_max"] == 2.0
        assert spend["delta"] == 1 / (10 * result.site_sizes[site])
        assert spend["n_records"] == result.site_sizes[site]
        assert spend["rounds_trained"] == 3
        assert (ledger_dir / f"{site}.json").is_file()
        assert spend["epsilon_spent"] == pytest.approx(result.federated.history[-1][
            f"epsilon/{site}"])


def test_a_second_run_on_the_same_ledgers_composes_on_top(
        dp_run: tuple[ExperimentResult, Path], dp_federation: FederatedDataset) -> None:
    # The ledgers survive the first run, so the second calibrates for what is left: much
    # more noise, and the total stays within epsilon_max.
    first, ledger_dir = dp_run
    config = SimulationConfig.create(**DP_SETTINGS)

    second = run_experiment(dp_federation, config, baselines=False, ledger_dir=ledger_dir)

    for site, spend in second.privacy.items():
        assert first.privacy[site]["epsilon_spent"] < spend["epsilon_spent"] <= 2.0
        assert spend["noise_multiplier"] > first.privacy[site]["noise_multiplier"]
        saved = json.loads((ledger_dir / f"{site}.json").read_text(encoding="utf-8"))
        assert len(saved["entries"]) == 6


def test_sites_refuse_rounds_beyond_their_calibrated_schedule(
        dp_federation: FederatedDataset) -> None:
    # Noise is calibrated for 3 rounds; a coordinator asking for 5 gets refusals from every
    # site in rounds 4 and 5, and the budgets hold.
    sites = prepare_federation(dp_federation, "global")
    planned = SimulationConfig.create(**DP_SETTINGS)
    privacy = site_privacy(sites, planned)

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


def test_a_site_with_a_spent_ledger_sits_out_every_round(
        tmp_path: Path, dp_federation: FederatedDataset) -> None:
    # A ledger that already holds more than epsilon_max (e.g. a rerun with a smaller
    # budget) must not crash the federation: that site refuses each round, by name.
    config = SimulationConfig.create(**DP_SETTINGS)
    run_experiment(dp_federation, config, baselines=False, ledger_dir=tmp_path)
    smaller = SimulationConfig.create(**{**DP_SETTINGS, "dp_epsilon": 1.0})

    result = run_experiment(dp_federation, smaller, baselines=False, ledger_dir=tmp_path)

    names = [s.name for s in dp_federation.sites]
    assert sorted({site for _, site, _ in result.federated.refusals}) == sorted(names)
    assert len(result.federated.refusals) == smaller.rounds * len(names)
    assert all(f"Site {site!r} refuses round {rnd}:" in reason
               for rnd, site, reason in result.federated.refusals)
