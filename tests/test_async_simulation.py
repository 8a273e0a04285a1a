"""Asynchronous aggregation on the virtual clock: determinism, triggers, staleness, fairness."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.async_runner import run_async
from cardiofed.simulation.clock import DAY_S, SiteSpeed, default_speeds
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite, prepare_federation
from cardiofed.simulation.runner import run_federated

BASE = dict(local_steps=5, batch_size=16, lr=0.05, seed=4)


@pytest.fixture(scope="module")
def sites() -> list[PreparedSite]:
    return prepare_federation(synthetic_federation(n_sites=4, seed=2, size_scale=0.2))


def _speeds(sites: list[PreparedSite], seconds: list[float]) -> dict[str, SiteSpeed]:
    """Site k's task takes exactly seconds[k] (pure overhead, no jitter)."""
    return {s.name: SiteSpeed(samples_per_s=1e12, overhead_s=t)
            for s, t in zip(sites, seconds, strict=True)}


def _async(**settings: object) -> SimulationConfig:
    return SimulationConfig.create(**{**BASE, "aggregation": "async", **settings})


# ---------------------------------------------------------------- the virtual clock

def test_offline_sites_pause_overnight() -> None:
    # Offline 10 h from 20:00; t = 0 is 09:00, so the window opens at t = 11 h.
    clinic = SiteSpeed(samples_per_s=1.0, offline_hours=10.0, offline_from_h=20.0)
    assert clinic.is_online(0.0) and not clinic.is_online(11 * 3600.0)
    assert clinic.finish(0.0, 3600.0) == 3600.0
    # Starting at 19:00 (t = 10 h) with 2 h of work: 1 h tonight, 1 h after 06:00.
    assert clinic.finish(10 * 3600.0, 2 * 3600.0) == pytest.approx(22 * 3600.0)
    # Starting while offline (t = 12 h, 21:00) waits for 06:00 (t = 21 h).
    assert clinic.finish(12 * 3600.0, 60.0) == pytest.approx(21 * 3600.0 + 60.0)
    # 28 h of work: 11 h on day 0, 14 h on day 1 (06:00-20:00), 3 h from 06:00 on day 2.
    assert clinic.finish(0.0, 28 * 3600.0) == pytest.approx(2 * DAY_S)


def test_default_speeds_imitate_a_real_federation() -> None:
    types = {"big": "tier3", "mid": "tier2", "c1": "community", "c2": "community"}
    speeds = default_speeds(types, seed=0)
    assert speeds == default_speeds(types, seed=0)  # deterministic by seed
    rng = np.random.default_rng(0)
    fast = speeds["big"].task_seconds(1000, rng)
    for clinic in ("c1", "c2"):
        slow = speeds[clinic]
        assert 10 <= speeds["big"].samples_per_s / slow.samples_per_s <= 100
        assert slow.offline_hours == 10.0 and not speeds["big"].offline_hours
        assert slow.task_seconds(1000, rng) > 5 * fast
    assert speeds["mid"].samples_per_s < speeds["big"].samples_per_s


