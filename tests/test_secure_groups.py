"""Secure sums within groups of sites (``secure_group_size``), over the network: each
training round deals the advertising sites into groups from their keys, each group's sum
is masked, shared and unmasked on its own, and the coordinator's robust rule runs across
the groups' mean gradients, so a malicious site moves only its group's sum."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from test_coordinator import Federation, _until_done  # type: ignore[import-not-found]
from test_secure_network import (  # type: ignore[import-not-found]
    _secure_task,
    private_agent,
)

import cardiofed.coordinator.secure_sums as coordinator_sums
from cardiofed.aggregation.robust_statistics import robust_site_statistics
from cardiofed.data.preprocessing import (
    PRIVATE_BINS,
    Preprocessor,
    bin_edges,
    merge_statistics,
)
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.evaluation.private_metrics import metrics_from_histograms, score_bin_edges
from cardiofed.exceptions import TaskRefused
from cardiofed.node.agent import NodeAgent
from cardiofed.node.secure_rounds import SecureRounds
from cardiofed.protocol import secure_sums as wire
from cardiofed.secure import Advertisement, SecureSite, SumPlan, keys
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.simulate import run_protocol
from cardiofed.serving import registry
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_evaluation import (
    EVALUATION_LENGTH,
    POOLED_SECURE,
    evaluation_vector,
    gated_evaluation,
)
from cardiofed.simulation.secure_runner import secure_groups
from cardiofed.simulation.secure_statistics import statistics_from_sum, statistics_vector
from cardiofed.store import Round, SecureMessage, Study, Update, session_factory
from cardiofed.wire import decode_arrays

SIX = ["tier3_01", "tier3_02", "tier2_01", "tier2_02", "community_01", "community_02"]
NINE = [*SIX, "tier2_03", "community_03", "community_04"]
PLAN = {"rounds": 3, "seed": 5, "secure_aggregation": True, "lr": 0.5}


# ---------------------------------------------------------------- the groups


def _keys(names: list[str]) -> dict[str, tuple[bytes, bytes]]:
    return {n: (keys.new_private_key(), keys.new_private_key()) for n in names}


def _ads(private: dict[str, tuple[bytes, bytes]]) -> dict[str, Advertisement]:
    return {n: Advertisement(n, keys.public_key(c), keys.public_key(s))
            for n, (c, s) in private.items()}


def _setups(plan: SimulationConfig, ads: dict[str, Advertisement]
            ) -> list[tuple[SumPlan, DistributedNoise]]:
    return wire.group_setups("train", plan, ads, 4, 1.0, study="s", round_number=2,
                             attempt=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(6, 40), size=st.integers(2, 13), data=st.data())
def test_groups_partition_the_advertisers_from_their_keys(n: int, size: int,
                                                          data: st.DataObject) -> None:
    size = min(size, n // 3)
    names = data.draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                               min_size=n, max_size=n, unique=True))
    plan = SimulationConfig.create(**PLAN, secure_group_size=size)
    ads = {n: Advertisement(n, secrets.token_bytes(32), secrets.token_bytes(32))
           for n in names}
    groups = [p.sites for p, _ in _setups(plan, ads)]
    assert sorted(s for g in groups for s in g) == sorted(names)  # each site once
    assert len(groups) == n // size and min(map(len, groups)) >= size
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert len({p.context for p, _ in _setups(plan, ads)}) == len(groups)
    # Both ends derive the same groups whatever order the advertisements come in.
    assert groups == [p.sites for p, _ in _setups(plan, dict(reversed(ads.items())))]
    # Training, statistics and evaluation rounds are grouped; an attribution study's
    # steps are one sum of every site.
    for kind in ("statistics", "evaluate"):
        assert len(wire.group_setups(kind, plan, ads, 4, 1.0, study="s", round_number=0,
                                     attempt=0)) == len(groups)
    assert [p.sites for p, _ in wire.group_setups(
        wire.ATTRIBUTION_KINDS[0], plan, ads, 4, 1.0, study="s", round_number=0,
        attempt=0)] == [tuple(sorted(names))]


@settings(max_examples=15, deadline=None)
@given(bad=st.lists(st.floats(-1e12, 1e12), min_size=4, max_size=4), seed=st.integers(0, 99))
def test_a_malicious_site_moves_only_its_own_groups_sum(bad: list[float], seed: int) -> None:
    plan = SimulationConfig.create(**PLAN, secure_group_size=3)
    private = _keys(NINE)
    ads = _ads(private)
    rng = np.random.default_rng(seed)
    x = {n: np.round(rng.normal(0, 1, 4) * 2**10) / 2**10 for n in NINE}  # on the grid
    attacker = NINE[seed % 9]
    x[attacker] = np.asarray(bad)
    for group, _ in _setups(plan, ads):
        sites = {n: SecureSite(n, group, _c_private=private[n][0], _s_private=private[n][1])
                 for n in group.sites}
        result, _ = run_protocol(sites, {n: x[n] for n in group.sites},
                                 {n: np.random.default_rng(0) for n in group.sites})
        if attacker not in group.sites:
            np.testing.assert_allclose(result.total, np.sum([x[n] for n in group.sites], 0),
                                       atol=1e-9)


# ---------------------------------------------------------------- over the network


class Flipping(SecureRounds):
    """A malicious site's secure rounds: its training gradient sum reversed, 20 times."""

    def input(self, task, charge, vector):  # type: ignore[no-untyped-def]
        def flipped() -> np.ndarray:
            v = np.array(vector(), dtype=np.float64)
            if task.kind == "train":
                v[:-1] *= -20
            return v
        return super().input(task, charge, flipped)


