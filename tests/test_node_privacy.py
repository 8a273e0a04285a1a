"""A hospital node against a coordinator that sends whatever it likes: private by default,
refusals by name, nothing the coordinator names becomes a path."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_coordinator import (  # type: ignore[import-not-found]
    PLAN,
    SITES,
    Federation,
    _until_done,
)

from cardiofed.data.catalog import study_columns
from cardiofed.node.agent import NodeAgent, NodeError
from cardiofed.node.config import NodeConfig
from cardiofed.privacy.ledger_file import open_ledger_file
from cardiofed.wire import decode_arrays, encode_arrays

MIDPOINTS = np.array([(lo + hi) / 2 for lo, hi in study_columns("synthetic")[1]])


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def default_agent(fed: Federation, site: str) -> NodeAgent:
    """A node whose config says nothing about privacy."""
    return NodeAgent(NodeConfig.create(
        coordinator_url="http://testserver", state_dir=str(fed.tmp / site),
        enrolment_token=fed.tokens[site], poll_wait_s=0,
        data={"dataset": "synthetic", "site": site, "seed": 0}), client=fed.client)


def refusals(fed: Federation) -> list[str]:
    return [r["reason"] for r in fed.status()["refusals"]]  # type: ignore[index]


def test_a_node_is_private_unless_its_config_says_off(fed: Federation) -> None:
    agents = [default_agent(fed, s) for s in SITES]
    _until_done(fed, agents)

    for agent, site in zip(agents, SITES, strict=True):
        ledger = open_ledger_file(fed.tmp / f"{site}-privacy")  # the documented default
        assert [e["kind"] for e in ledger.entries] == [
            "statistics", "train", "train", "train", "train", "evaluate"]
        assert ledger.entries[-2]["what"] == "intercept step release"
        assert ledger.entries[-1]["epsilon_after"] <= 1.0 + 1e-9  # one study: at most 1
        stats, _ = decode_arrays((agent.state_dir / "outbox" / "s1-round0.bin").read_bytes())
        assert not np.array_equal(stats["count"], np.round(stats["count"]))  # noisy
    card = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()[-1]
    assert all("epsilon_spent" in card["metrics"][s] for s in SITES)


def test_a_non_private_node_refuses_small_batches_unless_it_opted_in(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**PLAN, "batch_size": 1})
    agents = [fed.agent(s) for s in SITES]  # privacy = "off"
    fed.step(agents)  # statistics
    fed.step(agents)  # round 1: refused by every site

    assert refusals(fed) == [
        "The plan's batch_size 1 is below 16: this site's exact updates would expose single "
        "records. It takes part only if its config opts in (opt_in = [\"small_batches\"])."
    ] * 3

    (tmp_path / "opted").mkdir()
    opted = Federation(tmp_path / "opted", plan={**PLAN, "batch_size": 1})
    _until_done(opted, [opted.agent(s, opt_in=["small_batches"]) for s in SITES])
    assert not refusals(opted)


def _served(agent: NodeAgent, path_part: str, payload: bytes) -> None:
    """Make the coordinator `agent` talks to answer GETs of `path_part` with `payload`."""
    real = agent._request

    def request(method: str, url: str, **kwargs: object) -> httpx.Response:
        if method == "GET" and path_part in url:
            return httpx.Response(200, content=payload)
        return real(method, url, **kwargs)

    agent._request = request  # type: ignore[method-assign]


@pytest.mark.parametrize(("what", "arrays", "reason"), [
    ("models", {"linear.weight": np.full((1, 8), np.nan, np.float32),
                "linear.bias": np.zeros(1, np.float32)},
     "The study's model is not a valid payload: Array 'linear.weight' contains non-finite"),
    ("models", {"linear.weight": np.full((1, 8), 1e30, np.float32),
                "linear.bias": np.zeros(1, np.float32)},
     "Weight 'linear.weight' must be finite and at most 1000 in absolute value."),
    ("models", {"linear.weight": np.zeros((1, 9), np.float32),
                "linear.bias": np.zeros(1, np.float32)},
     "Weight 'linear.weight' has shape (1, 9); the study's model expects (1, 8)."),
    ("preprocessor", {"fill": np.zeros(8), "mean": np.zeros(8), "std": np.ones(8)},
     "The preprocessor's fill value of column 0 (0.0) is not within the site's range"),
    ("preprocessor", {"fill": MIDPOINTS, "mean": MIDPOINTS, "std": np.full(8, -1.0)},
     "The preprocessor's means and scales must be finite, scales >= 0."),
    ("preprocessor", {"fill": np.zeros(3)}, "The study's preprocessor does not fit its plan"),
])
def test_a_coordinators_bad_numbers_are_refused_before_any_release(
        fed: Federation, what: str, arrays: dict[str, np.ndarray], reason: str) -> None:
    agents = [default_agent(fed, s) for s in SITES]
    fed.step(agents)  # statistics (charged)
    _served(agents[0], f"/{what}", encode_arrays(arrays, {}))

    fed.step(agents)  # round 1

    assert refusals(fed)[0].startswith(reason)
    ledger = open_ledger_file(fed.tmp / f"{SITES[0]}-privacy")
    assert [e["kind"] for e in ledger.entries] == ["statistics"]  # nothing else charged


def test_a_private_node_does_not_train_without_the_statistics_release(
        fed: Federation) -> None:
    # A coordinator that skips the statistics round would read the exact record count
    # off num_samples (and off the epsilon of DP-SGD's schedule): the node refuses.
    from cardiofed.exceptions import TaskRefused
    from cardiofed.protocol.schemas import TaskResponse

    agent = default_agent(fed, SITES[0])
    names, ranges = study_columns("synthetic")
    task = TaskResponse(study="s1", round=1, kind="train", model_version=0,
                        deadline=datetime.now(UTC), site_index=0, plan=PLAN,
                        feature_names=names, feature_ranges=[list(r) for r in ranges])

    with pytest.raises(TaskRefused, match=re.escape(
            "This site trains privately only after the study's statistics release: its noisy "
            "record count plans DP-SGD (the exact count never leaves the site).")):
        agent._compute(task)
    assert agent.ledger is not None and agent.ledger.entries == []


def test_a_name_the_coordinator_sends_never_becomes_a_path(fed: Federation) -> None:
    # The coordinator refuses such names; a malicious one sends one anyway in /v1/me.
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "s2", "plan": PLAN, "sites": ["../../outside/tier2_a"],
        "feature_names": study_columns("synthetic")[0],
        "feature_ranges": study_columns("synthetic")[1]})
    assert r.status_code == 422 and "sites[0]: String should match pattern" in r.text
    agent = default_agent(fed, SITES[0])
    agent._name = "../../outside/tier2_a"
    before = set(fed.tmp.parent.rglob("*"))

    with pytest.raises(NodeError, match="Manifest field 'site'"):  # the coordinator's check
        fed.step([agent, *[fed.agent(s) for s in SITES[1:]]])

    created = set(fed.tmp.parent.rglob("*")) - before
    assert created and all(p.is_relative_to(fed.tmp) for p in created)
    assert not any("outside" in p.name for p in created)
    assert len(open_ledger_file(fed.tmp / f"{SITES[0]}-privacy").entries) == 1


def test_a_non_private_site_is_marked_in_status_dashboard_and_card(fed: Federation) -> None:
    from fastapi.testclient import TestClient

    from cardiofed.serving import registry
    from cardiofed.store import session_factory

    agents = [default_agent(fed, s) for s in SITES[:2]] + [fed.agent(SITES[2])]  # off
    _until_done(fed, agents)

    assert fed.status()["non_private_sites"] == [SITES[2]]
    with session_factory(fed.settings.database_url)() as db:
        notes = registry.card(db, "s1-v4")["notes"]  # v3, stepped
    assert any(note.startswith(f"Not private: {SITES[2]} released exact") for note in notes)
    client = TestClient(fed.app)
    client.post("/ui/login", data={"credential": fed.admin}, follow_redirects=False)
    page = client.get("/ui/studies/s1").text
    row = page[page.index(f'<tr data-site="{SITES[2]}">'):]
    assert "not private: exact releases" in row[:row.index("</tr>")]
    private_row = page[page.index(f'<tr data-site="{SITES[0]}">'):]
    assert "differential privacy" in private_row[:private_row.index("</tr>")]


def test_the_ledger_command_shows_each_study_and_the_composed_total(fed: Federation) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    agents = [default_agent(fed, s) for s in SITES]
    _until_done(fed, agents)
    config = fed.tmp / "node.toml"
    config.write_text(f'coordinator_url = "http://testserver"\nstate_dir = "{SITES[0]}"\n'
                      f'[data]\ndataset = "synthetic"\nsite = "{SITES[0]}"\n')

    result = CliRunner().invoke(app, ["node", "ledger", "--config", str(config)],
                                env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    ledger = open_ledger_file(fed.tmp / f"{SITES[0]}-privacy")
    total = ledger.entries[-1]["epsilon_after"]
    assert f"epsilon {total:.3f} of 3; {3 - total:.3f} left" in result.output
    for kind in ("statistics", "train", "evaluate"):
        assert kind in result.output
    missing = CliRunner().invoke(app, ["node", "ledger", "--config", str(config.with_name(
        "other.toml"))])
    assert missing.exit_code != 0


def test_the_service_refuses_unsafe_names_whoever_calls_it(fed: Federation) -> None:
    from cardiofed.coordinator import administration
    from cardiofed.exceptions import InvalidUpdate
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.store import session_factory

    names, ranges = study_columns("synthetic")
    with session_factory(fed.settings.database_url)() as db, pytest.raises(InvalidUpdate) as err:
        administration.create_study(db, study_id="s2", plan=SimulationConfig.create(**PLAN),
                             sites=["tier3_01", "../../outside/tier2_a"],
                             feature_names=names, feature_ranges=ranges)
    assert str(err.value) == (
        "Study and site names must start with a letter or digit and have at most 64 "
        "letters, digits, '_', '.' or '-'; got ['../../outside/tier2_a'].")
