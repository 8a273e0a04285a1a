"""Staleness weights and buffer triggers of asynchronous aggregation, by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardiofed.aggregation.server_optimizers import ServerSGD
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms.staleness import (
    StalenessRule,
    StaleUpdate,
    buffer_ready,
    discounted,
    window,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.training.local import LocalTrainingConfig


@pytest.mark.parametrize(("kind", "a", "b", "s", "expected"), [
    ("constant", 0.5, 4, 0, 1.0),
    ("constant", 0.5, 4, 9, 1.0),
    ("polynomial", 0.5, 4, 0, 1.0),
    ("polynomial", 0.5, 4, 3, 0.5),          # (1 + 3) ** -0.5
    ("polynomial", 1.0, 4, 4, 0.2),          # 1 / 5
    ("polynomial", 2.0, 4, 1, 0.25),         # 2 ** -2
    ("hinge", 0.5, 4, 4, 1.0),               # s <= b
    ("hinge", 0.5, 4, 6, 0.5),               # 1 / (0.5 * 2 + 1)
    ("hinge", 2.0, 1, 3, 0.2),               # 1 / (2 * 2 + 1)
])
def test_staleness_weights_by_hand(kind: str, a: float, b: int, s: int, expected: float) -> None:
    rule = StalenessRule(kind=kind, exponent=a, hinge=b, max_staleness=20)  # type: ignore[arg-type]
    assert rule.weight(s) == pytest.approx(expected, rel=1e-12)


def test_updates_beyond_max_staleness_are_refused_with_the_reason() -> None:
    rule = StalenessRule(max_staleness=5)
    assert rule.weight(5) == pytest.approx(6 ** -0.5)
    with pytest.raises(StaleUpdate, match="trained from a model 6 versions old; the study "
                                          "accepts at most max_staleness=5"):
        rule.weight(6)
    with pytest.raises(ValueError, match="Staleness must be >= 0"):
        rule.check(-1)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(kind="linear"), "'staleness' parameter must be one of constant, polynomial, hinge"),
    (dict(exponent=-1.0), "'staleness_exponent' parameter must be >= 0; got -1.0"),
    (dict(hinge=-1), "'staleness_hinge' parameter must be an integer >= 0; got -1"),
    (dict(max_staleness=2.5), "'max_staleness' parameter must be an integer >= 0; got 2.5"),
])
def test_rule_settings_are_validated(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StalenessRule(**settings)  # type: ignore[arg-type]


def test_buffer_flushes_at_k_updates_or_after_the_timeout() -> None:
    assert not buffer_ready(2, buffer_size=3, since_publication_s=1e9, timeout_s=None)
    assert buffer_ready(3, buffer_size=3, since_publication_s=0.0, timeout_s=None)
    assert not buffer_ready(1, buffer_size=3, since_publication_s=59.9, timeout_s=60.0)
    assert buffer_ready(1, buffer_size=3, since_publication_s=60.0, timeout_s=60.0)
    # An empty buffer never produces a model, whatever the time.
    assert not buffer_ready(0, buffer_size=3, since_publication_s=1e9, timeout_s=60.0)
    assert not buffer_ready(0, buffer_size=0, since_publication_s=0.0, timeout_s=None)


def _update(site: str, value: float, n: int) -> ClientUpdate:
    return ClientUpdate(site=site, delta={"w": np.array([value], dtype=np.float32)},
                        num_samples=n, num_steps=1, train_loss=0.0)


def test_buffered_aggregate_discounts_stale_updates_by_hand() -> None:
    # Two fresh-and-stale updates with sample sizes 100 and 300; polynomial a = 0.5:
    # g(0) = 1, g(3) = 0.5.  delta = (100 * 1 * 2 + 300 * 0.5 * 4) / 400 = 2.0.
    rule = StalenessRule()
    updates = [discounted(_update("a", 2.0, 100), rule.weight(0)),
               discounted(_update("b", 4.0, 300), rule.weight(3))]
    algorithm = FederatedAlgorithm(name="fedavg", local=LocalTrainingConfig(),
                                   server=ServerSGD(lr=0.5))
    new, _ = algorithm.server_update({"w": np.array([1.0], dtype=np.float32)}, updates,
                                     algorithm.init_server({}))
    # Server learning rate 0.5: 1 + 0.5 * 2.0.
    assert new["w"][0] == pytest.approx(2.0)


def test_a_window_adds_every_other_sites_latest_update_with_its_staleness_now() -> None:
    # Version 7. The buffer holds a (fresh) and b (trained from 5); c and d were folded
    # earlier (trained from 4 and from 1); b's older folded update gives way to its new one.
    rule = StalenessRule(max_staleness=5)
    a, b, b_old = _update("a", 1.0, 10), _update("b", 2.0, 10), _update("b", 9.0, 10)
    c, d = _update("c", 3.0, 10), _update("d", 4.0, 10)

    kept = window([(a, 0), (b, 2)], {"b": (b_old, 3), "c": (c, 4), "d": (d, 1)}, 7, rule)

    # d is 6 versions old, past max_staleness = 5.
    assert [(u.site, s) for u, s in kept] == [("a", 0), ("b", 2), ("c", 3)]
    assert kept[2][0] is c


_SITES = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@given(fresh=st.lists(st.tuples(_SITES, st.integers(0, 9)), max_size=6,
                      unique_by=lambda t: t[0]),
       latest=st.dictionaries(_SITES, st.integers(0, 30)),
       version=st.integers(30, 40), max_staleness=st.integers(0, 20))
def test_a_window_holds_one_update_per_site_none_past_max_staleness(
        fresh: list[tuple[str, int]], latest: dict[str, int], version: int,
        max_staleness: int) -> None:
    # However often a site uploads, it is one entry of the window: its buffered update
    # if it has one, else its latest folded one while that is young enough.
    rule = StalenessRule(max_staleness=max_staleness)
    buffer = [(_update(site, 1.0, 1), s) for site, s in fresh]
    folded = {site: (_update(site, 2.0, 1), v) for site, v in latest.items()}

    kept = window(buffer, folded, version, rule)

    sites = [u.site for u, _ in kept]
    assert len(sites) == len(set(sites))
    assert kept[:len(buffer)] == buffer
    assert set(sites) == {s for s, _ in fresh} | {
        s for s, v in latest.items() if version - v <= max_staleness}
    assert all(s == version - latest[u.site] for u, s in kept[len(buffer):])
