"""Secure rounds over the network (cardiofed.protocol.secure_sums): the nodes and the
coordinator run the four steps of each sum over HTTP; the coordinator keeps no site's
release, survives a site that drops after sharing its keys, and refuses messages out of
step or malformed, naming why."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from test_coordinator import SITES, Federation, _simulated, _until_done  # type: ignore[import-not-found]
from test_node_privacy import default_agent, refusals  # type: ignore[import-not-found]

import cardiofed.coordinator.secure_sums as coordinator_sums
import cardiofed.node.secure_rounds as node_sums
from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges
from cardiofed.exceptions import TaskRefused
from cardiofed.node.agent import NodeAgent
from cardiofed.node.config import NodeConfig
from cardiofed.privacy.ledger_file import open_ledger_file
from cardiofed.protocol import secure_sums as wire
from cardiofed.protocol.schemas import TaskResponse
from cardiofed.secure.simulate import ring_sum
from cardiofed.serving import registry
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_evaluation import POOLED_SECURE
from cardiofed.simulation.secure_statistics import statistics_vector
from cardiofed.store import Round, SecureMessage, Update, session_factory

PLAN = {"rounds": 3, "seed": 5, "secure_aggregation": True, "lr": 0.5}


def private_agent(fed: Federation, site: str, epsilon: float) -> NodeAgent:
    return NodeAgent(NodeConfig.create(
        coordinator_url="http://testserver", state_dir=str(fed.tmp / site),
        enrolment_token=fed.tokens[site], poll_wait_s=0,
        privacy={"epsilon_max": epsilon, "study_epsilon": epsilon},
        data={"dataset": "synthetic", "site": site, "seed": 0}), client=fed.client)


def test_a_secure_study_runs_over_the_network_keeping_only_sums(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]  # private by default
    fetched: list[str] = []
    for agent in agents:
        def fetching(method: str, url: str, *args: Any, _request: Any = agent._request,
                     **kwargs: Any) -> Any:
            if method == "GET" and "/models/" in url:
                fetched.append(url)
            return _request(method, url, *args, **kwargs)
        agent._request = fetching  # type: ignore[method-assign]
    _until_done(fed, agents)

    assert fed.status()["refusals"] == []
    # Each site fetches each version once, though two steps of its sum use it.
    assert Counter(fetched) == {f"/v1/studies/s1/models/{v}": len(SITES) for v in range(4)}
    for site in SITES:
        ledger = open_ledger_file(fed.tmp / f"{site}-privacy")
        assert [e["kind"] for e in ledger.entries] == [
            "statistics", "train", "train", "train", "evaluate"]
        assert all(e.get("secure_sum") for e in ledger.entries)
        assert ledger.entries[-1]["epsilon_after"] <= 1.0 + 1e-9
    with session_factory(fed.settings.database_url)() as db:
        kinds = [r.kind for r in db.scalars(select(Round).order_by(Round.number))]
        assert db.scalar(select(func.count()).select_from(Update)) == 0
        assert db.scalar(select(func.count()).select_from(SecureMessage)) == 0
        card = registry.card(db, "s1-v3")
    # Every round was a secure sum: no site's statistics, gradient or evaluation is kept;
    # the card holds the pooled test's metrics from the evaluation's sum, with intervals.
    assert kinds == ["statistics", "train", "train", "train", "evaluate"]
    assert card["sites"] == SITES and list(card["metrics"]) == [POOLED_SECURE]
    pooled = card["metrics"][POOLED_SECURE]
    assert pooled["auc_ci_low"] <= pooled["auc"] <= pooled["auc_ci_high"]
    assert "the pooled test of all sites" in " ".join(card["notes"])
    # Served as JSON like any card: no metric that is not finite (None instead).
    served = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert served[-1]["metrics"][POOLED_SECURE] == pooled


def test_with_little_noise_the_network_trains_the_simulators_model(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    _until_done(fed, [private_agent(fed, s, 1e5) for s in SITES])
    sim = _simulated({**PLAN, "dp_epsilon": 1e5})
    with session_factory(fed.settings.database_url)() as db:
        served = registry.load(db, "s1-v3")
    for name, value in served.weights.items():
        np.testing.assert_allclose(value, sim.federated.weights[name], atol=2e-3)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[object]]]:
    """Seeded generators for the nodes' rounding and noise, and the coordinator's
    unmasked sums, recorded."""
    record: dict[str, list[object]] = {"seeds": [], "sums": []}

    def rng() -> np.random.Generator:
        record["seeds"].append(len(record["seeds"]))
        return np.random.default_rng(len(record["seeds"]) - 1)

    real = coordinator_sums.unmask_sum

    def unmask(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        record["sums"].append(result)
        return result

    monkeypatch.setattr(node_sums, "secure_numpy_rng", rng)
    monkeypatch.setattr(coordinator_sums, "unmask_sum", unmask)
    yield record


def test_a_site_dropping_after_sharing_keys_leaves_the_survivors_exact_sum(
        tmp_path: Path, recorded: dict[str, list[object]]) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_dropout": 0.4})  # noise over 2 of 3
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents)  # advertise
    fed.step(agents)  # share keys
    fed.step(agents[:2])  # the third site drops before its input
    fed.advance(3601)  # the input step's deadline passes
    fed.step(agents[:2])  # the survivors reveal
    status = fed.status()
    assert status["phase"] == "train", status

    result = recorded["sums"][0]
    assert result.survivors == tuple(sorted(SITES[:2])) and result.dropped == (SITES[2],)
    plan = SimulationConfig.create(**PLAN, secure_dropout=0.4)
    ranges = [tuple(r) for r in fed.client.get(  # the study's ranges, as the sites hold them
        "/v1/tasks/next", headers=fed.auth(agents[0].credential())).json()["feature_ranges"]]
    edges = bin_edges(ranges, PRIVATE_BINS)
    multiplier = open_ledger_file(fed.tmp / f"{SITES[0]}-privacy").entries[0][
        "noise_multiplier"]  # the study's: the largest any site needed
    sum_plan, noise = wire.sum_setup("statistics", plan, sorted(SITES),
                                     wire.vector_length("statistics", len(ranges), 0),
                                     multiplier, context=wire.sum_context("s1", 0, 0))
    # The sites drew their generators in the order they sent their inputs.
    vectors = {s: statistics_vector(a._site.x_train, edges)  # type: ignore[union-attr]
               for s, a in zip(SITES[:2], agents[:2], strict=True)}
    rngs = {s: np.random.default_rng(k) for k, s in enumerate(SITES[:2])}
    np.testing.assert_array_equal(result.total, ring_sum(sum_plan.codec, vectors, rngs, noise))


def test_a_non_private_node_refuses_a_secure_round(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    fed.step([fed.agent(s) for s in SITES])  # privacy = "off"
    assert refusals(fed) == [
        "The study's rounds are secure sums with distributed noise, which each site adds "
        "from its privacy budget; this node has none (privacy = \"off\")."] * 3


def _task(fed: Federation, agent: NodeAgent) -> dict[str, object]:
    return fed.client.get("/v1/tasks/next", headers=fed.auth(agent.credential())).json()


def test_a_node_shares_no_key_when_the_noise_is_below_its_need(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents)  # advertise
    task = _task(fed, agents[0])
    adverts = task["secure"]["adverts"]  # type: ignore[index]
    for ad in adverts.values():  # a coordinator announcing less noise than they need
        ad["noise_multiplier"] /= 2
    task["secure"]["noise_multiplier"] /= 2  # type: ignore[index]
    agents[0].run_task(TaskResponse.model_validate(task))
    assert refusals(fed)[0].startswith("The sum's noise multiplier")
    assert "below this site's" in refusals(fed)[0]


def test_messages_out_of_step_are_refused_by_name(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agent = default_agent(fed, SITES[0])
    headers = fed.auth(agent.credential())
    key = base64.b64encode(bytes(32)).decode()
    advert = {"c_public": key, "s_public": key, "noise_multiplier": 1.0}
    url = "/v1/studies/s1/rounds/0/secure"
    answer = fed.client.post(f"{url}/share", params={"attempt": 0}, headers=headers,
                             json={"sealed": {}})
    assert answer.status_code == 409
    assert "is at step 'advertise' of attempt 0; this message is for step 'share'" in \
        answer.json()["detail"]
    answer = fed.client.post(f"{url}/advertise", params={"attempt": 1}, headers=headers,
                             json=advert)
    assert answer.status_code == 409
    assert fed.client.post(f"{url}/advertise", params={"attempt": 0}, headers=headers,
                           json=advert).status_code == 204
    again = fed.client.post(f"{url}/advertise", params={"attempt": 0}, headers=headers,
                            json={**advert, "noise_multiplier": 2.0})
    assert again.status_code == 409 and "already posted another advertise" in \
        again.json()["detail"]
    assert fed.client.post("/v1/studies/s1/rounds/1/secure/advertise", params={"attempt": 0},
                           headers=headers, json=advert).status_code == 404


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 80).filter(lambda n: n != 32), which=st.sampled_from(
    ["c_public", "s_public"]))
def test_a_key_of_the_wrong_length_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                              size: int, which: str) -> None:
    fed = _shared_federation(tmp_path_factory)
    key = base64.b64encode(bytes(32)).decode()
    advert = {"c_public": key, "s_public": key, "noise_multiplier": 1.0,
              which: base64.b64encode(bytes(size)).decode()}
    answer = fed.client.post("/v1/studies/s1/rounds/0/secure/advertise",
                             params={"attempt": 0}, json=advert,
                             headers=fed.auth(fed.agents[0].credential()))  # type: ignore[attr-defined]
    assert answer.status_code == 422
    assert f"{which} must be 32 bytes" in answer.json()["detail"]


_FEDERATIONS: dict[str, Federation] = {}


def _shared_federation(factory: pytest.TempPathFactory) -> Federation:
    if "one" not in _FEDERATIONS:
        fed = Federation(factory.mktemp("secure"), plan=PLAN)
        fed.agents = [default_agent(fed, s) for s in SITES]  # type: ignore[attr-defined]
        _FEDERATIONS["one"] = fed
    return _FEDERATIONS["one"]


def test_a_long_poll_wakes_when_its_study_changes() -> None:
    import asyncio
    import threading

    from cardiofed.coordinator import wakeups

    async def poll() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        changed = wakeups.listen("s1")  # a poll looks (and finds nothing to do) ...
        notifier = threading.Thread(target=wakeups.notify, args=("s1",))  # an upload's
        notifier.start()  # thread: the study changes while the poll looks
        notifier.join()
        await wakeups.wait(changed, timeout=600)  # ... and is not left waiting
        return loop.time() - start

    assert asyncio.run(poll()) < 600  # woken, not timed out
    wakeups.notify("no such study")  # nobody waits: nothing happens


def test_the_status_says_which_step_the_sum_is_at_and_whom_it_waits_for(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents[:2])  # two sites advertised
    status = fed.status()
    assert status["secure_sum"] == {"step": "advertise", "attempt": 0}
    assert status["reported"] == sorted(SITES[:2]) and status["waiting_for"] == [SITES[2]]
    fed.step(agents[2:])
    status = fed.status()
    assert status["secure_sum"]["step"] == "share"  # type: ignore[index]
    assert status["waiting_for"] == sorted(SITES)


def _secure_task(step: str, **secure: object) -> TaskResponse:
    return TaskResponse.model_validate({
        "study": "s1", "round": 1, "kind": "train", "model_version": 0,
        "deadline": "2026-01-01T00:00:00Z", "site_index": 0, "plan": PLAN,
        "feature_names": [], "feature_ranges": [],
        "secure": {"step": step, "attempt": 0, **secure}})


@settings(max_examples=40, deadline=None)
@given(need=st.floats(0.5, 5), others=st.lists(st.floats(0.1, 10), min_size=1, max_size=4),
       lie=st.one_of(st.none(), st.floats(0.1, 10)))
def test_a_node_shares_keys_only_under_noise_covering_its_need(
        need: float, others: list[float], lie: float | None) -> None:
    """Whatever multipliers a coordinator relays, a node shares its keys only when the
    sum's noise is the largest advertised and at least what its own budget needs."""
    rounds = node_sums.SecureRounds()
    own = rounds.advertise(_secure_task("advertise", sites=["a", "b"]), "a", need, 19)
    adverts = {"a": own.model_dump(), **{
        f"o{k}": {**node_sums.SecureRounds().advertise(
            _secure_task("advertise", sites=["a", "b"]), f"o{k}", m, 19).model_dump()}
        for k, m in enumerate(others)}}
    announced = max([need, *others]) if lie is None else lie  # honest, or any figure
    task = _secure_task("share", adverts=adverts, noise_multiplier=announced)
    fair = announced == max([need, *others]) and announced >= need
    if fair:
        assert rounds.share(task, "a", SimulationConfig.create(**PLAN)).sealed
    else:
        with pytest.raises(TaskRefused, match="noise multiplier"):
            rounds.share(task, "a", SimulationConfig.create(**PLAN))


