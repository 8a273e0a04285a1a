"""Asynchronous (buffered) vs synchronous FedAvg: time to a target AUC, final AUC, fairness.

Simulated (virtual clock, :mod:`cardiofed.simulation.clock` default speeds: tier-3
hospitals fast, tier-2 about 5x slower, community clinics 10-100x slower and offline
10 h a night), on the Framingham 8-hospital partition and the 12-site synthetic
federation. Synchronous FedAvg runs R rounds (every site, every round, so each round
lasts as long as its slowest site). Asynchronous aggregation runs with buffer size K,
polynomial staleness weights (a = 0.5) and max staleness 50, for R x N / K versions,
i.e. the same number of site updates. Target: 99% of the synchronous run's final
pooled-test AUC; time to target is the first evaluation at or above it. Means over seeds
(the seed also draws the clinics' speeds and offline hours).

Loopback: a real coordinator process and 4 synthetic-cohort nodes (in-process
``NodeAgent`` threads, as ``cardiofed node run`` does) with ``train_delay_s`` 0, 0.5, 2
and 4 s per update; synchronous vs asynchronous (K = 2) in wall-clock seconds, each
model version scored on the 4 sites' pooled test rows.

    python bench/async_vs_sync.py [--data-dir DIR] [--seeds 3] [--skip-loopback]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.data.catalog import load_dataset  # noqa: E402
from cardiofed.simulation.async_runner import run_async  # noqa: E402
from cardiofed.simulation.clock import default_speeds  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.prepare import prepare_federation  # noqa: E402
from cardiofed.simulation.runner import FederatedRun, run_federated  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "framingham": dict(rounds=30, local_epochs=1, batch_size=32, lr=0.05),
    "synthetic": dict(rounds=20, local_epochs=1, batch_size=32, lr=0.05),
}
# Synchronous and asynchronous runs compared on the same fixed budget of updates: no
# early stop on convergence (asynchronous versions never stop early).
for _settings in SETTINGS.values():
    _settings["stop_patience"] = None
BUFFER_SIZES = {"framingham": [2, 4], "synthetic": [2, 4, 6]}
STALENESS_VARIANTS = {"constant": dict(staleness="constant"),
                      "hinge (a=0.5, b=4)": dict(staleness="hinge")}
TARGET_FRACTION = 0.99
LOOPBACK_DELAYS = {"tier3_01": 0.0, "tier2_01": 0.5, "community_01": 2.0, "community_02": 4.0}
LOOPBACK_PLAN: dict[str, Any] = dict(local_epochs=1, batch_size=32, lr=0.05, seed=0,
                                     eval_every=0)
LOOPBACK_ROUNDS = 8
STUDY_LIMIT_S = 600.0


def time_to(history: list[dict[str, float]], target: float) -> float:
    return next((h["time_s"] for h in history if h["pooled_auc"] >= target), float("nan"))


def by_type(share: dict[str, float], types: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in share.items():
        out[types[name]] = out.get(types[name], 0.0) + value
    return out


def simulate(name: str, data_dir: str | None, seeds: list[int]) -> dict[str, Any]:
    data = load_dataset(name, seed=0, data_dir=data_dir)
    sites = prepare_federation(data)
    types = {s.name: s.site_type for s in sites}
    n, base = len(sites), SETTINGS[name]
    methods: dict[str, list[dict[str, Any]]] = {}

    def record(label: str, run: FederatedRun, target: float) -> None:
        methods.setdefault(label, []).append({
            "time_to_target_s": time_to(run.history, target),
            "final_auc": run.history[-1]["pooled_auc"], "end_s": run.sim_time_s,
            "versions": len(run.history), "rejected_stale": len(run.rejected),
            "update_share": run.update_share, "share_by_type": by_type(run.update_share, types)})

    for seed in seeds:
        speeds = default_speeds(types, seed)
        sync = run_federated(sites, SimulationConfig.create(**base, seed=seed), speeds=speeds)
        target = TARGET_FRACTION * sync.history[-1]["pooled_auc"]
        record("sync FedAvg", sync, target)
        for k in BUFFER_SIZES[name]:
            cfg = SimulationConfig.create(**{**base, "rounds": base["rounds"] * n // k},
                                          seed=seed, aggregation="async", buffer_size=k)
            record(f"async K={k}", run_async(sites, cfg, speeds=speeds), target)
        k = BUFFER_SIZES[name][-1]
        for label, variant in STALENESS_VARIANTS.items():
            cfg = SimulationConfig.create(**{**base, "rounds": base["rounds"] * n // k},
                                          seed=seed, aggregation="async", buffer_size=k,
                                          **variant)
            record(f"async K={k}, {label}", run_async(sites, cfg, speeds=speeds), target)
    summary = {}
    sync_runs = methods["sync FedAvg"]
    for label, runs in methods.items():
        speedups = [s["time_to_target_s"] / r["time_to_target_s"]
                    for s, r in zip(sync_runs, runs, strict=True)]
        summary[label] = {
            "time_to_target_h": float(np.mean([r["time_to_target_s"] for r in runs]) / 3600),
            "speedup_to_target": float(np.mean(speedups)),
            "speedup_to_target_min": float(np.min(speedups)),
            "final_auc": float(np.mean([r["final_auc"] for r in runs])),
            "auc_gap_vs_sync": float(np.mean([r["final_auc"] - s["final_auc"]
                                              for s, r in zip(sync_runs, runs, strict=True)])),
            "end_h": float(np.mean([r["end_s"] for r in runs]) / 3600),
            "rejected_stale": float(np.mean([r["rejected_stale"] for r in runs])),
            "update_share": {s: float(np.mean([r["update_share"][s] for r in runs]))
                             for s in types},
            "share_by_type": {t: float(np.mean([r["share_by_type"].get(t, 0.0) for r in runs]))
                              for t in sorted(set(types.values()))},
            "runs": runs,
        }
    return {"dataset": name, "n_sites": n, "settings": base, "seeds": seeds,
            "site_types": types, "methods": summary}


# ------------------------------------------------------------------ loopback

def loopback(workdir: Path, aggregation: str) -> dict[str, Any]:
    from network import Coordinator, run_nodes
    from sklearn.metrics import roc_auc_score

    from cardiofed.data.preprocessing import Preprocessor
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.models.networks import score
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig
    from cardiofed.wire import decode_arrays

    names = list(LOOPBACK_DELAYS)
    data = synthetic_federation(seed=0)
    n = len(names)
    plan = {**LOOPBACK_PLAN, "rounds": LOOPBACK_ROUNDS}
    if aggregation == "async":
        # The smallest buffer a networked study takes under its default robust rule
        # (2f + 1 sites, f = 1 of 4): a version built from fewer is the malicious ones'.
        plan.update(aggregation="async", buffer_size=3, rounds=LOOPBACK_ROUNDS * n // 3)
    coordinator = Coordinator(workdir, f"coordinator-{aggregation}")
    agents: list[NodeAgent] = []
    try:
        study = f"bench-{aggregation}"
        tokens = coordinator.create_study(study, names, plan)
        for name in names:
            agent = NodeAgent(NodeConfig.create(
                coordinator_url=coordinator.url, state_dir=str(workdir / study / name),
                enrolment_token=tokens[name], poll_wait_s=5.0, privacy="off",
                train_delay_s=LOOPBACK_DELAYS[name],
                data={"dataset": "synthetic", "site": name, "seed": 0}))
            agent._site = data.site(name)  # loaded once, as in bench/network.py
            agents.append(agent)
        try:
            run_nodes(agents, STUDY_LIMIT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{aggregation}: {exc} {coordinator.status(study)}") from None
        state = coordinator.status(study)
        rounds = coordinator.rounds(study)
        start = next(o for _, kind, o, _ in rounds if kind == "train")
        blob = coordinator.client.get(f"/v1/studies/{study}/preprocessor").content
        arrays, _ = decode_arrays(blob)
        pre = Preprocessor(fill=arrays["fill"], mean=arrays["mean"], std=arrays["std"])
        x = pre.transform(np.concatenate([data.site(s).x_test for s in names]))
        y = np.concatenate([data.site(s).y_test for s in names])
        versions = []
        for info in coordinator.client.get(f"/v1/studies/{study}/models").json()[1:]:
            weights, _ = decode_arrays(coordinator.client.get(
                f"/v1/studies/{study}/models/{info['version']}").content)
            created = datetime.fromisoformat(info["created_at"].rstrip("Z"))
            versions.append({"version": info["version"],
                             "time_s": (created - start).total_seconds(),
                             "pooled_auc": float(roc_auc_score(y, score("logistic", weights,
                                                                         x)))})
        return {"aggregation": aggregation, "plan": plan, "delays_s": LOOPBACK_DELAYS,
                "versions": versions, "training_wall_s": versions[-1]["time_s"],
                "final_auc": versions[-1]["pooled_auc"],
                "update_share": state["update_share"]}
    finally:
        for a in agents:
            a.client.close()
        coordinator.stop()


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="framingham,synthetic")
    parser.add_argument("--skip-loopback", action="store_true")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # the loopback run is tests/test_network_loopback.py's
        args.seeds, args.datasets, args.skip_loopback = 1, "synthetic", True
        SETTINGS["synthetic"]["rounds"] = 2
    seeds = list(range(args.seeds))
    results: dict[str, Any] = {"target_fraction": TARGET_FRACTION, "simulated": {}}
    md = ["# Asynchronous vs synchronous aggregation\n"]
    for name in args.datasets.split(","):
        started = time.perf_counter()
        res = simulate(name, args.data_dir, seeds)
        res["bench_s"] = time.perf_counter() - started
        results["simulated"][name] = res
        types = sorted(set(res["site_types"].values()))
        rows = [[label, m["time_to_target_h"], m["speedup_to_target"],
                 m["speedup_to_target_min"], m["final_auc"], m["auc_gap_vs_sync"], m["end_h"],
                 m["rejected_stale"], *[m["share_by_type"][t] for t in types]]
                for label, m in res["methods"].items()]
        md.append(f"## {name} ({res['n_sites']} sites, simulated time, mean of "
                  f"{len(seeds)} seeds)\n")
        md.append(markdown_table(
            ["method", "time to target (h)", "speed-up vs sync", "min speed-up", "final AUC",
             "AUC - sync", "run ends (h)", "stale refused",
             *[f"update share {t}" for t in types]], rows))
        md.append("\nUpdate share per site:\n")
        sites = list(res["site_types"])
        md.append(markdown_table(["method", *sites],
                                 [[label, *[m["update_share"][s] for s in sites]]
                                  for label, m in res["methods"].items()]))
    if not args.skip_loopback:
        with tempfile.TemporaryDirectory(prefix="cardiofed-async-") as tmp:
            runs = {agg: loopback(Path(tmp), agg) for agg in ("sync", "async")}
        target = TARGET_FRACTION * runs["sync"]["final_auc"]
        for run in runs.values():
            run["time_to_target_s"] = time_to(run["versions"], target)
        results["loopback"] = runs
        md.append("\n## Loopback: real coordinator, 4 nodes slowed by "
                  f"{', '.join(f'{s} {d:g} s' for s, d in LOOPBACK_DELAYS.items())} per update\n")
        md.append(markdown_table(
            ["aggregation", "versions", "time to target (s)", "training wall (s)", "final AUC",
             *[f"share {s}" for s in LOOPBACK_DELAYS]],
            [[agg, len(r["versions"]), r["time_to_target_s"], r["training_wall_s"],
              r["final_auc"], *[r["update_share"][s] for s in LOOPBACK_DELAYS]]
             for agg, r in runs.items()]))
    write_results("async_vs_sync", results, "\n".join(md))


if __name__ == "__main__":
    main()
