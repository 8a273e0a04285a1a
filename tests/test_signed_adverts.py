"""Signed advertisements: with the federation's roster, a node signs its secure sums'
advertisements and shares its keys only when every advertisement of a sum is a roster
site's, signed by that site's key; an active coordinator that substitutes a site's keys,
changes what a site asked for, or adds a site of its own is refused by name."""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_coordinator import SITES, Federation, _until_done  # type: ignore[import-not-found]
from test_secure_network import PLAN, _secure_task  # type: ignore[import-not-found]
from typer.testing import CliRunner

from cardiofed.cli import app
from cardiofed.exceptions import ConfigurationError, TaskRefused
from cardiofed.node.agent import NodeAgent
from cardiofed.node.config import NodeConfig
from cardiofed.node.secure_rounds import SecureRounds
from cardiofed.privacy.ledger_file import open_ledger_file
from cardiofed.protocol import secure_sums as wire
from cardiofed.protocol.schemas import SecureAdvert, SecureConfirm, TaskResponse
from cardiofed.secure import keys
from cardiofed.secure.identity import (
    IDENTITY_KEY,
    SiteIdentity,
    identity_key,
    public_of,
    read_roster,
    roster_line,
)
from cardiofed.simulation.config import SimulationConfig


def _roster(tmp: Path, sites: list[str]) -> Path:
    """Each site's key in its state_dir and the roster of them all."""
    lines = [roster_line(s, identity_key(tmp / s / IDENTITY_KEY)) for s in sites]
    path = tmp / "roster.toml"
    path.write_text("[sites]\n" + "\n".join(lines) + "\n")
    return path


def _signed_agent(fed: Federation, site: str, roster: Path) -> NodeAgent:
    return NodeAgent(NodeConfig.create(
        coordinator_url="http://testserver", state_dir=str(fed.tmp / site),
        enrolment_token=fed.tokens[site], poll_wait_s=0, roster=str(roster),
        data={"dataset": "synthetic", "site": site, "seed": 0}), client=fed.client)