def test_networked_secure_studies_refuse_too_few_groups_and_relays_by_name(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    names_ranges = fed.client.get("/v1/tasks/next", headers=fed.auth(
        default_agent(fed, SITES[0]).credential())).json()
    body = {"sites": SITES, "feature_names": names_ranges["feature_names"],
            "feature_ranges": names_ranges["feature_ranges"]}
    grouped = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        **body, "id": "g", "plan": {**PLAN, "secure_group_size": 2, "robust_rule": "median"}})
    assert grouped.status_code == 422
    assert ("secure_group_size 2 leaves 1 group(s) of 3 sites; a robust rule across groups "
            "needs at least 3") in grouped.json()["detail"]
    relay = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        **body, "id": "r", "plan": PLAN, "relay": True})
    assert relay.status_code == 422
    assert "A relay study cannot be secure" in relay.json()["detail"]


def test_malformed_messages_are_refused_at_each_step(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]
    headers = fed.auth(agents[0].credential())

    def post(step: str, body: dict[str, object]) -> tuple[int, str]:
        answer = fed.client.post(f"/v1/studies/s1/rounds/0/secure/{step}", json=body,
                                 params={"attempt": 0}, headers=headers)
        return answer.status_code, str(answer.json().get("detail"))

    fed.step(agents)  # advertise
    box = base64.b64encode(bytes(60)).decode()
    code, why = post("share", {"sealed": {"nobody": box}})
    assert code == 422 and "must seal one share pair for each of its neighbours" in why
    long_box = base64.b64encode(bytes(coordinator_sums.SEALED_MAX + 1)).decode()
    code, why = post("share", {"sealed": {SITES[1]: box, SITES[2]: long_box}})
    assert code == 422 and f"A sealed share pair of {SITES[0]!r} is over 1024 bytes" in why
    fed.step(agents)  # share
    code, why = post("input", {"masked": base64.b64encode(bytes(16)).decode()})
    assert code == 422 and "holds 16 bytes" in why
    fed.step(agents)  # input
    share = base64.b64encode(bytes(66)).decode()
    code, why = post("reveal", {"shares": {SITES[1]: {"kind": "s", "share": share}}})
    assert code == 422 and "revealed the wrong share" in why
    code, why = post("reveal", {"shares": {SITES[1]: {"kind": "b", "share": box}}})
    assert code == 422 and "revealed is not 66 bytes" in why


