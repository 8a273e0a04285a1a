"""Robust aggregation against malicious sites: pooled-test AUC of each rule per attack.

Framingham in 8 hospitals and the synthetic 12-site federation, FedAvg (logistic
regression, 20 rounds, 1 local epoch, batch 32, lr 0.05, global standardisation). One
or two malicious sites (the largest: the worst case for sample-size weighting) attack
every round:

* ``scale x1e6``: their honest update times 1e6;
* ``sign flip``: their honest update times -1;
* ``large noise``: Gaussian noise of norm 1e3 in place of the update;
* ``label flip``: they train honestly on labels 1 - y;
* ``lying num_samples``: sign-flipped update declared with num_samples = 2**62.

Rules: plain FedAvg (no defence), ``mean``, ``trimmed-mean`` (0.2), ``centered-clip``,
``multi-krum`` with f = 1 and 2 (none knows how many sites attack), the
coordinate-wise ``median``, and the ``weighted-median`` (sample-size shares capped at
1 / (2f + 1)) with f = 1 and with f = 2, the networked default for 5 sites or more;
all after the norm bound (3 x the round's median norm), the weighted rules with the
weight cap 0.5 (bench/targeted_attacks.py measures what AUC does not show). Flower
ships Krum, Bulyan and trimmed mean as strategies: when ``flwr`` can be imported (not a
project dependency; docs/benchmarks.md says how to install it apart) the same attacks
also run through Flower's own aggregation functions
(``flwr.server.strategy.aggregate``: Krum, Bulyan, trimmed average, median) on the same
updates, so our rules are measured beside Flower's.
Targets:
with the default rule one malicious site of 8 costs at most 0.01 AUC and two at most
0.02; the clean run loses at most 0.005 against FedAvg.

    python bench/robustness.py [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm  # noqa: E402
from cardiofed.data.framingham import load_framingham  # noqa: E402
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.prepare import prepare_federation  # noqa: E402
from cardiofed.simulation.runner import round_metrics, run_federated  # noqa: E402

BASE = dict(model="logistic", algorithm="fedavg", rounds=20, local_epochs=1, batch_size=32,
            lr=0.05, standardisation="global", eval_every=0, backend="loop",
            stop_patience=None)  # attacks over a fixed schedule: no early stop to steer
DEFAULT = "default: weighted median f=2 (cap 1/5, bound)"
RULES: dict[str, dict[str, Any]] = {
    "FedAvg (no defence)": {},
    "mean (cap, bound)": {"robust_rule": "mean"},
    "trimmed mean (cap, bound)": {"robust_rule": "trimmed-mean"},
    "centred clipping (cap, bound)": {"robust_rule": "centered-clip"},
    "multi-Krum f=1 (cap, bound)": {"robust_rule": "multi-krum"},
    "multi-Krum f=2 (cap, bound)": {"robust_rule": "multi-krum", "robust_byzantine": 2},
    "median (bound)": {"robust_rule": "median"},
    "weighted median f=1 (cap 1/3, bound)": {"robust_rule": "weighted-median"},
    DEFAULT: {"robust_rule": "weighted-median", "robust_byzantine": 2},
}
ATTACKS = ("scale x1e6", "sign flip", "large noise", "label flip", "lying num_samples")


@dataclass(frozen=True)
class Attacked:
    """An algorithm whose `malicious` sites send `attack` instead of an honest update."""

    inner: FederatedAlgorithm
    malicious: frozenset[str]
    attack: str
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    @property
    def name(self) -> str:
        return self.inner.name

    def client_update(self, model: Any, weights: Any, x: np.ndarray, y: np.ndarray, *,
                      site: str, **kwargs: Any) -> ClientUpdate:
        bad = site in self.malicious
        if bad and self.attack == "label flip":
            y = 1 - y
        update = self.inner.client_update(model, weights, x, y, site=site, **kwargs)
        if not bad or self.attack == "label flip":
            return update
        delta = update.delta
        if self.attack == "scale x1e6":
            delta = {k: v * 1e6 for k, v in delta.items()}
        elif self.attack in ("sign flip", "lying num_samples"):
            delta = {k: -v for k, v in delta.items()}
        elif self.attack == "large noise":
            noise = {k: self.rng.normal(size=v.shape) for k, v in delta.items()}
            norm = np.sqrt(sum(float((n**2).sum()) for n in noise.values()))
            delta = {k: (1e3 * n / norm).astype(np.float32) for k, n in noise.items()}
        samples = 2**62 if self.attack == "lying num_samples" else update.num_samples
        return replace(update, delta=delta, num_samples=samples)

    def init_server(self, weights: Any) -> Any:
        return self.inner.init_server(weights)

    def server_update_with_report(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.server_update_with_report(*args, **kwargs)


@dataclass(frozen=True)
class FlowerRule:
    """The algorithm with Flower's aggregation function in place of its weighted mean
    (on the deltas: every site starts from the same global model, so distances, medians
    and trimmed means of deltas and of parameters pick the same updates)."""

    inner: FederatedAlgorithm
    aggregate: Any  # (list[(list[ndarray], num_examples)]) -> list[ndarray]

    @property
    def name(self) -> str:
        return self.inner.name

    def client_update(self, *args: Any, **kwargs: Any) -> ClientUpdate:
        return self.inner.client_update(*args, **kwargs)

    def init_server(self, weights: Any) -> Any:
        return self.inner.init_server(weights)

    def server_update_with_report(self, global_weights: Any, updates: Any, state: Any,
                                  weights: Any = None) -> Any:
        if not updates:
            return global_weights, state, []
        names = sorted(global_weights)
        merged = self.aggregate([([u.delta[k] for k in names], u.num_samples)
                                 for u in updates])
        delta = {k: np.asarray(v, np.float32) for k, v in zip(names, merged, strict=True)}
        new, state = self.inner.server.step(global_weights, delta, state)
        return new, state, []


def flower_rules() -> dict[str, Any]:
    """Flower's aggregation functions, if Flower is installed."""
    try:
        from flwr.server.strategy import aggregate as fl
    except ImportError:
        return {}
    return {
        "Flower Krum (f=1)": lambda r: fl.aggregate_krum(r, num_malicious=1, to_keep=0),
        # Flower's Bulyan strategy default: Krum as the selection rule.
        "Flower Bulyan (f=1, Krum)": lambda r: fl.aggregate_bulyan(
            r, num_malicious=1, aggregation_rule=fl.aggregate_krum, to_keep=0),
        "Flower trimmed average (0.2)": lambda r: fl.aggregate_trimmed_avg(
            r, proportiontocut=0.2),
        "Flower median": fl.aggregate_median,
    }


