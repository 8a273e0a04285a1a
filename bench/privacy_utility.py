"""Privacy-utility curve: everything a site releases, charged to one ledger per site.

For epsilon in {0.5, 1, 2, 4, 8} and no DP, delta = 1e-5 at every site. Each site
releases its preprocessing statistics (Gaussian noise on histograms and its record
count), trains with DP-SGD (noise calibrated for the whole planned schedule, planned on
the noisy record count; each record's weight gradient clipped to 2 and its output-bias
gradient to 1 on its own; RDP accountant), releases its intercept sums on the trained
model (the intercept step, 1/16 of the training share; the non-private rows take no
step) and its evaluation of the final model (noisy score histograms), all composed on
its ledger with the default split of the budget (statistics 10%, training 80%,
evaluation 10%, as cumulative targets). Noise is secret (the OS CSPRNG), so DP rows vary
from run to run beyond the seeds.

Per site: AUC, calibration slope and calibration-in-the-large with their 95% intervals,
and the acceptability verdict (AUC >= 0.7, slope in [0.8, 1.2], |CITL| <= 0.1, each
judged on its interval: ok, "?" insufficient evidence, no). The figures are the
simulation's exact view of each site's test patients.

* ``demo``: ``cardiofed demo --dp-epsilon E`` (12 synthetic hospitals, each judged on
  20,000 new patients of its own profile, so that intervals can judge it; FedAvg, 40
  rounds of one local epoch, batch 128, lr 0.3, the released model the mean of the last
  20 rounds', raw form; tier2_04 has noisy labels);
  one run per epsilon, seed 0, and at epsilon 1 DEMO_REPEATS more (fresh noise each)
  whose verdict counts follow the table, with how many of those runs left a clean site
  "not acceptable"; then as many epsilon-1 runs over secure sums (``cardiofed demo
  --secure-aggregation``'s recipe, issue 32's target: no clean site "not acceptable").
* ``uci-heart``: FedAvg, 15 rounds x 100 local steps, batch 4, SGD lr 0.01, seeds 42-44.
* ``framingham``: FedAvg, 40 rounds x 1 epoch, batch 512, SGD lr 0.25, the released model
  the mean of the last 20 rounds' (tail averaging, free post-processing), seeds 0-2; the
  pooled test split's AUC, slope and CITL (means over seeds).

Targets (issue 28): demo at epsilon 1: no site but the noisy-label one "not acceptable"
in calibration, AUC >= 97% of the achievable (true-risk) AUC at every clean site;
Framingham at epsilon 1: pooled-test AUC within 0.01 of the non-private model and
calibration slope in [0.8, 1.2].

    python bench/privacy_utility.py [--data-dir DIR] [--only demo|uci-heart|framingham]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, results_dir, single_threaded, write_results  # noqa: E402

from cardiofed.cli.experiments import DP_DEMO_SETTINGS, SECURE_DEMO_SETTINGS  # noqa: E402
from cardiofed.data.catalog import load_dataset  # noqa: E402
from cardiofed.experiments.acceptability import (  # noqa: E402
    Verdict,
    acceptability_from_experiment,
    assess,
    combined,
)
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import FEDERATED, run_experiment  # noqa: E402

EPSILONS: tuple[float | None, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, None)
DELTA = 1e-5
NOISY_LABELS = "tier2_04"
RESULTS_FILE = results_dir() / "privacy_utility.json"
SHORT = {Verdict.ACCEPTABLE: "ok", Verdict.INSUFFICIENT: "?", Verdict.NOT_ACCEPTABLE: "no"}
SETUPS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    # Every row on its DP schedule: the non-private reference too runs every round.
    "demo": (dict(algorithm="fedavg", stop_patience=None, **DP_DEMO_SETTINGS), (0,)),
    "uci-heart": (dict(algorithm="fedavg", rounds=15, local_steps=100, batch_size=4, lr=0.01,
                       standardisation="global", stop_patience=None), (42, 43, 44)),
    # Large batches suit DP-SGD (more signal per noisy step, fewer steps to account). lr
    # and the tail average chosen at epsilon 1 on another partition of the hospitals
    # (seed 1), never the reported one, 8 runs each: lr 0.5 left the pooled calibration
    # slope at 0.73 (mean; 1.0: 0.51), lr 0.25 at 0.89, and the mean of its last 20 rounds'
    # models at 0.97 (pooled AUC 0.684 against 0.686 at lr 0.5).
    "framingham": (dict(algorithm="fedavg", rounds=40, local_epochs=1, batch_size=512,
                        lr=0.25, average_last=20, standardisation="global",
                        stop_patience=None), (0, 1, 2)),
}


DEMO_DATA: dict[str, int] = {"n_sites": 12, "eval_size": 20_000}
DEMO_REPEATS = 15  # more epsilon-1 runs of the demo, to show the noise's run-to-run spread


def _dataset(name: str, data_dir: str | None, seed: int) -> Any:
    if name == "demo":
        return load_dataset("synthetic", seed=seed, **DEMO_DATA)
    return load_dataset(name, seed=0, data_dir=data_dir)


def _run(name: str, eps: float | None, seed: int, data_dir: str | None,
         **overrides: Any) -> dict[str, Any]:
    settings = {**SETUPS[name][0], **overrides}
    data = _dataset(name, data_dir, seed)
    dp = {} if eps is None else {"dp_epsilon": eps, "dp_delta": DELTA}
    config = SimulationConfig.create(**settings, **dp, seed=seed, eval_every=0)
    start = time.perf_counter()
    result = run_experiment(data, config, baselines=False)
    seconds = time.perf_counter() - start
    report = acceptability_from_experiment(result, model=FEDERATED)
    sites = {}
    for site, a in report.sites.items():
        auc, slope, citl = a.checks
        sites[site] = {"auc": auc.value, "auc_ci": list(auc.interval),
                       "slope": slope.value, "slope_ci": list(slope.interval),
                       "citl": citl.value, "citl_ci": list(citl.interval),
                       "verdict": str(a.verdict), "auc_verdict": str(auc.verdict),
                       "calibration_verdict": str(combined((slope, citl))),
                       "share_of_achievable_auc": report.share_of_achievable(site)}
    y, p = (np.concatenate(parts) for parts in zip(
        *(by_model[FEDERATED] for by_model in result.predictions.values()), strict=True))
    pa = assess(y, p)
    pooled_checks = {"auc": pa.checks[0].value, "slope": pa.checks[1].value,
                     "citl": pa.checks[2].value}
    spent = {s: p["epsilon_spent"] for s, p in result.privacy.items()}
    return {"sites": sites, "pooled": pooled_checks, "epsilon_spent": spent,
            "seconds": seconds}


def _calibration_failures(run: dict[str, Any]) -> int:
    """How many clean sites (all but the noisy-label one) a run left "not acceptable" in
    calibration."""
    return sum(v["calibration_verdict"] == "not acceptable"
               for site, v in run["sites"].items() if site != NOISY_LABELS)


def _verdict_cell(site: dict[str, Any]) -> str:
    return (f"{site['auc']:.3f} / {site['slope']:.2f} / {site['citl']:+.2f} "
            f"{SHORT[Verdict(site['verdict'])]}")


def _summary(name: str, runs: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """The setup's Markdown section and its figures."""
    labels = list(runs)
    first = runs[labels[0]][0]
    sites = list(first["sites"])
    rows, figures = [], {}
    for label in labels:
        seeds = runs[label]
        mean = {s: {k: float(np.mean([r["sites"][s][k] for r in seeds]))
                    for k in ("auc", "slope", "citl")} for s in sites}
        clean = [s for s in sites if s != NOISY_LABELS]
        calib_no = sum(_calibration_failures(r) for r in seeds) / len(seeds)
        shares = [r["sites"][s]["share_of_achievable_auc"] for r in seeds for s in clean]
        shares = [v for v in shares if np.isfinite(v)]
        pooled = [r["pooled"] for r in seeds if r["pooled"] is not None]
        fig = {"per_site_mean": mean,
               "clean_sites_calibration_not_acceptable": calib_no,
               "min_share_of_achievable_auc": min(shares) if shares else None,
               "pooled_test": {k: float(np.mean([p[k] for p in pooled]))
                               for k in ("auc", "slope", "citl")} if pooled else None,
               "max_epsilon_spent": max((max(r["epsilon_spent"].values())
                                         for r in seeds if r["epsilon_spent"]),
                                        default=None),
               "seconds_per_run": float(np.mean([r["seconds"] for r in seeds]))}
        figures[label] = fig
        if len(seeds) == 1:
            cells = [_verdict_cell(seeds[0]["sites"][s]) for s in sites]
        else:
            cells = [f"{mean[s]['auc']:.3f} / {mean[s]['slope']:.2f} / "
                     f"{mean[s]['citl']:+.2f}" for s in sites]
        p = fig["pooled_test"]
        rows.append([label, *cells,
                     f"{p['auc']:.3f} / {p['slope']:.2f} / {p['citl']:+.2f}" if p else "–",
                     f"{fig['max_epsilon_spent']:.3f}" if fig["max_epsilon_spent"] else "–",
                     f"{fig['seconds_per_run']:.0f}"])
    header = ["epsilon", *sites, "pooled test", "max epsilon spent", "s per run"]
    md = (f"## {name}: AUC / calibration slope / CITL per site"
          + (" with the verdict" if len(runs[labels[0]]) == 1 else
             f" (means over {len(runs[labels[0]])} seeds)") + f", delta {DELTA:g}\n\n"
          + markdown_table(header, rows) + "\n")
    return md, figures


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--only", choices=list(SETUPS), action="append")
    add_smoke(parser)
    args = parser.parse_args()
    epsilons = EPSILONS
    if args.smoke:  # epsilon 1 and no DP, one round of the demo's setup
        args.only, epsilons = ["demo"], (1.0, None)
        SETUPS["demo"][0].update(rounds=1, average_last=1)
        DEMO_DATA.update(n_sites=4, eval_size=500)
    payload: dict[str, Any] = {"delta": DELTA, "criteria": "AUC >= 0.7, slope in [0.8, 1.2], "
                                                           "|CITL| <= 0.1 on 95% intervals"}
    if args.only and RESULTS_FILE.exists():  # keep the other setups' last figures
        payload.update({k: v for k, v in json.loads(RESULTS_FILE.read_text()).items()
                        if k in SETUPS})
    for name in args.only or list(SETUPS):
        settings, seeds = SETUPS[name]
        runs = {("no DP" if eps is None else f"{eps:g}"): [
            _run(name, eps, seed, args.data_dir) for seed in seeds] for eps in epsilons}
        section, figures = _summary(name, runs)
        one, exact = figures["1"], figures["no DP"]
        targets: dict[str, Any] = {
            "clean_sites_calibration_not_acceptable_at_eps1":
                one["clean_sites_calibration_not_acceptable"],
            "min_share_of_achievable_auc_at_eps1": one["min_share_of_achievable_auc"],
            "runtime_ratio_at_eps1": one["seconds_per_run"] / exact["seconds_per_run"]}
        if one["pooled_test"] and exact["pooled_test"]:
            targets["pooled_auc_gap_at_eps1"] = (exact["pooled_test"]["auc"]
                                                 - one["pooled_test"]["auc"])
            targets["pooled_slope_at_eps1"] = one["pooled_test"]["slope"]
        section += "At epsilon 1: " + "; ".join(
            f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in targets.items() if v is not None) + ".\n\n"
        again: list[dict[str, Any]] = []
        if name == "demo" and "1" in runs:  # the noise is fresh each run: how much it varies
            again = [_run(name, 1.0, seeds[0], args.data_dir)
                     for _ in range(1 if args.smoke else DEMO_REPEATS)]
            every = [*runs["1"], *again]
            failures = [_calibration_failures(r) for r in every]
            failed = f"{sum(f > 0 for f in failures)} of {len(every)}"
            targets["runs_with_a_clean_site_not_acceptable_at_eps1"] = failed
            section += (f"Epsilon 1 in {len(every)} runs of the same cohort and seed (fresh "
                        f"noise each): clean sites \"not acceptable\" in calibration "
                        f"{', '.join(map(str, failures))} ({failed} runs with at least one); "
                        f"pooled-test calibration slope "
                        f"{', '.join(format(r['pooled']['slope'], '.2f') for r in every)}."
                        f"\n\n")
            secure = [_run(name, 1.0, seeds[0], args.data_dir, secure_aggregation=True,
                           **({**SECURE_DEMO_SETTINGS, "rounds": 2, "average_last": 1}
                              if args.smoke else SECURE_DEMO_SETTINGS))
                      for _ in range(len(every))]
            payload["demo_secure"] = secure
            fails = [_calibration_failures(r) for r in secure]
            shares = [min(v["share_of_achievable_auc"] for s, v in r["sites"].items()
                          if s != NOISY_LABELS) for r in secure]
            targets["secure_runs_with_a_clean_site_not_acceptable_at_eps1"] = (
                f"{sum(f > 0 for f in fails)} of {len(secure)}")
            section += (f"Over secure sums (`cardiofed demo --dp-epsilon 1 "
                        f"--secure-aggregation`: DP-FedSGD, {SECURE_DEMO_SETTINGS}), "
                        f"epsilon 1 in {len(secure)} runs of the same cohort and seed: "
                        f"clean sites \"not acceptable\" in calibration "
                        f"{', '.join(map(str, fails))} ({sum(f > 0 for f in fails)} of "
                        f"{len(secure)} runs with at least one); the least share of the "
                        f"achievable AUC at a clean site {min(shares):.3f}.\n\n")
        payload[name] = {"settings": settings, "seeds": list(seeds), "runs": runs,
                         "repeats_at_eps1": again, "figures": figures, "targets": targets,
                         "markdown": section}
    write_results("privacy_utility", payload,
                  "".join(payload[name]["markdown"] for name in SETUPS if name in payload))


if __name__ == "__main__":
    main()