def test_a_share_revealed_for_a_site_that_shared_no_keys_is_refused(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_dropout": 0.4})
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents)  # advertise
    fed.step(agents[:2])  # share: the third site does not
    fed.advance(3601)  # the step's deadline: the sum goes on with two
    fed.step(agents[:2])  # input
    assert fed.status()["secure_sum"]["step"] == "reveal"
    share = base64.b64encode(bytes(66)).decode()
    answer = fed.client.post("/v1/studies/s1/rounds/0/secure/reveal", params={"attempt": 0},
                             json={"shares": {SITES[2]: {"kind": "s", "share": share}}},
                             headers=fed.auth(agents[0].credential()))
    assert answer.status_code == 422
    assert answer.json()["detail"] == (f"Site {SITES[0]!r} revealed a share of {SITES[2]!r}, "
                                       f"which shared no keys in this sum.")


def test_a_site_that_publishes_no_evaluation_stays_out_of_the_evaluation_sum(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES[:2]]
    agents.append(NodeAgent(NodeConfig.create(
        coordinator_url="http://testserver", state_dir=str(fed.tmp / SITES[2]),
        enrolment_token=fed.tokens[SITES[2]], poll_wait_s=0, publish_metrics=False,
        data={"dataset": "synthetic", "site": SITES[2], "seed": 0}), client=fed.client))
    _until_done(fed, agents)

    assert refusals(fed) == ["This site publishes no evaluation (publish_metrics = false), "
                             "not even as part of a secure sum."]
    assert "evaluate" not in [e["kind"] for e in _ledger_entries(fed, SITES[2])]
    assert [e["kind"] for e in _ledger_entries(fed, SITES[0])][-1] == "evaluate"
    with session_factory(fed.settings.database_url)() as db:
        card = registry.card(db, "s1-v3")
    assert list(card["metrics"]) == [POOLED_SECURE]  # the other two sites' sum


