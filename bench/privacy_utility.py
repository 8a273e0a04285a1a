"""Privacy-utility curve: everything a site releases, charged to one ledger per site.

For epsilon in {0.5, 1, 2, 4, 8} and no DP, delta = 1e-5 at every site, on the UCI
four hospitals (FLamby split) and the Framingham eight-hospital partition. Each site
releases its preprocessing statistics (Gaussian noise on histograms and its record
count), trains with DP-SGD (noise calibrated for the whole planned schedule: every local
step of every round, RDP accountant, Poisson sampling rate batch/n) and releases its
evaluation of the final model (noisy score histograms), all composed on its ledger with
the default split of the budget (statistics 10%, training 80%, evaluation 10%, as
cumulative targets). The epsilon reported is the ledger's total after everything; the
accuracy and AUC are the simulation's exact view of the sites' test splits. Noise is
secret (drawn from the OS CSPRNG), so DP rows vary from run to run beyond the seeds.

UCI: FedAvg, 15 rounds x 100 local steps, batch 4, SGD lr 0.01, clip 1.0, global
standardisation. Framingham: FedAvg, 40 rounds x 1 epoch, batch 512 (expected Poisson
batch; the whole site for sites under 512 records), SGD lr 1.0, clip 1.0.
Seeds 42-44 (UCI) and 0-2 (Framingham); means reported.

Targets: UCI mean per-client accuracy >= 0.72 at epsilon 1; Framingham pooled-test AUC
at epsilon 1 within 0.03 of the non-private federated model.

    python bench/privacy_utility.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.data.framingham import load_framingham  # noqa: E402
from cardiofed.data.uci_heart import load_uci_heart  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import FEDERATED, POOLED_TEST, run_experiment  # noqa: E402

EPSILONS: tuple[float | None, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, None)
DELTA = 1e-5
SETUPS = {
    "uci-heart": (dict(algorithm="fedavg", rounds=15, local_steps=100, batch_size=4, lr=0.01,
                       standardisation="global"), (42, 43, 44)),
    # Large batches suit DP-SGD (more signal per noisy step, fewer steps to account).
    "framingham": (dict(algorithm="fedavg", rounds=40, local_epochs=1, batch_size=512, lr=1.0,
                        standardisation="global"), (0, 1, 2)),
}


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    datasets = {"uci-heart": load_uci_heart(args.data_dir),
                "framingham": load_framingham(args.data_dir, seed=0)}
    payload: dict[str, dict[str, object]] = {}
    md = ""
    for name, (settings, seeds) in SETUPS.items():
        data = datasets[name]
        sites = [s.name for s in data.sites]
        rows, results = [], {}
        for eps in EPSILONS:
            acc, auc, pooled_auc, spent, by_kind = [], [], [], [], []
            for seed in seeds:
                dp = {} if eps is None else {"dp_epsilon": eps, "dp_delta": DELTA}
                cfg = SimulationConfig.create(**settings, **dp, seed=seed, eval_every=0)
                r = run_experiment(data, cfg, baselines=False)
                acc.append([r.metrics[s][FEDERATED]["accuracy"] for s in sites])
                auc.append([r.metrics[s][FEDERATED]["auc"] for s in sites])
                pooled_auc.append(r.metrics[POOLED_TEST][FEDERATED]["auc"])
                spent.append([r.privacy[s]["epsilon_spent"] for s in sites] if r.privacy else [])
                by_kind.append({k: max(r.privacy[s][f"epsilon_{k}"] for s in sites)
                                for k in ("statistics", "train", "evaluate")}
                               if r.privacy else {})
            label = "no DP" if eps is None else f"{eps:g}"
            mean_acc = np.mean(acc, axis=0)
            results[label] = {
                "accuracy_per_site": dict(zip(sites, mean_acc.tolist(), strict=True)),
                "auc_per_site": dict(zip(sites, np.nanmean(auc, axis=0).tolist(), strict=True)),
                "mean_client_accuracy": float(mean_acc.mean()),
                "pooled_test_auc": float(np.mean(pooled_auc)),
                "epsilon_spent_max_over_sites": float(np.max(spent)) if eps else None,
                "epsilon_spent_per_site": dict(zip(sites, np.max(spent, axis=0).tolist(),
                                                   strict=True)) if eps else None,
                "epsilon_by_kind_max_over_sites": {
                    k: float(max(b[k] for b in by_kind)) for k in by_kind[0]} if eps else None,
            }
            kinds = results[label]["epsilon_by_kind_max_over_sites"]
            rows.append([label, *mean_acc.tolist(), float(mean_acc.mean()),
                         float(np.mean(pooled_auc)),
                         " / ".join(f"{v:.2f}" for v in kinds.values()) if kinds else "–",
                         float(np.max(spent)) if eps else "–"])
        no_dp = results["no DP"]["pooled_test_auc"]
        one = results["1"]
        targets = {"mean_client_accuracy_at_eps1": one["mean_client_accuracy"],
                   "pooled_auc_gap_at_eps1": no_dp - one["pooled_test_auc"]}
        payload[name] = {"settings": settings, "seeds": seeds, "delta": DELTA,
                         "results": results, "targets": targets}
        md += (f"## {name}: federated accuracy per site, delta = {DELTA:g}\n\n"
               + markdown_table(["epsilon", *sites, "mean over clients", "pooled-test AUC",
                                 "eps statistics / train / evaluate (each alone)",
                                 "max epsilon spent (total)"], rows)
               + "\nAt epsilon 1: mean client accuracy "
                 f"{one['mean_client_accuracy']:.3f}, pooled-test AUC "
                 f"{one['pooled_test_auc']:.3f} vs {no_dp:.3f} without DP "
                 f"(gap {targets['pooled_auc_gap_at_eps1']:.3f}).\n\n")
    write_results("privacy_utility", payload, md)


if __name__ == "__main__":
    main()