@pytest.mark.parametrize(("settings", "message"), [
    (dict(samples_per_s=0.0), "'samples_per_s' parameter must be a finite number > 0"),
    (dict(samples_per_s=1.0, jitter=-0.1), "'jitter' parameter must be a finite number >= 0"),
    (dict(samples_per_s=1.0, offline_hours=24.0), "'offline_hours' parameter must be in"),
    (dict(samples_per_s=1.0, offline_from_h=-1.0),
     r"'offline_from_h' parameter must be in \[0, 24\); got -1.0"),
    (dict(samples_per_s=1.0, latency_s=float("inf")),
     "'latency_s' parameter must be a finite number >= 0; got inf"),
])
def test_speed_settings_are_validated(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SiteSpeed(**settings)


# ---------------------------------------------------------------- the asynchronous run

def test_buffer_of_every_site_reproduces_synchronous_fedavg(sites: list[PreparedSite]) -> None:
    speeds = default_speeds({s.name: s.site_type for s in sites}, seed=4)
    sync = run_federated(sites, SimulationConfig.create(**BASE, rounds=4), speeds=speeds)
    asyn = run_async(sites, _async(rounds=4, buffer_size=len(sites)), speeds=speeds)
    for name, w in sync.weights.items():
        np.testing.assert_allclose(asyn.weights[name], w, rtol=1e-6, atol=1e-7)
    assert [h["time_s"] for h in asyn.history] == pytest.approx(
        [h["time_s"] for h in sync.history])
    assert asyn.update_share == pytest.approx(dict.fromkeys(asyn.update_share, 0.25))


def test_runs_are_deterministic_by_seed(sites: list[PreparedSite]) -> None:
    config = _async(rounds=6, buffer_size=2)
    a, b = run_async(sites, config), run_async(sites, config)
    assert a.history == b.history and a.sim_time_s == b.sim_time_s
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    other = run_async(sites, _async(rounds=6, buffer_size=2, seed=5))
    assert other.sim_time_s != a.sim_time_s


def test_buffer_of_k_publishes_when_the_kth_update_arrives(sites: list[PreparedSite]) -> None:
    # Sites take 10, 20, 30, 1000 s. K = 2: v1 at 20 s (sites 0 and 1). Site 0 finished
    # at 10 s but trains once per version, so it waited for v1; it is done again at 30 s,
    # with site 2 (trained from v0) -> v2 at 30 s.
    run = run_async(sites, _async(rounds=2, buffer_size=2),
                    speeds=_speeds(sites, [10.0, 20.0, 30.0, 1000.0]))
    assert [h["time_s"] for h in run.history] == pytest.approx([20.0, 30.0])
    # v2 folded site 2's update trained from v0: staleness 1 (mean over two updates 0.5).
    assert run.history[1]["mean_staleness"] == 0.5


def test_timeout_publishes_a_partial_buffer(sites: list[PreparedSite]) -> None:
    # K = 4 would wait for the 1000 s site; T = 25 s publishes what has arrived.
    run = run_async(sites, _async(rounds=2, buffer_size=4, buffer_timeout_s=25.0),
                    speeds=_speeds(sites, [10.0, 20.0, 30.0, 1000.0]))
    # v1 at 25 s (sites 0, 1 waiting); v2 at 50 s, a timeout after v1 (site 2 at 30 s,
    # sites 0 and 1 again at 35 and 45 s).
    assert [h["time_s"] for h in run.history] == pytest.approx([25.0, 50.0])


def test_too_stale_updates_are_rejected_and_the_site_retrains(
        sites: list[PreparedSite]) -> None:
    run = run_async(sites, _async(rounds=40, buffer_size=1, max_staleness=3),
                    speeds=_speeds(sites, [10.0, 11.0, 12.0, 100.0]))
    slow = sites[3].name
    assert run.rejected and all(site == slow for _, site, _ in run.rejected)
    assert "versions old; the study accepts at most max_staleness=3" in run.rejected[0][2]
    assert run.update_share[slow] == 0.0  # starved, and the report says so
    assert sum(run.update_share.values()) == pytest.approx(1.0)


def test_async_settings_are_validated(sites: list[PreparedSite]) -> None:
    with pytest.raises(ConfigurationError, match=r"'buffer_size' parameter must be at most "
                                                 r"the number of sites \(4\); got 5"):
        run_async(sites, _async(buffer_size=5))
    with pytest.raises(ConfigurationError, match="scaffold's control variates need "
                                                 "synchronous rounds"):
        _async(algorithm="scaffold")
    with pytest.raises(ConfigurationError, match="fraction_fit samples sites"):
        _async(fraction_fit=0.5)
    with pytest.raises(ConfigurationError, match="use cardiofed.simulation.async_runner"):
        run_federated(sites, _async())
    with pytest.raises(ConfigurationError, match=r"No speed given for sites \['"):
        run_async(sites, _async(), speeds={})


def test_dp_budgets_hold_in_an_asynchronous_experiment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.experiments.summary import write_experiment_report
    from cardiofed.simulation.experiment import FEDERATED, run_experiment

    data = synthetic_federation(n_sites=4, seed=2, size_scale=0.2)
    config = _async(rounds=6, buffer_size=2, dp_epsilon=1.0, eval_every=0)

    result = run_experiment(data, config, baselines=False)

    # Each site trains at most once per version, so the noise calibrated for `rounds`
    # local trainings covers it: no site spends more than its budget.
    for site, spent in result.privacy.items():
        assert spent["epsilon_spent"] <= 1.0 + 1e-9, site
        assert spent["rounds_trained"] <= 6
    # The tier-3 site trained for every version; a slow clinic may not have finished one.
    assert result.privacy["tier3_01"]["rounds_trained"] == 6
    assert result.privacy["tier3_01"]["epsilon_spent"] > 0.9
    assert result.federated.history[-1]["round"] == 6
    assert np.isfinite(result.metrics[data.sites[0].name][FEDERATED]["auc"])
    page = write_experiment_report(result, tmp_path, title="async").read_text()
    assert "share of the updates in the final model" in page


def test_flagged_sites_do_not_train_and_the_run_goes_on(sites: list[PreparedSite]) -> None:
    # The fastest site is flagged (weight 0): it must not fill a buffer on its own.
    flagged = sites[0].name
    run = run_async(sites, _async(rounds=3, buffer_size=1),
                    speeds=_speeds(sites, [1.0, 20.0, 30.0, 40.0]),
                    site_multipliers={flagged: 0.0})
    assert run.history[-1]["round"] == 3
    assert run.participation[flagged] == 0 and run.update_share[flagged] == 0.0
    assert sum(run.weight_share.values()) == pytest.approx(1.0)


def test_buffer_shrinks_to_the_sites_still_training(sites: list[PreparedSite]) -> None:
    # Site 3 is flagged, so a buffer of 4 would never fill; it needs the 3 that train.
    run = run_async(sites, _async(rounds=2, buffer_size=4),
                    speeds=_speeds(sites, [10.0, 20.0, 30.0, 40.0]),
                    site_multipliers={sites[3].name: 0.0})
    assert [h["time_s"] for h in run.history] == pytest.approx([30.0, 60.0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seconds=st.lists(st.floats(0.1, 5000.0), min_size=4, max_size=4),
       timeout=st.sampled_from([None, 1.0, 600.0]), buffer_size=st.integers(3, 4))
def test_no_version_is_built_from_fewer_than_2f_plus_1_sites(
        sites: list[PreparedSite], monkeypatch: pytest.MonkeyPatch, seconds: list[float],
        timeout: float | None, buffer_size: int) -> None:
    # Issue 29: a timeout published a version from whatever had arrived (one update);
    # under a robust rule tolerating f = 1 every version needs 3 distinct sites. A site
    # whose update still waits in the buffer does not train again (it once put two
    # updates into one buffer when it finished twice between publications).
    fresh = _recorded(monkeypatch, "window", 0)
    built = _recorded(monkeypatch, "publish_buffer", 2)
    config = _async(rounds=5, buffer_size=buffer_size, buffer_timeout_s=timeout,
                    robust_rule="median", robust_byzantine=1)
    run_async(sites, config, speeds=_speeds(sites, seconds))
    assert built and len(fresh) == len(built)
    assert all(len(set(names)) == len(names) >= 3 for names in fresh)
    assert all(len(set(names)) == len(names) for names in built)


def test_a_site_with_an_update_in_the_buffer_waits_for_the_next_version(
        sites: list[PreparedSite], monkeypatch: pytest.MonkeyPatch) -> None:
    # The review's case: tier2_01 (0.4 s a task) finished twice between publications.
    fresh = _recorded(monkeypatch, "window", 0)
    config = _async(rounds=6, buffer_size=3, robust_rule="median", robust_byzantine=1)
    run_async(sites, config, speeds=_speeds(sites, [1.5, 0.4, 2.2, 3.3]))
    assert len(fresh) == 6 and all(len(set(v)) == len(v) == 3 for v in fresh)


def _recorded(monkeypatch: pytest.MonkeyPatch, name: str, position: int) -> list[list[str]]:
    """The runner's function `name` wrapped: each call notes the sites of its
    `position`-th argument, a list of ``(update, staleness)``."""
    import cardiofed.simulation.async_runner as runner

    seen: list[list[str]] = []
    real = getattr(runner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append([u.site for u, _ in args[position]])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, name, recording)
    return seen


@pytest.mark.parametrize("windowed", [True, False])
def test_under_a_robust_rule_every_version_weighs_each_sites_latest_update(
        sites: list[PreparedSite], monkeypatch: pytest.MonkeyPatch, windowed: bool) -> None:
    # Two fast sites fill every buffer of K = 2; under a robust rule the slow ones'
    # latest updates still enter every later version, once each (issue 29).
    aggregated = _recorded(monkeypatch, "publish_buffer", 2)
    config = _async(buffer_size=2, rounds=12, robust_rule="median", robust_byzantine=0,
                    async_window=windowed)
    run_async(sites, config, speeds=_speeds(sites, [1.0, 1.0, 3.5, 5.5]))

    names = [s.name for s in sites]
    assert all(len(set(v)) == len(v) for v in aggregated)  # one entry per site
    later = aggregated[6:]  # versions once every site has reported once
    assert all(sorted(v) == sorted(names) for v in later) if windowed else \
        all(len(v) == 2 for v in later)
    assert _async(robust_rule="median").windowed and not _async().windowed