def test_an_evaluation_sum_given_up_stops_the_study_without_metrics(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]
    while fed.status()["phase"] != "evaluate":
        fed.step(agents)
    fed.step(agents)  # advertise
    fed.step(agents)  # share
    fed.step(agents[:1])  # input: one masked input of the three the noise is split over
    fed.advance(3601)
    status = fed.status()
    assert status["phase"] == "done"
    assert status["round_outcome"].startswith(
        "study stopped: the evaluate round's secure sum was given up: 1 masked inputs, "
        "fewer than the 3")
    with session_factory(fed.settings.database_url)() as db:
        assert registry.card(db, "s1-v3")["metrics"] == {}
        assert db.scalar(select(func.count()).select_from(SecureMessage)) == 0


def _ledger_entries(fed: Federation, site: str) -> list[dict[str, object]]:
    return open_ledger_file(fed.tmp / f"{site}-privacy").entries


def test_a_node_that_restarts_during_a_sum_leaves_the_round(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_dropout": 0.4})
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents)  # advertise
    agents[2] = default_agent(fed, SITES[2])  # restarted: its keys were in memory only
    fed.step(agents)  # share: the restarted node refuses
    assert refusals(fed) == ["This node holds no keys for this sum (it restarted, or "
                             "missed the advertisement): it leaves this round."]
    _until_done(fed, agents)  # the others finish the study without it