class Forging(SecureRounds):
    """A malicious site's secure rounds: in place of its statistics, 10,000,000 records in
    the top bin of every column."""

    def input(self, task, charge, vector):  # type: ignore[no-untyped-def]
        def forged() -> np.ndarray:
            v = np.array(vector(), dtype=np.float64)
            if task.kind == "statistics":
                hist = np.zeros(((len(v) - 1) // PRIVATE_BINS, PRIVATE_BINS))
                hist[:, -1] = 1e7
                v = np.concatenate([hist.ravel(), [1e7]])
            return v
        return super().input(task, charge, forged)


def _means(fed: Federation) -> np.ndarray:
    """The study's preprocessor's means, as shares of each column's range."""
    with session_factory(fed.settings.database_url)() as db:
        study = db.get(Study, "s1")
        assert study is not None and study.preprocessor is not None
        width = np.array([hi - lo for lo, hi in study.feature_ranges])
        return Preprocessor.from_arrays(decode_arrays(study.preprocessor)[0]).mean / width


def _trained(tmp: Path, plan: Mapping[str, object], attacker: type[SecureRounds] | None
             ) -> tuple[float, Federation]:
    tmp.mkdir()
    fed = Federation(tmp, plan=dict(plan), study={"sites": SIX})
    agents = [private_agent(fed, s, 1e5) for s in SIX]  # little noise: the sums show
    if attacker is not None:
        agents[0].secure.__class__ = attacker
    _until_done(fed, agents, patience_s=300)
    assert fed.status()["refusals"] == []
    with session_factory(fed.settings.database_url)() as db:
        card = registry.card(db, f"s1-v{plan['rounds']}")
    metrics: Any = card["metrics"]
    return float(metrics[POOLED_SECURE]["auc"]), fed


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[float, np.ndarray]:
    """The honest study's AUC and preprocessor means."""
    auc, fed = _trained(tmp_path_factory.mktemp("honest") / "h", PLAN, None)
    return auc, _means(fed)


def test_groups_hold_a_networked_secure_study_against_a_malicious_site(
        tmp_path: Path, honest: tuple[float, np.ndarray]) -> None:
    honest_auc, _ = honest
    grouped, fed = _trained(tmp_path / "g", {**PLAN, "secure_group_size": 2}, Flipping)
    plain, _ = _trained(tmp_path / "p", PLAN, Flipping)
    # One of six sites reversing its gradient 20-fold wrecks the one sum of every site;
    # across three groups' sums the weighted median (the networked default) holds.
    assert plain < 0.5 < honest_auc - 0.05 < grouped
    with session_factory(fed.settings.database_url)() as db:
        rounds = list(db.scalars(select(Round).where(Round.kind == "train")))
        assert db.scalar(select(func.count()).select_from(Update)) == 0
        assert db.scalar(select(func.count()).select_from(SecureMessage)) == 0
    for rnd in rounds:  # the rule's report names groups, never a site
        assert [a["site"] for a in rnd.aggregation or []] == ["group 0", "group 1",
                                                              "group 2"]


def test_groups_gate_a_forged_sites_statistics_over_the_network(
        tmp_path: Path, honest: tuple[float, np.ndarray]) -> None:
    _, honest_means = honest
    one_round = {**PLAN, "rounds": 1}
    _, fed = _trained(tmp_path / "g", {**one_round, "secure_group_size": 2}, Forging)
    _, plain_fed = _trained(tmp_path / "p", one_round, Forging)
    # Its forged statistics own the one sum's means; across three groups' sums the gate
    # cuts them less than across four (the property below): a group's median and spread
    # come from three values, so where the honest groups differ widely (a binary column's
    # prevalence) the forged group can keep its weight. Over 200 random groupings of six
    # synthetic sites, the worst column moved 0.41 of its range in half of them, 0.50 at
    # most, against 0.83 as one sum.
    plain_move = np.max(np.abs(_means(plain_fed) - honest_means))
    assert plain_move > 0.5
    assert np.max(np.abs(_means(fed) - honest_means)) < plain_move


class Recording(SecureRounds):
    """A site's secure rounds, keeping each vector it sent (for the test's sums)."""

    def input(self, task, charge, vector):  # type: ignore[no-untyped-def]
        def kept() -> np.ndarray:
            self.sent = np.array(vector(), dtype=np.float64)
            return self.sent
        return super().input(task, charge, kept)


def _to_first_training_round(fed: Federation, sites: list[str]) -> dict[str, NodeAgent]:
    """The sites' agents (recording what they send), the statistics round done and the
    first training round's keys shared."""
    agents = {s: private_agent(fed, s, 1e5) for s in sites}
    for agent in agents.values():
        agent.secure.__class__ = Recording
    while fed.status()["phase"] == "statistics":
        fed.step(list(agents.values()))
    fed.step(list(agents.values()))  # advertise
    fed.step(list(agents.values()))  # share keys
    return agents


def _group_of(agent: NodeAgent) -> tuple[str, ...]:
    pending = next(iter(agent.secure._sums.values()))
    assert pending.site is not None
    return pending.site.plan.sites


def test_each_groups_sum_is_its_survivors_and_a_group_too_short_is_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sums: list[tuple[tuple[str, ...], object]] = []
    real = coordinator_sums.unmask_sum

    def unmask(plan, *args, **kwargs):  # type: ignore[no-untyped-def]
        sums.append((plan.sites, real(plan, *args, **kwargs)))
        return sums[-1][1]

    monkeypatch.setattr(coordinator_sums, "unmask_sum", unmask)
    # Nine sites in groups of at least 2 (sizes 3, 2, 2, 2); each group's noise is split
    # over 2 of its sites (secure_dropout 0.4).
    fed = Federation(tmp_path, plan={**PLAN, "secure_group_size": 2, "secure_dropout": 0.4},
                     study={"sites": NINE})
    agents = _to_first_training_round(fed, NINE)
    sums.clear()  # the statistics round's one sum
    groups = {_group_of(a) for a in agents.values()}
    trio = next(g for g in groups if len(g) == 3)
    pair = sorted(g for g in groups if len(g) == 2)[0]
    dropped = {trio[0], pair[0]}  # after sharing their keys
    fed.step([a for s, a in agents.items() if s not in dropped])  # masked inputs
    fed.advance(3601)  # the input step's deadline passes
    revealing = [a for s, a in agents.items() if s not in dropped]
    assert fed.status()["secure_sum"]["step"] == "reveal"  # type: ignore[index]
    outsider = next(s for g in groups - {trio} for s in g if s not in dropped)
    answer = fed.client.post(  # a share of a site in another group's sum
        "/v1/studies/s1/rounds/1/secure/reveal", params={"attempt": 0},
        json={"shares": {outsider: {"kind": "b", "share": base64.b64encode(
            bytes(66)).decode()}}}, headers=fed.auth(agents[trio[1]].credential()))
    assert answer.status_code == 422
    assert answer.json()["detail"] == (f"Site {trio[1]!r} revealed a share of {outsider!r}, "
                                       f"which is not in its group's sum.")
    fed.step(revealing)  # the survivors reveal; the short pair's partner is not asked
    assert fed.status()["phase"] == "train" and fed.status()["round"] == 2, fed.status()
    assert {sites for sites, _ in sums} == groups - {pair}
    for sites, result in sums:
        survivors = [s for s in sites if s not in dropped]
        assert result.survivors == tuple(survivors)  # type: ignore[attr-defined]
        expected = np.sum([agents[s].secure.sent  # type: ignore[attr-defined]
                           for s in survivors], axis=0)
        np.testing.assert_allclose(result.total, expected, atol=0.05)  # type: ignore[attr-defined]
    # The reveal step closed before its deadline without the short pair's partner, which
    # was never asked (asked, it would have refused: its sum has too few inputs).
    assert fed.status()["refusals"] == []
    with session_factory(fed.settings.database_url)() as db:
        first = db.scalar(select(Round).where(Round.number == 1))
        assert first is not None
        assert [a["site"] for a in first.aggregation or []] == [
            "group 0", "group 1", "group 2"]
        assert db.scalar(select(func.count()).select_from(SecureMessage)
                         .where(SecureMessage.round_id == first.id)) == 0


def test_a_grouped_round_with_fewer_than_three_groups_to_unmask_is_given_up(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_group_size": 2}, study={"sites": SIX})
    agents = _to_first_training_round(fed, SIX)
    fed.step(list(agents.values())[1:])  # one site drops: its pair's sum is short
    fed.advance(3601)
    fed.step(list(agents.values())[1:])
    with session_factory(fed.settings.database_url)() as db:
        first = db.scalar(select(Round).where(Round.number == 1))
        assert first is not None and first.outcome is not None
        assert ("secure sum given up (2 groups with enough masked inputs to unmask, fewer "
                "than a robust rule's 3); the model stays at version 0") in first.outcome
        assert db.scalar(select(func.count()).select_from(SecureMessage)
                         .where(SecureMessage.round_id == first.id)) == 0


def test_a_node_refuses_to_share_keys_where_the_advertisers_make_fewer_than_three_groups(
        ) -> None:
    """The coordinator opens a grouped sum only with three groups' advertisements; one
    that relays fewer is refused by the node, naming why."""
    plan = {**PLAN, "secure_group_size": 2}
    sites = ["a", "b", "c", "d", "e"]
    task = _secure_task("advertise", sites=sites)
    rounds = {s: SecureRounds() for s in sites}
    adverts = {s: r.advertise(task, s, 1.0, 19).model_dump() for s, r in rounds.items()}
    share = _secure_task("share", adverts=adverts, noise_multiplier=1.0)
    with pytest.raises(TaskRefused, match=r"secure_group_size 2 leaves 2 group\(s\) of 5 "
                                          r"sites; a robust rule across groups needs at "
                                          r"least 3"):
        rounds["a"].share(share, "a", SimulationConfig.create(**plan))


def test_a_group_with_too_few_sharers_starts_the_sum_again_saying_why(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_group_size": 2}, study={"sites": SIX})
    agents = {s: private_agent(fed, s, 1e5) for s in SIX}
    while fed.status()["phase"] == "statistics":
        fed.step(list(agents.values()))
    fed.step(list(agents.values()))  # advertise
    fed.step(list(agents.values())[1:])  # one site shares no keys: its pair is short
    fed.advance(3601)
    fed.status()  # the coordinator closes the step past its deadline
    with session_factory(fed.settings.database_url)() as db:
        first = db.scalar(select(Round).where(Round.number == 1))
        assert first is not None and first.secure_attempt == 1
        assert ("1 group(s) with fewer sites sharing keys than the 2 a group's noise is "
                "split over: starting again with fresh keys") in str(first.outcome)


# ---------------------------------------------------------------- the statistics round


@pytest.fixture(scope="module")
def grouped_statistics() -> tuple[Any, list[list[str]], dict[str, np.ndarray]]:
    """Twelve synthetic sites in groups of 3, and each site's exact statistics vector."""
    data = synthetic_federation(n_sites=12, seed=0, size_scale=0.3)
    groups = secure_groups([s.name for s in data.sites], 3, 0)
    edges = bin_edges(data.feature_ranges, PRIVATE_BINS)
    return data, groups, {s.name: statistics_vector(s.x_train, edges) for s in data.sites}


def _gated_merge(data: Any, groups: list[list[str]], vectors: Mapping[str, np.ndarray],
                 gated: bool = True) -> Any:
    """The preprocessor a grouped statistics round merges from its groups' sums (one sum
    of every site with ``gated=False``), as the coordinator does."""
    private_edges = bin_edges(data.feature_ranges, PRIVATE_BINS)
    totals = ([np.sum([vectors[n] for n in g], axis=0) for g in groups] if gated
              else [np.sum(list(vectors.values()), axis=0)])
    stats = [statistics_from_sum(t, private_edges) for t in totals]
    edges = bin_edges(data.feature_ranges)
    return merge_statistics(robust_site_statistics(stats, edges)[0] if gated else stats, edges)


@settings(max_examples=60, deadline=None)
@given(attacker=st.integers(0, 11), records=st.floats(1.0, 1e7),
       count=st.floats(0.0, 1e7), data=st.data())
def test_a_forged_statistics_vector_moves_the_gated_merge_a_bounded_way(
        grouped_statistics: Any, attacker: int, records: float, count: float,
        data: st.DataObject) -> None:
    """Whatever one site sends in place of its histograms and record count (any bin of
    each column, up to the ring's 10,000,000 records), its group's sum is one release to
    the statistics gate: the merged means and SDs move a bounded way (the largest moves
    over 2,000 examples were 0.18 of a range and 0.26 of an SD; one sum of every site
    moves a mean 0.83 of its range)."""
    fed, groups, vectors = grouped_statistics
    d = len(fed.feature_ranges)
    bins = data.draw(st.lists(st.integers(0, PRIVATE_BINS - 1), min_size=d, max_size=d))
    hist = np.zeros((d, PRIVATE_BINS))
    hist[np.arange(d), bins] = np.floor(records)
    forged = {**vectors, fed.sites[attacker].name: np.concatenate([hist.ravel(), [count]])}
    clean, attacked = _gated_merge(fed, groups, vectors), _gated_merge(fed, groups, forged)
    width = np.array([hi - lo for lo, hi in fed.feature_ranges])
    assert np.max(np.abs(attacked.mean - clean.mean) / width) <= 0.25
    assert np.max(np.abs(attacked.std / clean.std - 1)) <= 0.40


def test_one_sum_of_every_site_lets_one_forged_site_own_the_statistics(
        grouped_statistics: Any) -> None:
    fed, groups, vectors = grouped_statistics
    d = len(fed.feature_ranges)
    hist = np.zeros((d, PRIVATE_BINS))
    hist[:, -1] = 1e7
    forged = {**vectors, fed.sites[0].name: np.concatenate([hist.ravel(), [1e7]])}
    width = np.array([hi - lo for lo, hi in fed.feature_ranges])
    for gated, far in ((False, True), (True, False)):
        moved = np.max(np.abs(_gated_merge(fed, groups, forged, gated).mean
                              - _gated_merge(fed, groups, vectors, gated).mean) / width)
        assert (moved > 0.5) == far, (gated, moved)


# ---------------------------------------------------------------- the evaluation round


@pytest.fixture(scope="module")
def grouped_evaluation(grouped_statistics: Any) -> tuple[list[list[str]], dict[str, Any]]:
    """The twelve sites' evaluation vectors of their true risks on their test splits."""
    fed, groups, _ = grouped_statistics
    return groups, {s.name: evaluation_vector(s.y_test, s.true_risk_test) for s in fed.sites}


def _pooled_auc(groups: list[list[str]], vectors: Mapping[str, np.ndarray],
                gated: bool = True) -> float:
    totals = ([np.sum([vectors[n] for n in g], axis=0) for g in groups] if gated
              else [np.sum(list(vectors.values()), axis=0)])
    neg, pos, _, _ = gated_evaluation(totals, [0.0] * len(totals))
    return float(metrics_from_histograms(neg, pos, score_bin_edges(len(neg)))["auc"])


@settings(max_examples=60, deadline=None)
@given(attacker=st.integers(0, 11), records=st.floats(1.0, 1e7), data=st.data())
def test_a_forged_evaluation_vector_moves_the_gated_auc_a_bounded_way(
        grouped_evaluation: Any, attacker: int, records: float, data: st.DataObject) -> None:
    """Whatever one site sends in place of its score histograms (negatives and positives
    in any bins, up to the ring's 10,000,000 records), its group's sum is one release to
    the gate, at most twice the median group's count: the pooled AUC moves a bounded way.
    Over 2,000 examples: 0.014 at the median, 0.17 at the 99th percentile, 0.32 at most
    (records swapped inside the honest groups' score range, which no gate tells from
    the truth); one sum of every site can be set to any AUC."""
    groups, vectors = grouped_evaluation
    n = EVALUATION_LENGTH // 2
    neg_bins = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    pos_bins = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3))
    forged = np.zeros(EVALUATION_LENGTH)
    forged[neg_bins] = np.floor(records)
    forged[[n + b for b in pos_bins]] = np.floor(records * data.draw(st.floats(0.0, 1.0)))
    attacked = {**vectors, sorted(vectors)[attacker]: forged}
    assert abs(_pooled_auc(groups, attacked) - _pooled_auc(groups, vectors)) <= 0.40


def test_one_evaluation_sum_lets_one_forged_site_set_the_auc(grouped_evaluation: Any) -> None:
    groups, vectors = grouped_evaluation
    forged = np.zeros(EVALUATION_LENGTH)
    forged[0] = forged[-1] = 1e7  # negatives at the lowest risks, positives at the highest
    attacked = {**vectors, sorted(vectors)[0]: forged}
    assert _pooled_auc(groups, attacked, gated=False) > 0.99
    assert abs(_pooled_auc(groups, attacked) - _pooled_auc(groups, vectors)) < 0.05
