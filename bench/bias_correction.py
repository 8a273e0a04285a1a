"""Bias correction, side by side: per-site discrimination and calibration of each method.

Data: the UCI four hospitals (FLamby split), the Framingham eight-hospital partition and
the 12-site synthetic federation (one tier-2 site with 30% flipped labels). For each
method and useful combinations: per-site AUC, calibration slope and
calibration-in-the-large, worst-site AUC, spread across sites, pooled-test AUC, how many
sites are at least as good as their local-only model, and how many meet the default
acceptability criteria (AUC >= 0.70, slope in [0.8, 1.2], |CITL| <= 0.1).
Metrics are means over seeds. Recalibrated methods are scored with each site's own
logistic recalibration (fitted on the site's training rows); the others raw.

    python bench/bias_correction.py [--data-dir DIR] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.data.framingham import load_framingham  # noqa: E402
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.data.uci_heart import load_uci_heart  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import (  # noqa: E402
    FEDERATED,
    LOCAL,
    POOLED_TEST,
    RECALIBRATED,
    run_experiment,
)

BASE = {
    "uci-heart": dict(rounds=15, local_steps=100, batch_size=4, lr=0.01),
    "framingham": dict(rounds=30, local_epochs=1, batch_size=32, lr=0.05),
    "synthetic": dict(rounds=20, local_epochs=1, batch_size=32, lr=0.05),
}
for _settings in BASE.values():  # the methods compared on one fixed schedule
    _settings["stop_patience"] = None
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "FedProx": dict(algorithm="fedprox", proximal_mu=0.1),
    "SCAFFOLD": dict(algorithm="scaffold"),
    "type-balanced": dict(weighting="type-balanced"),
    "q-FFL (q=2)": dict(weighting="qffl", qffl_q=2.0),
    "agnostic (AFL)": dict(weighting="agnostic", afl_step=0.5),
    "covariate shift": dict(covariate_shift=True),
    "label quality": dict(label_quality=True),
    "FedAvg + recal": dict(recalibrate=True),
    "label quality + recal": dict(label_quality=True, recalibrate=True),
    "type-bal. + label q. + recal": dict(weighting="type-balanced", label_quality=True,
                                         recalibrate=True),
    "q-FFL + label q. + recal": dict(weighting="qffl", qffl_q=2.0, label_quality=True,
                                     recalibrate=True),
    "SCAFFOLD + label q.": dict(algorithm="scaffold", label_quality=True),
    "SCAFFOLD + type-bal. + label q.": dict(algorithm="scaffold", weighting="type-balanced",
                                            label_quality=True),
}
SMOKE_METHODS = ("FedAvg", "FedProx", "agnostic (AFL)", "covariate shift",
                 "q-FFL + label q. + recal", "SCAFFOLD + type-bal. + label q.")
CRITERIA = {"min_auc": 0.70, "slope": (0.8, 1.2), "max_abs_citl": 0.1}


def _acceptable(m: dict[str, float]) -> bool:
    lo, hi = CRITERIA["slope"]  # type: ignore[misc]
    return bool(m["auc"] >= CRITERIA["min_auc"] and lo <= m["calibration_slope"] <= hi
                and abs(m["calibration_intercept"]) <= CRITERIA["max_abs_citl"])


def evaluate(data: Any, base: dict[str, Any], method: dict[str, Any], seeds: list[int]
             ) -> dict[str, Any]:
    sites = [s.name for s in data.sites]
    label = RECALIBRATED if method.get("recalibrate") else FEDERATED
    per_seed = []
    for seed in seeds:
        cfg = SimulationConfig.create(**{**base, **method, "seed": seed, "eval_every": 0})
        r = run_experiment(data, cfg, baselines=True)
        flagged = ([n for n, f in zip(sites, r.label_quality.flags, strict=True) if f]
                   if r.label_quality else [])
        per_seed.append({
            "auc": [r.metrics[s][label]["auc"] for s in sites],
            "slope": [r.metrics[s][label]["calibration_slope"] for s in sites],
            "citl": [r.metrics[s][label]["calibration_intercept"] for s in sites],
            "local_auc": [r.metrics[s][LOCAL]["auc"] for s in sites],
            "acceptable": [_acceptable(r.metrics[s][label]) for s in sites],
            "pooled_auc": r.metrics[POOLED_TEST][label]["auc"],
            "flagged": flagged,
            "weight_share": r.federated.weight_share,
        })
    auc = np.nanmean([p["auc"] for p in per_seed], axis=0)
    local = np.nanmean([p["local_auc"] for p in per_seed], axis=0)
    slope = np.nanmean([p["slope"] for p in per_seed], axis=0)
    citl = np.nanmean([p["citl"] for p in per_seed], axis=0)
    acceptable = np.mean([p["acceptable"] for p in per_seed], axis=0)
    return {
        "auc": dict(zip(sites, auc.tolist(), strict=True)),
        "slope": dict(zip(sites, slope.tolist(), strict=True)),
        "citl": dict(zip(sites, citl.tolist(), strict=True)),
        "local_auc": dict(zip(sites, local.tolist(), strict=True)),
        "worst_site_auc": float(np.min(auc)), "spread": float(np.max(auc) - np.min(auc)),
        "pooled_auc": float(np.mean([p["pooled_auc"] for p in per_seed])),
        "sites_at_least_local": int((auc >= local).sum()),
        "slopes_in_range": int(((slope >= 0.8) & (slope <= 1.2)).sum()),
        "acceptable_sites": float(acceptable.sum()),
        "flagged": sorted({f for p in per_seed for f in p["flagged"]}),
        "weight_share": {s: float(np.mean([p["weight_share"][s] for p in per_seed]))
                         for s in sites},
        "n_sites": len(sites),
    }


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="uci-heart,framingham,synthetic")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one seed, two rounds, the shipped UCI data
        args.seeds, args.datasets = 1, "uci-heart"
        for settings in BASE.values():
            settings.update(rounds=2, local_steps=2)
        for name in list(METHODS):  # these six between them take every code path
            if name not in SMOKE_METHODS:
                del METHODS[name]
    seeds = list(range(args.seeds))
    loaders = {"uci-heart": lambda: load_uci_heart(args.data_dir),
               "framingham": lambda: load_framingham(args.data_dir, seed=0),
               "synthetic": lambda: synthetic_federation(seed=0)}
    payload: dict[str, Any] = {"seeds": seeds, "methods": METHODS, "base": BASE}
    md = ""
    for name in args.datasets.split(","):
        data = loaders[name]()
        results = {m: evaluate(data, BASE[name], settings, seeds)
                   for m, settings in METHODS.items()}
        fedavg = results["FedAvg"]
        for r in results.values():
            r["targets"] = {
                "worst_site_gain_vs_fedavg": r["worst_site_auc"] - fedavg["worst_site_auc"],
                "pooled_auc_drop_vs_fedavg": fedavg["pooled_auc"] - r["pooled_auc"],
            }
        payload[name] = results
        sites = [s.name for s in data.sites]
        rows = [[m, *[r["auc"][s] for s in sites], r["worst_site_auc"], r["spread"],
                 r["pooled_auc"], f"{r['sites_at_least_local']}/{r['n_sites']}",
                 f"{r['slopes_in_range']}/{r['n_sites']}",
                 f"{r['acceptable_sites']:.1f}/{r['n_sites']}",
                 ", ".join(r["flagged"]) or "–"] for m, r in results.items()]
        rows.append(["local-only", *[fedavg["local_auc"][s] for s in sites],
                     min(fedavg["local_auc"].values()), "", "", "", "", "", ""])
        md += (f"## {name}: AUC at each site (mean of {len(seeds)} seeds)\n\n"
               + markdown_table(["method", *sites, "worst", "spread", "pooled AUC",
                                 ">= local-only", "slope in [0.8,1.2]", "acceptable",
                                 "flagged"], rows)
               + "\nCalibration slope per site:\n\n"
               + markdown_table(["method", *sites],
                                [[m, *[r["slope"][s] for s in sites]]
                                 for m, r in results.items()]) + "\n")
    write_results("bias_correction", payload, md)


if __name__ == "__main__":
    main()