def test_a_message_outside_the_sum_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    plain = Federation(tmp_path / "plain", plan={**PLAN, "secure_aggregation": False})
    key = base64.b64encode(bytes(32)).decode()
    advert = {"c_public": key, "s_public": key, "noise_multiplier": 1.0}
    agent = default_agent(plain, SITES[0])
    answer = plain.client.post("/v1/studies/s1/rounds/0/secure/advertise",
                               params={"attempt": 0}, json=advert,
                               headers=plain.auth(agent.credential()))
    assert answer.status_code == 409
    assert "Round 0 of study 's1' is not a secure round." in answer.json()["detail"]

    fed = Federation(tmp_path, plan=PLAN, min_sites=2)
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents[:2])  # two sites advertise; the third misses the step
    fed.advance(3601)  # the step closes without it
    fed.step(agents[:2])  # the two share keys: the sum is at its input step
    late = fed.client.post("/v1/studies/s1/rounds/0/secure/input", params={"attempt": 0},
                           json={"masked": ""}, headers=fed.auth(agents[2].credential()))
    assert late.status_code == 409
    assert "is not in this step of the sum (it missed an earlier step" in \
        late.json()["detail"]


def _sum_at_input(sites: str = "abc") -> tuple[dict[str, node_sums.SecureRounds],
                                               dict[str, dict[str, str]]]:
    """Each site's node state after advertising and sharing keys in one sum of `sites`
    that may lose one site, and the sealed share pairs each sent (sender -> recipient ->
    box)."""
    rounds = {n: node_sums.SecureRounds() for n in sites}
    adverts = {n: r.advertise(_secure_task("advertise", sites=list(sites)), n, 1.0, 19)
               .model_dump() for n, r in rounds.items()}
    task = _secure_task("share", adverts=adverts, noise_multiplier=1.0)
    plan = SimulationConfig.create(**{**PLAN, "secure_dropout": 0.4})  # 2 inputs suffice
    sealed = {n: r.share(task, n, plan).sealed for n, r in rounds.items()}
    return rounds, sealed


def _send_input(rounds: dict[str, node_sums.SecureRounds], sealed: dict[str, dict[str, str]],
                site: str, inbox: dict[str, str] | None = None) -> wire.SecureInput:
    inbox = inbox or {peer: boxes[site] for peer, boxes in sealed.items() if site in boxes}
    task = _secure_task("input", inbox=inbox, noise_multiplier=1.0)
    return rounds[site].input(task, lambda multiplier: None, lambda: np.zeros(19))


