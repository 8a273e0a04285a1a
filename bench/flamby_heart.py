"""FLamby Fed-Heart-Disease, reproduced: pooled, local-only and four federated strategies.

Setting (Ogier du Terrail et al., NeurIPS 2022 Datasets and Benchmarks): the four UCI
hospitals with FLamby's preprocessing and split (cardiofed.data.uci_heart), per-centre
logistic regression, batch size 4, seeds 42-46. Pooled training uses FLamby's recipe
(Adam, lr 1e-3, 50 epochs). Federated strategies use FLamby's compute budget: 15 rounds
of 100 local updates (``get_nb_max_rounds(100)``), with our local and server learning
rates (listed in the JSON). Two normalisations: FLamby's per-centre standardisation,
and CardioFed's default, one global standardisation from federated statistics (site
aggregates only). Accuracy at 0.5 and AUC per client test set and on the pooled test
set (all four test sets together); means over the five seeds.

    python bench/flamby_heart.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.data.uci_heart import load_uci_heart  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import (  # noqa: E402
    FEDERATED,
    LOCAL,
    POOLED,
    POOLED_TEST,
    run_experiment,
)

SEEDS = (42, 43, 44, 45, 46)
# FLamby's protocol: a fixed schedule of 15 rounds of 100 steps (no early stop).
BASE = dict(model="logistic", batch_size=4, rounds=15, local_steps=100, stop_patience=None)
NORMALISATIONS = {"per-site": "FLamby per-centre", "global": "federated global"}
STRATEGIES: dict[str, dict[str, object]] = {
    "FedAvg": dict(algorithm="fedavg", optimizer="sgd", lr=0.01),
    "FedProx": dict(algorithm="fedprox", optimizer="sgd", lr=0.01, proximal_mu=0.01),
    "FedAdam": dict(algorithm="fedadam", optimizer="sgd", lr=0.01, server_lr=0.03),
    "FedYogi": dict(algorithm="fedyogi", optimizer="sgd", lr=0.01, server_lr=0.03),
}
# FLamby's pooled recipe: Adam, lr 1e-3, batch 4, 50 epochs.
POOLED_RECIPE = dict(algorithm="fedavg", optimizer="adam", lr=0.001, rounds=50, local_steps=None,
                     local_epochs=1, stop_patience=None)
FLAMBY = {  # FLamby's published accuracy, mean of 5 seeds
    "pooled": [.783, .764, .750, .644, .795], "FedAvg": [.731, .719, .650, .640, .748],
    "FedYogi": [.760, .753, .738, .676, .779], "Cyclic": [.758, .762, .713, .640, .785],
}


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    add_smoke(parser)
    args = parser.parse_args()
    seeds = SEEDS[:1] if args.smoke else SEEDS
    smoke = {"rounds": 1, "local_steps": 2} if args.smoke else {}
    data = load_uci_heart(args.data_dir)
    centres = [s.name for s in data.sites]
    columns = [*centres, POOLED_TEST]
    # method -> metric -> seed -> [per centre..., pooled test]
    scores: dict[str, dict[str, list[list[float]]]] = {}

    def keep(method: str, metrics: dict[str, dict[str, dict[str, float]]], label: str) -> None:
        for metric in ("accuracy", "auc"):
            scores.setdefault(method, {}).setdefault(metric, []).append(
                [metrics[c][label][metric] for c in columns])

    for seed in seeds:
        for norm, norm_label in NORMALISATIONS.items():
            common = {**BASE, "standardisation": norm, "seed": seed}
            # Pooled and local-only with FLamby's recipe; local-only always standardises
            # with the site's own statistics, so it is reported once.
            result = run_experiment(data, SimulationConfig.create(
                **{**common, **POOLED_RECIPE, **({"rounds": 1} if args.smoke else {})}))
            keep(f"pooled ({norm_label})", result.metrics, POOLED)
            if norm == "per-site":
                keep("local-only", result.metrics, LOCAL)
            for name, settings in STRATEGIES.items():
                cfg = SimulationConfig.create(**{**common, **settings, **smoke})
                keep(f"{name} ({norm_label})", run_experiment(data, cfg, baselines=False).metrics,
                     FEDERATED)

    mean = {m: {k: np.mean(v, axis=0).tolist() for k, v in d.items()} for m, d in scores.items()}
    std = {m: {k: np.std(v, axis=0).tolist() for k, v in d.items()} for m, d in scores.items()}
    header = ["method", *centres, "mean over clients", POOLED_TEST]

    def rows(metric: str) -> list[list[object]]:
        return [[m, *v[metric][:4], float(np.mean(v[metric][:4])), v[metric][4]]
                for m, v in mean.items()]

    flamby_rows = [[f"FLamby {m}", *v[:4], float(np.mean(v[:4])), v[4]]
                   for m, v in FLAMBY.items()]
    md = ("## FLamby Fed-Heart-Disease, accuracy (mean of seeds 42-46)\n\n"
          + markdown_table(header, rows("accuracy") + flamby_rows)
          + "\n## AUC (mean of seeds 42-46)\n\n" + markdown_table(header, rows("auc"))
          + "\nLocal-only: each centre's own model at its own test set; its pooled-test "
            "figure scores each test row with its own centre's model.\n")
    write_results("flamby_heart", {
        "seeds": SEEDS, "centres": centres, "base": BASE, "normalisations": NORMALISATIONS,
        "pooled_recipe": POOLED_RECIPE,
        "strategies": STRATEGIES, "mean": mean, "std": std, "per_seed": scores,
        "flamby_published_accuracy": FLAMBY}, md)


if __name__ == "__main__":
    main()
