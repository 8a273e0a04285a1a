"""Hierarchical federation in-process: sites -> regional coordinators -> national one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    Preprocessor,
    SiteStatistics,
    bin_edges,
    merge_statistics,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.node.agent import NodeAgent
from cardiofed.node.config import DataSource, NodeConfig
from cardiofed.node.work import (
    intercept_payload,
    load_site_data,
    statistics_payload,
    train_payload,
)
from cardiofed.protocol.relay import metrics_result, plan_differences
from cardiofed.simulation.config import SimulationConfig
from cardiofed.wire import decode_arrays, encode_arrays
from tests.test_coordinator import PLAN, Federation

# The plain weighted mean at both levels: the national model is FedAvg over every site.
MEAN = {**PLAN, "rounds": 2, "robust_rule": "mean", "robust_norm_bound": None,
        "robust_max_weight_share": None}
REGIONS = {"east": ["tier3_01", "community_01", "community_02"],
           "west": ["tier2_01", "tier2_02"]}


class Hierarchy:
    """A national coordinator whose sites are regions, each a coordinator of its own."""

    def __init__(self, tmp: Path, plan: dict[str, object] = MEAN,
                 regional: dict[str, object] | None = None,
                 regional_study: dict[str, object] | None = None) -> None:
        for name in ("nation", *REGIONS):
            (tmp / name).mkdir()
        self.nation = Federation(tmp / "nation", plan=plan, study={"sites": list(REGIONS)})
        self.regions = {name: Federation(tmp / name, plan=regional or plan,
                                         study={"sites": sites, "relay": True,
                                                **(regional_study or {})})
                        for name, sites in REGIONS.items()}
        self.relays = []
        for name, region in self.regions.items():
            key = tmp / f"{name}-admin.key"
            key.write_text(region.admin)
            config = NodeConfig.create(
                coordinator_url="http://testserver", state_dir=str(tmp / f"{name}-node"),
                enrolment_token=self.nation.tokens[name], poll_wait_s=0,
                region={"coordinator_url": "http://testserver", "study": "s1",
                        "admin_key_file": str(key)})
            self.relays.append(NodeAgent(config, client=self.nation.client,
                                         region_client=region.client))
        self.sites = {name: [region.agent(s) for s in REGIONS[name]]
                      for name, region in self.regions.items()}

    def run(self, steps: int = 200) -> None:
        for _ in range(steps):
            if self.nation.status()["phase"] == "done":
                return
            self.nation.step(self.relays)
            for name, region in self.regions.items():
                region.step(self.sites[name])
        raise AssertionError(f"the national study did not finish: {self.nation.status()}")

    def national_model(self, version: int) -> dict[str, np.ndarray]:
        blob = self.nation.client.get(f"/v1/studies/s1/models/{version}",
                                      headers=self.nation.auth(self.nation.admin)).content
        return decode_arrays(blob)[0]


def _site(name: str, feature_names: list[str]):  # type: ignore[no-untyped-def]
    return load_site_data(DataSource(dataset="synthetic", site=name, seed=0), feature_names)


def test_a_hierarchy_equals_fedavg_over_every_site(tmp_path: Path) -> None:
    h = Hierarchy(tmp_path)
    h.run()
    status = h.nation.status()
    assert status["phase"] == "done" and status["refusals"] == []
    not_relay = h.nation.client.get("/v1/studies/s1/relay",
                                    headers=h.nation.auth(h.nation.admin))
    assert not_relay.status_code == 409 and "not a relay study" in not_relay.json()["detail"]
    study = h.nation.client.get("/v1/studies/s1/models",
                                headers=h.nation.auth(h.nation.admin)).json()
    assert [m["participants"] for m in study[1:]] == [["east", "west"]] * MEAN["rounds"]

    # The national preprocessor is the flat merge of every site's statistics.
    task_plan = SimulationConfig.model_validate(_stored_plan(h))
    feature_names, ranges = _columns(h)
    sites = {s: _site(s, feature_names) for region in REGIONS.values() for s in region}
    stats = [SiteStatistics(**decode_arrays(statistics_payload(site, ranges, {}))[0])
             for site in sites.values()]
    flat = merge_statistics(stats, bin_edges(ranges, DEFAULT_BINS), feature_names,
                            task_plan.model_form(feature_names))
    blob = h.nation.client.get("/v1/studies/s1/preprocessor",
                               headers=h.nation.auth(h.nation.admin)).content
    pre = Preprocessor.from_arrays(decode_arrays(blob)[0], task_plan.model_form(feature_names))
    for key, value in flat.to_arrays().items():
        np.testing.assert_allclose(pre.to_arrays()[key], value, rtol=1e-9, atol=1e-12)

    # Each national version: the previous one plus the sample-weighted mean of every
    # site's update (each site trains with its seed in its region, as its node did).
    for version in range(1, MEAN["rounds"] + 1):
        start = h.national_model(version - 1)
        deltas, sizes = [], []
        for region in REGIONS.values():
            for index, name in enumerate(region):
                payload = train_payload(sites[name], pre, task_plan, start,
                                        round_number=version, site_index=index,
                                        manifest={"site": name}, privacy=None,
                                        ranges=ranges)
                arrays, manifest = decode_arrays(payload)
                deltas.append(arrays)
                sizes.append(int(manifest["num_samples"]))
        share = np.array(sizes) / sum(sizes)
        got = h.national_model(version)
        for key in start:
            expected = start[key] + sum(w * d[key].astype(np.float64)
                                        for w, d in zip(share, deltas, strict=True))
            np.testing.assert_allclose(got[key], expected, atol=2e-6)

    # The national model card holds one evaluation summary per region.
    card = h.nation.client.get("/v1/studies/s1/models",
                               headers=h.nation.auth(h.nation.admin)).json()[-1]["metrics"]
    assert set(card) == {"east", "west"}
    assert card["east"]["sites"] == 3 and card["west"]["sites"] == 2
    assert card["east"]["n"] == sum(sites[s].n_test for s in REGIONS["east"])
    # ...and each region's coordinator every site's own.
    regional = h.regions["west"].client.get(
        "/v1/studies/s1/models", headers=h.regions["west"].auth(h.regions["west"].admin)
    ).json()[-1]["metrics"]
    assert set(regional) == set(REGIONS["west"])
    assert h.regions["east"].status()["phase"] == "done"


def test_a_hierarchy_steps_the_intercept_from_each_regions_summed_sums(
        tmp_path: Path) -> None:
    # The national study sees no site's privacy mode; its plan asks for the step. Each
    # region sends its sites' summed sums, and the national step over the two regions is
    # the pooled Newton step over every site (two regions: neither can be left out).
    plan = {**MEAN, "dp_intercept_step": True}
    h = Hierarchy(tmp_path, plan=plan)
    h.run()
    assert h.nation.status()["intercept_step"]["kept"] == ["east", "west"]

    task_plan = SimulationConfig.model_validate(_stored_plan(h))
    feature_names, ranges = _columns(h)
    blob = h.nation.client.get("/v1/studies/s1/preprocessor",
                               headers=h.nation.auth(h.nation.admin)).content
    pre = Preprocessor.from_arrays(decode_arrays(blob)[0], task_plan.model_form(feature_names))
    trained = h.national_model(MEAN["rounds"])
    sums = np.zeros(2)
    for name in (s for region in REGIONS.values() for s in region):
        payload = intercept_payload(_site(name, feature_names), pre, task_plan, trained,
                                    None, manifest={}, ranges=ranges)
        sums += decode_arrays(payload)[0]["sums"]
    stepped = h.national_model(MEAN["rounds"] + 1)
    np.testing.assert_allclose(stepped["linear.bias"] - trained["linear.bias"],
                               sums[0] / sums[1], atol=1e-5)
    np.testing.assert_array_equal(stepped["linear.weight"], trained["linear.weight"])


def _stored_plan(h: Hierarchy) -> dict[str, object]:
    return h.regions["east"].client.get("/v1/studies/s1/relay", headers=h.regions["east"].auth(
        h.regions["east"].admin)).json()["plan"]


def _columns(h: Hierarchy) -> tuple[list[str], list[tuple[float, float]]]:
    info = h.regions["east"].client.get("/v1/studies/s1/relay", headers=h.regions[
        "east"].auth(h.regions["east"].admin)).json()
    return info["feature_names"], [(lo, hi) for lo, hi in info["feature_ranges"]]


def test_a_region_refuses_a_national_task_of_another_plan(tmp_path: Path) -> None:
    h = Hierarchy(tmp_path, regional={**MEAN, "lr": 0.5})
    h.nation.step(h.relays)
    refusals = h.nation.status()["refusals"]
    assert {r["site"] for r in refusals} == {"east", "west"}
    assert all("lr differ" in r["reason"] for r in refusals)


def test_a_region_refuses_a_national_task_for_another_outcome(tmp_path: Path) -> None:
    h = Hierarchy(tmp_path, regional_study={"outcome": "chd_10y"})
    h.nation.step(h.relays)
    reasons = [r["reason"] for r in h.nation.status()["refusals"]]
    assert len(reasons) == 2
    assert all("has other feature columns, ranges or outcome than the national study" in r
               for r in reasons)


def test_the_relay_endpoints_refuse_what_does_not_fit(tmp_path: Path) -> None:
    region = Federation(tmp_path, plan=MEAN, study={"sites": ["tier3_01"], "relay": True})
    admin = region.auth(region.admin)
    c = region.client
    assert c.post("/v1/studies/s1/relay/rounds", headers=admin, json={
        "number": 1, "kind": "train", "model_version": 0}).json()["detail"].endswith(
        "relay the national one first.")
    bad = c.put("/v1/studies/s1/relay/models/0", headers=admin,
                content=encode_arrays({"w": np.zeros(3, np.float32)}))
    assert bad.status_code == 422 and "tensors" in bad.json()["detail"]
    garbage = c.put("/v1/studies/s1/relay/models/0", headers=admin, content=b"not safetensors")
    assert garbage.status_code == 422
    assert garbage.json()["detail"].startswith("Model version 0 is not a model")
    kind = c.post("/v1/studies/s1/relay/rounds", headers=admin, json={
        "number": 1, "kind": "statistics", "model_version": 0})
    assert kind.status_code == 422 and kind.json()["errors"][0]["field"] == "kind"
    assert c.get("/v1/studies/s1/relay/rounds/0").status_code == 401  # admin only
    assert c.get("/v1/studies/s1/relay/rounds/0", headers=admin).status_code == 204
    made = c.post("/v1/studies", headers=admin, json={
        "id": "r2", "plan": {**MEAN, "aggregation": "async", "buffer_size": 1},
        "sites": ["a"], "relay": True, "feature_names": ["age"],
        "feature_ranges": [[18.0, 100.0]]})
    assert made.status_code == 422 and "'sync'" in made.json()["detail"]


def test_a_region_node_config_names_its_role(tmp_path: Path) -> None:
    region = {"coordinator_url": "http://r", "study": "s", "admin_key_file": "k"}
    data = {"dataset": "synthetic", "site": "tier3_01"}
    base = {"coordinator_url": "http://n", "state_dir": str(tmp_path)}
    with pytest.raises(ConfigurationError, match="not both or neither"):
        NodeConfig.create(**base, data=data, region=region)
    with pytest.raises(ConfigurationError, match="not both or neither"):
        NodeConfig.create(**base)
    with pytest.raises(ConfigurationError, match=r"\[privacy\] belongs"):
        NodeConfig.create(**base, region=region, privacy={"epsilon_max": 1.0,
                                                          "ledger_dir": str(tmp_path)})
    with pytest.raises(ConfigurationError, match="admin_key_file"):
        NodeAgent(NodeConfig.create(**base, region=region))


def test_a_region_reports_the_sample_weighted_mean_of_its_sites_metrics() -> None:
    import json

    summary = json.loads(metrics_result({
        "a": {"n": 100, "auc": 0.8, "auc_ci_low": 0.7, "epsilon_spent": 1.0},
        "b": {"n": 300, "auc": 0.6, "epsilon_spent": 2.0}, "c": {}}))
    assert summary == {"n": 400.0, "sites": 2.0, "auc": pytest.approx(0.65),
                       "epsilon_spent": 2.0}
    assert plan_differences({"lr": 1, "robust_rule": "median"},
                            {"lr": 1, "robust_rule": "mean"}) == []


def test_a_region_node_config_reads_from_toml(tmp_path: Path) -> None:
    (tmp_path / "region.toml").write_text(
        'coordinator_url = "https://nation:8443"\nstate_dir = "state"\n'
        '[region]\ncoordinator_url = "https://east:8443"\nstudy = "east"\n'
        'admin_key_file = "east-admin.key"\n')
    config = NodeConfig.from_toml(tmp_path / "region.toml")
    assert config.data is None and config.region is not None
    assert config.region.admin_key_file == tmp_path / "east-admin.key"
    from typer.testing import CliRunner

    from cardiofed.cli import app

    audit = CliRunner().invoke(app, ["node", "audit", "--config", str(tmp_path / "region.toml"),
                                     "--scan-rows"])
    assert audit.exit_code == 2
    assert "this node relays a region and holds no rows" in audit.output


def test_the_relay_endpoints_name_each_conflict(tmp_path: Path) -> None:
    """Preprocessor and models are set once; rounds only move forward; a superseded
    round has no aggregate."""
    from cardiofed.coordinator import models

    region = Federation(tmp_path, plan=MEAN, study={"sites": ["tier3_01"], "relay": True})
    admin, c = region.auth(region.admin), region.client
    info = c.get("/v1/studies/s1/relay", headers=admin).json()
    names, ranges = info["feature_names"], [(lo, hi) for lo, hi in info["feature_ranges"]]
    plan = SimulationConfig.model_validate(info["plan"])

    def preprocessor(site: str) -> bytes:
        stats = SiteStatistics(**decode_arrays(statistics_payload(
            _site(site, names), ranges, {}))[0])
        return encode_arrays(merge_statistics([stats], bin_edges(ranges, DEFAULT_BINS), names,
                                              plan.model_form(names)).to_arrays())

    def detail(r) -> str:  # type: ignore[no-untyped-def]
        return str(r.json()["detail"])

    bad = c.put("/v1/studies/s1/relay/preprocessor", headers=admin, content=b"nonsense")
    assert bad.status_code == 422 and "not one of this study's columns" in detail(bad)
    pre = preprocessor("tier3_01")
    for _ in range(2):  # a repeat is acknowledged
        assert c.put("/v1/studies/s1/relay/preprocessor", headers=admin,
                     content=pre).status_code == 204
    other = c.put("/v1/studies/s1/relay/preprocessor", headers=admin,
                  content=preprocessor("tier2_01"))
    assert other.status_code == 409 and "already holds a different preprocessor" in detail(other)

    weights = models.initial_weights(plan, names)
    for _ in range(2):
        assert c.put("/v1/studies/s1/relay/models/0", headers=admin,
                     content=encode_arrays(weights)).status_code == 204
    moved = {k: v + 1 for k, v in weights.items()}
    clash = c.put("/v1/studies/s1/relay/models/0", headers=admin, content=encode_arrays(moved))
    assert clash.status_code == 409 and "already holds a different model version 0" in detail(
        clash)

    def open_round(number: int, kind: str = "train", version: int = 0):  # type: ignore[no-untyped-def]
        return c.post("/v1/studies/s1/relay/rounds", headers=admin,
                      json={"number": number, "kind": kind, "model_version": version})

    missing = open_round(1, version=1)
    assert missing.status_code == 409 and "has no model version 1" in detail(missing)
    assert open_round(1).status_code == 204 and open_round(1).status_code == 204
    other_kind = open_round(1, "evaluate")
    assert other_kind.status_code == 409 and "is open to train from model version 0, not to " \
        "evaluate from 0" in detail(other_kind)
    assert open_round(3).status_code == 204  # round 1 is superseded
    behind = open_round(2)
    assert behind.status_code == 409 and "relayed rounds only move forward" in detail(behind)
    gone = c.get("/v1/studies/s1/relay/rounds/1", headers=admin)
    assert gone.status_code == 409 and "closed without an aggregate (superseded" in detail(gone)