def test_a_secure_study_whose_nodes_hold_the_roster_runs_signed(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    roster = _roster(fed.tmp, SITES)
    agents = [_signed_agent(fed, s, roster) for s in SITES]
    sent: list[SecureAdvert] = []
    original = agents[0].secure.advertise

    def advertise(*args: object, **kwargs: object) -> SecureAdvert:
        ad = original(*args, **kwargs)  # type: ignore[arg-type]
        sent.append(ad)
        return ad
    agents[0].secure.advertise = advertise  # type: ignore[method-assign]
    confirmed: list[list[str]] = []
    confirm = agents[0].secure.confirm

    def confirming(task: TaskResponse) -> SecureConfirm:
        confirmed.append(list(task.secure.survivors or []))  # type: ignore[union-attr]
        return confirm(task)
    agents[0].secure.confirm = confirming  # type: ignore[method-assign]
    _until_done(fed, agents)
    assert fed.status()["refusals"] == []
    assert sent and all(ad.signature for ad in sent)  # each sum's advertisement signed
    assert confirmed == [sorted(SITES)] * 5  # and each sum's survivor list
    entries = open_ledger_file(fed.tmp / f"{SITES[0]}-privacy").entries
    assert [e["kind"] for e in entries] == ["statistics", "train", "train", "train",
                                            "evaluate"]


def test_a_node_whose_key_is_not_its_roster_entry_signs_nothing(tmp_path: Path) -> None:
    roster = _roster(tmp_path, ["a", "b"])
    other = SiteIdentity(identity_key(tmp_path / "b" / IDENTITY_KEY), read_roster(roster))
    with pytest.raises(TaskRefused, match=re.escape(
            "The roster does not give site 'a' this node's identity key")):
        SecureRounds(other).advertise(_secure_task("advertise", sites=["a", "b"]), "a", 1.0,
                                      19)


SUM_SITES = ["a", "b", "c"]


def _sum(tmp: Path) -> tuple[dict[str, SecureRounds], dict[str, dict[str, object]]]:
    roster = read_roster(_roster(tmp, SUM_SITES))
    nodes = {s: SecureRounds(SiteIdentity(identity_key(tmp / s / IDENTITY_KEY), roster))
             for s in SUM_SITES}
    adverts = {s: nodes[s].advertise(_secure_task("advertise", sites=SUM_SITES), s, 1.0, 19)
               .model_dump() for s in SUM_SITES}
    return nodes, adverts


def _share(node: SecureRounds, adverts: dict[str, dict[str, object]]) -> object:
    task = _secure_task("share", adverts=adverts, noise_multiplier=max(
        float(ad["noise_multiplier"]) for ad in adverts.values()))  # type: ignore[arg-type]
    return node.share(task, "a", SimulationConfig.create(**PLAN))


def _flip(text: str, at: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at % len(raw)] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.fixture(scope="module")
def signed_sum(tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[dict[str, SecureRounds], dict[str, dict[str, object]]]:
    return _sum(tmp_path_factory.mktemp("signed"))


@settings(max_examples=60, deadline=None)
@given(victim=st.sampled_from(["b", "c"]),
       change=st.sampled_from(["c_public", "s_public", "noise", "signature", "unsigned",
                               "swap", "stranger", "replay"]),
       at=st.integers(0, 63))
def test_an_active_coordinator_that_changes_an_advertisement_is_refused_by_name(
        signed_sum: tuple[dict[str, SecureRounds], dict[str, dict[str, object]]],
        victim: str, change: str, at: int) -> None:
    """Whatever a coordinator changes in another site's advertisement (its keys, the noise
    it asked for, the signature; two sites' adverts swapped; a site of its own; an
    advertisement of another round), site a shares no key and names the site."""
    nodes, adverts = signed_sum
    assert _share(nodes["a"], adverts)  # the honest sum: keys shared
    changed = {s: dict(ad) for s, ad in adverts.items()}
    ad = changed[victim]
    if change in ("c_public", "s_public"):  # the coordinator's own key in its place
        ad[change] = base64.b64encode(keys.public_key(keys.new_private_key())).decode()
    elif change == "noise":
        ad["noise_multiplier"] = float(ad["noise_multiplier"]) * 2  # type: ignore[arg-type]
    elif change == "signature":
        ad["signature"] = _flip(str(ad["signature"]), at)
    elif change == "unsigned":
        ad["signature"] = None
    elif change == "swap":  # either site is named: the first checked
        changed["b"], changed["c"] = changed["c"], changed["b"]
        victim = "b"
    elif change == "stranger":
        changed["mallory"] = dict(adverts[victim])
        victim = "mallory"
    else:  # the site's signed advertisement of another sum (round 2), replayed
        other_sum = _secure_task("advertise", sites=SUM_SITES).model_copy(update={"round": 2})
        changed[victim] = SecureRounds(nodes[victim].identity).advertise(
            other_sum, victim, 1.0, 19).model_dump()
    with pytest.raises(TaskRefused, match=re.escape(f"{victim!r}")):
        _share(nodes["a"], changed)


def test_a_roster_is_refused_by_name_unless_it_is_one_of_names_and_keys(
        tmp_path: Path) -> None:
    good = base64.b64encode(bytes(32)).decode()
    cases = [("[other]\nx = 1\n", "must hold one [sites] table"),
             (f'[sites]\n"../x" = "{good}"\n', "site name must start with a letter"),
             ('[sites]\na = "c2hvcnQ="\n', "site 'a' needs a 32-byte Ed25519 public key"),
             ('[sites]\na = "not base64!"\n', "site 'a' needs a 32-byte Ed25519"),
             (f'[sites]\na = "{good}"\nb = "{good}"\n', "gives two sites the same key"),
             ("[sites\n", "is not valid TOML")]
    for text, message in cases:
        path = tmp_path / "roster.toml"
        path.write_text(text)
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            read_roster(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        read_roster(tmp_path / "missing.toml")
    (tmp_path / "bad.key").write_text("c2hvcnQ=\n")
    with pytest.raises(ConfigurationError, match="does not hold a 32-byte Ed25519 key"):
        identity_key(tmp_path / "bad.key")


def test_the_identity_command_prints_the_same_public_key_each_time(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('coordinator_url = "http://127.0.0.1:1"\nstate_dir = "state"\n'
                      '[data]\ndataset = "synthetic"\nsite = "tier3_01"\n')
    runs = [CliRunner().invoke(app, ["node", "identity", "--config", str(config)])
            for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert runs[0].output == runs[1].output
    key = base64.b64encode(public_of(identity_key(tmp_path / "state" / IDENTITY_KEY)))
    assert f'<site name> = "{key.decode()}"' in runs[0].output
    assert (tmp_path / "state" / IDENTITY_KEY).stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- survivor lists


def test_a_coordinator_telling_one_site_another_survivor_list_gets_no_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator tells the first site that the third dropped, and the others that
    it survived: unchecked, the first would reveal the third's mask key while the others
    reveal its self-mask. Each site signs the list it was given; none of the lists has
    the quorum's signatures, so no site reveals a share and the sum is given up."""
    import cardiofed.coordinator.secure_sums as coordinator_sums

    honest = coordinator_sums._survivors

    def lying(state: object, site: str) -> list[str]:
        survivors = honest(state, site)  # type: ignore[arg-type]
        return [s for s in survivors if s != SITES[2]] if site == SITES[0] else survivors

    monkeypatch.setattr(coordinator_sums, "_survivors", lying)
    fed = Federation(tmp_path, plan={**PLAN, "secure_dropout": 0.4})  # 2 inputs suffice
    roster = _roster(fed.tmp, SITES)
    agents = [_signed_agent(fed, s, roster) for s in SITES]
    for _ in range(4):  # advertise, share, input, confirm
        fed.step(agents)
    assert fed.status()["secure_sum"]["step"] == "reveal"  # type: ignore[index]
    fed.step(agents)  # each site is asked to reveal, and refuses
    reasons = [r["reason"] for r in fed.status()["refusals"]]  # type: ignore[index]
    assert len(reasons) == 3 and all(
        "signed this survivor list with their roster keys, fewer than the 3 a reveal "
        "needs" in r for r in reasons), reasons
    fed.advance(3601)
    fed.step(agents)
    status = fed.status()
    assert status["phase"] == "done" and "secure sum was given up" in str(status), status


@pytest.fixture(scope="module")
def confirmed_sum(tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[dict[str, SecureRounds], dict[str, str]]:
    """Sites a, b and c of a signed sum (noise over 2 of them) after their inputs, each
    having signed the list of all three; their signatures."""
    nodes, adverts = _sum(tmp_path_factory.mktemp("confirmed"))
    plan = SimulationConfig.create(**{**PLAN, "secure_dropout": 0.4})
    share = _secure_task("share", adverts=adverts, noise_multiplier=1.0)
    sealed = {s: n.share(share, s, plan).sealed for s, n in nodes.items()}
    for s, node in nodes.items():
        inbox = {peer: boxes[s] for peer, boxes in sealed.items() if s in boxes}
        node.input(_secure_task("input", inbox=inbox, noise_multiplier=1.0),
                   lambda multiplier: None, lambda: np.zeros(19))
    signatures = {s: n.confirm(_secure_task("confirm", survivors=SUM_SITES)).signature
                  for s, n in nodes.items()}
    return nodes, signatures


@settings(max_examples=60, deadline=None)
@given(survivors=st.sampled_from([SUM_SITES, ["a", "b"], ["a", "c"]]),
       signers=st.lists(st.sampled_from(SUM_SITES), unique=True),
       forged=st.sampled_from(["none", "flipped", "other list", "stranger", "garbage"]),
       at=st.integers(0, 63))
def test_a_node_reveals_only_for_the_list_it_signed_once_a_quorum_signed_it(
        confirmed_sum: tuple[dict[str, SecureRounds], dict[str, str]], survivors: list[str],
        signers: list[str], forged: str, at: int) -> None:
    """Whatever survivor list and signatures a coordinator relays, site a reveals only
    for the list it signed (all three), with valid roster signatures of that list from
    the quorum (all three of a 3-site sum); any other case is refused by name."""
    nodes, signatures = confirmed_sum
    node = copy.deepcopy(nodes["a"])  # revealing forgets the sum
    confirmations = {s: signatures[s] for s in signers}
    if forged == "flipped" and signers:
        confirmations[signers[0]] = _flip(confirmations[signers[0]], at)
    elif forged == "other list" and signers:  # a site's signature of another list
        other = wire.survivors_message(node._sums[("s1", 1, 0)].site.plan.context,  # type: ignore[union-attr]
                                       ["a", "b"])
        key = nodes[signers[0]].identity
        assert key is not None
        confirmations[signers[0]] = wire.to_b64(key.sign(other))
    elif forged == "stranger":
        confirmations["mallory"] = signatures["a"]
    elif forged == "garbage" and signers:
        confirmations[signers[0]] = "not base64!"
    valid = {s for s in signers if not (s == signers[0] and forged in (
        "flipped", "other list", "garbage"))}
    task = _secure_task("reveal", survivors=survivors, confirmations=confirmations)
    if survivors == SUM_SITES and valid == set(SUM_SITES):
        assert set(node.reveal(task).shares) == set(SUM_SITES)
    elif survivors != SUM_SITES:
        with pytest.raises(TaskRefused, match="reveals shares only for the survivor list "
                                              "it signed"):
            node.reveal(task)
    else:
        with pytest.raises(TaskRefused, match=re.escape(
                f"{len(valid)} of the sum's sites signed this survivor list with their "
                f"roster keys, fewer than the 3 a reveal needs")):
            node.reveal(task)


def test_a_node_signs_one_survivor_list_and_only_one_it_would_reveal_for(
        confirmed_sum: tuple[dict[str, SecureRounds], dict[str, str]]) -> None:
    nodes, _ = confirmed_sum
    node = copy.deepcopy(nodes["a"])
    with pytest.raises(TaskRefused, match="already signed another survivor list for this "
                                          "sum: it signs one"):
        node.confirm(_secure_task("confirm", survivors=["a", "b"]))
    fresh = copy.deepcopy(nodes["a"])
    fresh._sums[("s1", 1, 0)].confirmed = None
    with pytest.raises(TaskRefused, match="does not sign this survivor list: .*not listed "
                                          "as a survivor"):
        fresh.confirm(_secure_task("confirm", survivors=["b", "c"]))
    assert copy.deepcopy(nodes["a"]).confirm(_secure_task("confirm", survivors=SUM_SITES))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 3000), data=st.data())
def test_two_survivor_lists_reach_the_quorum_only_with_threshold_colluders(
        n: int, data: st.DataObject) -> None:
    """An honest site signs one list: two lists both signed by the quorum share at least
    2 * quorum - n signers, which is never fewer than the threshold; and the quorum is
    within the sites."""
    from cardiofed.secure import RingCodec, SumPlan

    k = data.draw(st.one_of(st.just(0), st.integers(1, n - 1)))
    plan = SumPlan(context=b"s", codec=RingCodec(bits=32, scale=1, bound=1),
                   sites=tuple(f"s{i}" for i in range(n)), length=1, neighbours=k)
    t = data.draw(st.integers(1, plan.neighbours + 1))
    plan = SumPlan(context=b"s", codec=plan.codec, sites=plan.sites, length=1,
                   neighbours=plan.neighbours, threshold=t)
    quorum = wire.confirm_quorum(plan)
    assert 2 * quorum - n >= plan.threshold and quorum <= n


def test_a_confirmation_that_is_not_an_ed25519_signature_is_refused_by_name(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=PLAN)
    roster = _roster(fed.tmp, SITES)
    agents = [_signed_agent(fed, s, roster) for s in SITES]
    for _ in range(3):  # advertise, share, input
        fed.step(agents)
    assert fed.status()["secure_sum"]["step"] == "confirm"  # type: ignore[index]
    answer = fed.client.post("/v1/studies/s1/rounds/0/secure/confirm", params={"attempt": 0},
                             json={"signature": base64.b64encode(bytes(10)).decode()},
                             headers=fed.auth(agents[0].credential()))
    assert answer.status_code == 422
    assert answer.json()["detail"] == (f"The signature {SITES[0]!r} confirmed the survivors "
                                       f"with is not 64 bytes (Ed25519).")


def test_too_few_signatures_of_the_survivor_list_give_the_sum_up_by_name(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "secure_dropout": 0.4})  # 2 inputs suffice
    roster = _roster(fed.tmp, SITES)
    agents = [_signed_agent(fed, s, roster) for s in SITES]
    for _ in range(3):  # advertise, share, input
        fed.step(agents)
    fed.step(agents[:2])  # the third site does not confirm
    fed.advance(3601)
    fed.step(agents[:2])
    status = fed.status()
    assert status["phase"] == "done"
    assert ("secure sum was given up: 2 sites signed the survivor list, fewer than the 3 "
            "a reveal needs") in str(status["round_outcome"]), status
