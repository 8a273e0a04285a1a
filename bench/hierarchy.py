"""Hierarchical federation on loopback: sites -> regional coordinators -> national one.

Real ``cardiofed coordinator`` processes (SQLite): one national, ``--regions`` regional
ones; the synthetic cohort's 12 sites split across the regions in order. Every site is a
:class:`~cardiofed.node.agent.NodeAgent` of its region's relay study in a thread over
HTTP, exactly as ``cardiofed node run`` runs it; every region's relay study is made by
``cardiofed admin create-study --relay`` and every region's node is a
``cardiofed node run --config region.toml`` process. The same plan (logistic regression,
FedAvg, the plain weighted mean at every level) runs flat (12 sites on the national
coordinator) for comparison.

Measured: wall time; the uploads and bytes the national coordinator receives; for every
national model version, the largest difference from FedAvg over every site's own
update (each recomputed here from the previous national version with the site's data
and seed: the hierarchy must be FedAvg over every site); the final model's AUC on all
sites' test rows, flat and hierarchical (different site seeds, so not the same model).

    python bench/hierarchy.py [--rounds 5] [--regions 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402
from network import SETTINGS, Coordinator, run_nodes  # noqa: E402

# The plain weighted mean at every level (TOML has no null: a cap of 1 and a bound of
# 1e9 times the median norm leave every update as it is).
OUTCOME = "cvd_10y"  # the synthetic cohort's (what create-study --dataset synthetic sets)
MEAN = {"robust_rule": "mean", "robust_norm_bound": 1e9, "robust_max_weight_share": 1.0}


def _received(coordinator: Coordinator) -> tuple[int, int]:
    """Uploads the coordinator holds and their bytes (read-only from its database)."""
    con = sqlite3.connect(f"file:{coordinator.db}?mode=ro", uri=True, timeout=30)
    try:
        count, size = con.execute(
            "SELECT COUNT(*), SUM(LENGTH(payload)) FROM updates").fetchone()
    finally:
        con.close()
    return int(count), int(size or 0)


def _models(coordinator: Coordinator, study: str, rounds: int) -> list[dict[str, np.ndarray]]:
    from cardiofed.wire import decode_arrays

    return [decode_arrays(coordinator.client.get(f"/v1/studies/{study}/models/{v}").content)[0]
            for v in range(rounds + 1)]


def _site_agent(url: str, workdir: Path, name: str, token: str) -> Any:
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig

    return NodeAgent(NodeConfig.create(
        coordinator_url=url, state_dir=str(workdir / name), enrolment_token=token,
        poll_wait_s=30, retry_max_delay_s=1, privacy="off",
        data={"dataset": "synthetic", "site": name, "seed": 0}))


def flat(workdir: Path, plan: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    nation = Coordinator(workdir, "flat")
    try:
        tokens = nation.create_study("heart", sites, plan, outcome=OUTCOME)
        agents = [_site_agent(nation.url, workdir / "flat-nodes", s, tokens[s]) for s in sites]
        wall = run_nodes(agents, 600)
        uploads, size = _received(nation)
        models = _models(nation, "heart", plan["rounds"])
        preprocessor = nation.client.get("/v1/studies/heart/preprocessor").content
        errors = nation.server_errors()
    finally:
        nation.stop()
    return {"wall_s": wall, "national_uploads": uploads, "national_bytes": size,
            "models": models, "preprocessor": preprocessor, "coordinator_5xx": errors}


def _cli(*args: str) -> str:
    done = subprocess.run([shutil.which("cardiofed") or "cardiofed", *args],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cardiofed {' '.join(args[:2])}: {done.stderr[-2000:]}")
    return done.stdout


def hierarchy(workdir: Path, plan: dict[str, Any], regions: dict[str, list[str]]
              ) -> dict[str, Any]:
    """Each relay study made by ``cardiofed admin create-study --relay`` from the plan's
    TOML file, each region's node a ``cardiofed node run --config`` process."""
    coordinators: list[Coordinator] = []
    relays: list[subprocess.Popen[bytes]] = []
    plan_file = workdir / "plan.toml"
    plan_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in plan.items()))
    try:
        nation = Coordinator(workdir, "nation")
        coordinators.append(nation)
        tokens = nation.create_study("heart", list(regions), plan, outcome=OUTCOME)
        agents = []
        for name, sites in regions.items():
            region = Coordinator(workdir, name)
            coordinators.append(region)
            site_tokens = json.loads(_cli(
                "admin", "create-study", "--relay", "--study", name, "--dataset",
                "synthetic", "--config", str(plan_file), "--url", region.url,
                "--admin-key-file", str(region.key_file), "--json",
                *[arg for s in sites for arg in ("--site", s)]))
            agents += [_site_agent(region.url, workdir / name, s, site_tokens[s])
                       for s in sites]
            config = workdir / f"{name}-region.toml"
            config.write_text(
                f'coordinator_url = "{nation.url}"\nstate_dir = "{name}-node"\n'
                f'enrolment_token = "{tokens[name]}"\npoll_wait_s = 30\n'
                f'retry_max_delay_s = 1\n[region]\ncoordinator_url = "{region.url}"\n'
                f'study = "{name}"\nadmin_key_file = "{region.key_file}"\npoll_s = 0.2\n')
            relays.append(subprocess.Popen(
                [shutil.which("cardiofed") or "cardiofed", "node", "run", "--config",
                 str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        start = time.perf_counter()
        run_nodes(agents, 600)
        for p in relays:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a region's node exited with {p.returncode}")
        wall = time.perf_counter() - start
        uploads, size = _received(nation)
        regional = [_received(c) for c in coordinators[1:]]
        models = _models(nation, "heart", plan["rounds"])
        preprocessor = nation.client.get("/v1/studies/heart/preprocessor").content
        errors = sum(c.server_errors() for c in coordinators)
    finally:
        for p in relays:
            if p.poll() is None:
                p.kill()
        for c in coordinators:
            c.stop()
    return {"wall_s": wall, "national_uploads": uploads, "national_bytes": size,
            "regional_uploads": sum(u for u, _ in regional), "models": models,
            "preprocessor": preprocessor, "coordinator_5xx": errors}


def fedavg_gap(plan: dict[str, Any], regions: dict[str, list[str]], models: list[Any],
               preprocessor: bytes) -> float:
    """The largest |national version - (previous version + FedAvg of every site's own
    update)| over all versions and weights."""
    from cardiofed.data.catalog import study_columns
    from cardiofed.data.preprocessing import Preprocessor
    from cardiofed.node.config import DataSource
    from cardiofed.node.work import load_site_data, train_payload
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.wire import decode_arrays

    names, ranges = study_columns("synthetic")
    config = SimulationConfig.create(**plan)
    pre = Preprocessor.from_arrays(decode_arrays(preprocessor)[0], config.model_form(names))
    gap = 0.0
    for version in range(1, len(models)):
        deltas, sizes = [], []
        for sites in regions.values():
            for index, name in enumerate(sites):
                site = load_site_data(DataSource(dataset="synthetic", site=name), names)
                arrays, manifest = decode_arrays(train_payload(
                    site, pre, config, models[version - 1], round_number=version,
                    site_index=index, manifest={"site": name}, privacy=None,
                    ranges=ranges))
                deltas.append(arrays)
                sizes.append(int(manifest["num_samples"]))
        share = np.array(sizes, dtype=np.float64) / sum(sizes)
        for key, start in models[version - 1].items():
            expected = start + sum(w * d[key] for w, d in zip(share, deltas, strict=True))
            gap = max(gap, float(np.max(np.abs(models[version][key] - expected))))
    return gap


def pooled_auc(plan: dict[str, Any], weights: Any, preprocessor: bytes,
               sites: list[str]) -> float:
    from sklearn.metrics import roc_auc_score

    from cardiofed.data.catalog import study_columns
    from cardiofed.data.preprocessing import Preprocessor
    from cardiofed.models.networks import score
    from cardiofed.node.config import DataSource
    from cardiofed.node.work import load_site_data
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.wire import decode_arrays

    names, ranges = study_columns("synthetic")
    config = SimulationConfig.create(**plan)
    pre = Preprocessor.from_arrays(decode_arrays(preprocessor)[0], config.model_form(names))
    data = [load_site_data(DataSource(dataset="synthetic", site=s), names) for s in sites]
    y = np.concatenate([d.y_test for d in data])
    p = np.concatenate([score(config.model, weights, pre.transform(d.x_test)) for d in data])
    return float(roc_auc_score(y, p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--regions", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.regions = 1, 1
    from cardiofed.data.synthetic import synthetic_federation

    sites = [s.name for s in synthetic_federation(seed=0).sites][:3 if args.smoke else None]
    chunks = np.array_split(np.arange(len(sites)), args.regions)
    regions = {f"region{i + 1}": [sites[j] for j in chunk] for i, chunk in enumerate(chunks)}
    plan = {**SETTINGS, **MEAN, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "flat").mkdir()
        (Path(tmp) / "tree").mkdir()
        f = flat(Path(tmp) / "flat", plan, sites)
        h = hierarchy(Path(tmp) / "tree", plan, regions)
    gap = fedavg_gap(plan, regions, h["models"], h["preprocessor"])
    h["pooled_test_auc"] = pooled_auc(plan, h["models"][-1], h["preprocessor"], sites)
    f["pooled_test_auc"] = pooled_auc(plan, f["models"][-1], f["preprocessor"], sites)
    rows = [[label, r["wall_s"], r["national_uploads"], r["national_bytes"],
             r.get("regional_uploads", 0), r["pooled_test_auc"], r["coordinator_5xx"]]
            for label, r in (("flat: 12 sites on the national coordinator", f),
                             (f"hierarchy: {args.regions} regions x their sites", h))]
    table = markdown_table(["federation", "wall s", "uploads at the national coordinator",
                            "bytes there", "uploads at regional coordinators",
                            "pooled test AUC", "5xx"], rows)
    table += (f"\n\nLargest |national version - FedAvg over every site's own update|, "
              f"{args.rounds} versions: {gap:.2e}.\n")
    results = {"rounds": args.rounds, "regions": regions, "max_abs_gap_to_fedavg": gap,
               **{f"{label}_{k}": v for label, r in (("flat", f), ("hierarchy", h))
                  for k, v in r.items() if k not in ("models", "preprocessor")}}
    write_results("hierarchy", results, table)
    print(table)


if __name__ == "__main__":
    main()