@settings(max_examples=30, deadline=None)
@given(key=st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                     st.from_regex(r"[A-Za-z0-9+/]{0,50}={0,2}", fullmatch=True)))
def test_a_node_refuses_advertisements_it_cannot_share_keys_with(key: str) -> None:
    """Whatever key a coordinator relays for another site, the node shares keys (a key of
    X25519's 32 bytes) or refuses the round by name; nothing else."""
    own = node_sums.SecureRounds()
    adverts = {"a": own.advertise(_secure_task("advertise", sites=["a", "b", "c"]), "a",
                                  1.0, 19).model_dump()}
    for peer in "bc":
        adverts[peer] = node_sums.SecureRounds().advertise(
            _secure_task("advertise", sites=["a", "b", "c"]), peer, 1.0, 19).model_dump()
    adverts["b"]["c_public"] = key
    task = _secure_task("share", adverts=adverts, noise_multiplier=1.0)
    try:
        decoded = base64.b64decode(key, validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) == 32:
        assert set(own.share(task, "a", SimulationConfig.create(**PLAN)).sealed) == {"b", "c"}
    else:
        with pytest.raises(TaskRefused, match="The sum's advertisements are not ones this "
                                              "site can share keys with: .*'b'"):
            own.share(task, "a", SimulationConfig.create(**PLAN))


@settings(max_examples=30, deadline=None)
@given(box=st.one_of(st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                     st.text(max_size=60)))
def test_a_node_refuses_to_mask_with_a_share_pair_that_is_not_sealed_for_it(box: str) -> None:
    """A relayed share pair that is not the one sealed for this site (forged, cut, not
    base64) is refused by name, before anything is masked."""
    rounds, sealed = _sum_at_input()
    inbox = {"b": box, "c": sealed["c"]["a"]}
    with pytest.raises(TaskRefused, match="This site cannot mask its input with the "
                                          "shares it was sent"):
        _send_input(rounds, sealed, "a", inbox)


@settings(max_examples=40, deadline=None)
@given(survivors=st.lists(st.sampled_from(["a", "b", "c", "x"]), unique=True))
def test_a_node_reveals_only_for_survivors_that_make_a_sum(survivors: list[str]) -> None:
    """The node reveals its shares for a survivor list that holds itself, only sites of
    the sum, and at least the plan's minimum of inputs (2); any other list is refused."""
    rounds, sealed = _sum_at_input()
    _send_input(rounds, sealed, "a")
    task = _secure_task("reveal", survivors=survivors)
    if "a" in survivors and set(survivors) <= set("abc") and len(survivors) >= 2:
        shares = rounds["a"].reveal(task).shares
        assert {s: r.kind for s, r in shares.items()} == {
            s: "b" if s in survivors else "s" for s in "abc"}
    else:
        with pytest.raises(TaskRefused, match="This site does not reveal shares for these "
                                              "survivors"):
            rounds["a"].reveal(task)


@settings(max_examples=30, deadline=None)
@given(values=st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=19, max_size=19),
    st.lists(st.floats(-1e3, 1e3), max_size=30), st.none()))
def test_a_vector_that_fails_sends_zeros_charged_never_a_refusal(
        values: list[float] | None) -> None:
    """Whatever the site's computation gives (values not finite, the wrong length, an
    exception), its input goes out, charged once, as a valid input does: a refusal after
    the charge would tell the coordinator that the computation failed on its rows."""
    rounds, sealed = _sum_at_input()
    charged: list[float] = []

    def vector() -> np.ndarray:
        if values is None:
            raise OverflowError("the rows overflowed")
        return np.array(values)

    inbox = {peer: boxes["a"] for peer, boxes in sealed.items() if "a" in boxes}
    sent = rounds["a"].input(_secure_task("input", inbox=inbox, noise_multiplier=1.0),
                             charged.append, vector)
    assert charged == [1.0] and len(base64.b64decode(sent.masked)) == 8 * 19


def test_a_site_with_nothing_to_do_is_answered_from_its_own_messages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long poll that finds no task reads the polling site's messages only, never the
    whole sum's: at 200 sites every idle poll read and parsed every site's messages."""
    fed = Federation(tmp_path, plan=PLAN)
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents[:2])  # two sites advertised; the step waits for the third

    def whole_sum(*_: object) -> None:
        raise AssertionError("an idle poll read the whole sum's state")

    monkeypatch.setattr(coordinator_sums, "_State", whole_sum)
    for agent in agents[:2]:
        answer = fed.client.get("/v1/tasks/next", headers=fed.auth(agent.credential()))
        assert answer.status_code == 204