def pooled_auc(sites: list[Any], cfg: SimulationConfig, malicious: frozenset[str],
               attack: str | None, flower: Any = None) -> float:
    algorithm = cfg.make_algorithm()
    if flower is not None:
        algorithm = FlowerRule(algorithm, flower)  # type: ignore[assignment]
    if attack is not None:
        algorithm = Attacked(algorithm, malicious, attack)  # type: ignore[assignment]
    run = run_federated(sites, cfg, algorithm=algorithm)
    weights = run.weights
    if not all(np.isfinite(v).all() for v in weights.values()):
        return float("nan")
    return float(round_metrics(cfg.model, weights, sites)["pooled_auc"])


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="synthetic only, 10 rounds")
    add_smoke(parser)
    args = parser.parse_args()
    datasets = {"synthetic": synthetic_federation(seed=0)}
    base = dict(BASE)
    if args.smoke:  # two rounds, the default rule and FedAvg
        args.quick = True
        for rule in [r for r in RULES if r not in ("FedAvg (no defence)", DEFAULT)]:
            del RULES[rule]
    if args.smoke:
        base["rounds"] = 2
    elif args.quick:
        base["rounds"] = 10
    else:
        datasets = {"framingham": load_framingham(args.data_dir, seed=0), **datasets}
    payload: dict[str, Any] = {"settings": base, "rules": RULES, "attacks": ATTACKS}
    md = ""
    for name, data in datasets.items():
        sites = prepare_federation(data, "global")
        by_size = sorted(sites, key=lambda s: -s.n_train)
        results: dict[str, dict[str, float]] = {}
        columns = ["clean"] + [f"{a} ({k})" for a in ATTACKS for k in (1, 2)]
        rules = {**{rule: (settings, None) for rule, settings in RULES.items()},
                 **{rule: ({}, fn) for rule, fn in flower_rules().items()}}
        for rule, (settings, flower) in rules.items():
            row: dict[str, float] = {}
            for column in columns:
                attack, k = (None, 0) if column == "clean" else (
                    column.rsplit(" (", 1)[0], int(column[-2]))
                cfg = SimulationConfig.create(**base, **settings, seed=0)
                malicious = frozenset(s.name for s in by_size[:k])
                row[column] = pooled_auc(sites, cfg, malicious, attack, flower)
                print(f"{name} {rule} {column}: {row[column]:.4f}", flush=True)
            results[rule] = row
        fedavg_clean = results["FedAvg (no defence)"]["clean"]
        default = results[DEFAULT]
        cost1 = max(default["clean"] - default[f"{a} (1)"] for a in ATTACKS)
        cost2 = max(default["clean"] - default[f"{a} (2)"] for a in ATTACKS)
        targets = {"clean_loss_vs_fedavg": fedavg_clean - default["clean"],
                   "worst_cost_one_malicious": cost1, "worst_cost_two_malicious": cost2}
        payload[name] = {"n_sites": len(sites), "malicious_order": [s.name for s in by_size[:2]],
                         "pooled_auc": results, "targets": targets}
        rows = [[rule, *[r[c] for c in columns]] for rule, r in results.items()]
        md += (f"## {name}: pooled-test AUC after {base['rounds']} rounds ({len(sites)} sites; "
               f"malicious: {', '.join(s.name for s in by_size[:2])})\n\n"
               + markdown_table(["rule", *columns], rows)
               + f"\nDefault rule: clean run {default['clean']:.3f} vs FedAvg "
                 f"{fedavg_clean:.3f} (loss {targets['clean_loss_vs_fedavg']:.4f}); worst "
                 f"cost of one malicious site {cost1:.4f}, of two {cost2:.4f}.\n\n")
    write_results("robustness", payload, md)


if __name__ == "__main__":
    main()
