"""Attacks an AUC target does not see: the statistics round, targeted updates, the
asynchronous buffer.

Eight sites (the synthetic demo federation and Framingham in 8 hospitals), logistic
regression, FedAvg, 20 rounds, 1 local epoch, batch 32, lr 0.05.

1. **Statistics round.** One site releases a forged exact release that passes every
   check of the coordinator: 10,000,000 records at the top of every range, at the
   bottom, split between both ends, or at the top with a plausible record count (the
   median site's); and, for scale, the site withholding its release (its honest data
   leaving the merge, which no rule can tell from a lie inside the honest range; under
   the gate this moves more than summed, since the gate then reweighs the rest).
   Every site takes the attacker's place in turn; the table shows the worst over them
   of the largest move of any column's merged mean (share of the column's range) and
   SD (relative), with the statistics gate (``cardiofed.aggregation.robust_statistics``)
   and without (the plain sum). Then the federation trains (default rule and schedule,
   up to 100 rounds with early stop, the attacker honest in training) on the gated
   preprocessor of the worst forged case, and the risk of a typical patient (the pooled
   test set's per-column median) is compared with the clean run's.
2. **Targeted updates.** The two or three smallest sites collude: every round each sends
   an update of its honest update's norm (so no norm bound clips it) pointing where it
   lowers a chosen patient's risk (the test patient whose clean risk is closest to
   0.25), or where it makes smoking protective (all of it on the smoking coefficient).
   The table shows the patient's risk and risk category (low < 5%, borderline 5 to
   7.5%, intermediate 7.5 to 20%, high >= 20%) and the sign of every smoking
   coefficient, per rule, Flower's aggregation functions included when ``flwr`` is
   installed (as in bench/robustness.py).
3. **Asynchronous buffer.** The fastest one or two sites attack every update they send
   (sign flip, x1e6, the targeted update); versions are published from K = 3
   distinct sites (f = 1) or K = 5 (f = 2), median or weighted median after the norm
   bound, over the window (the buffer and every other site's latest update,
   ``async_window``) or, for comparison, over the buffer alone, and K = 7 (f = 3); the
   cost in pooled AUC against the clean asynchronous run with the same settings, beside
   the cost of the same sites sending nothing at all (their data leaves the federation:
   the floor under any rule; with K = 7 two silent sites of 8 stall the study).

    python bench/targeted_attacks.py [--data-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402
from robustness import DEFAULT, FlowerRule, flower_rules  # noqa: E402
from robustness import RULES as ROBUSTNESS_RULES  # noqa: E402

from cardiofed.aggregation.robust_statistics import robust_site_statistics  # noqa: E402
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm  # noqa: E402
from cardiofed.data.dataset import FederatedDataset  # noqa: E402
from cardiofed.data.framingham import load_framingham  # noqa: E402
from cardiofed.data.preprocessing import (  # noqa: E402
    DEFAULT_BINS,
    SiteStatistics,
    bin_edges,
    merge_statistics,
    site_statistics,
)
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.models.networks import score  # noqa: E402
from cardiofed.simulation.async_runner import run_async  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.prepare import PreparedSite, _prepared, prepare_federation  # noqa: E402
from cardiofed.simulation.runner import round_metrics, run_federated  # noqa: E402

BASE = dict(model="logistic", algorithm="fedavg", rounds=20, local_epochs=1, batch_size=32,
            lr=0.05, standardisation="global", eval_every=0, seed=0, backend="loop",
            stop_patience=None)  # attacks over a fixed schedule: no early stop to steer
# bench/robustness.py's rules, less multi-Krum with f = 1 (f = 2 stands for Krum here).
RULES: dict[str, dict[str, Any]] = {rule: settings for rule, settings in ROBUSTNESS_RULES.items()
                                    if rule != "multi-Krum f=1 (cap, bound)"}
# The statistics attack's federation trains on the default schedule (up to 100 rounds,
# early stop): over BASE's 20 rounds neither run converges, and the typical patient's
# risk then differs by where training stopped (0.032 on Framingham), not by the attack.
STATISTICS_SCHEDULE = dict(rounds=100, stop_patience=5)
CATEGORIES = ((0.05, "low"), (0.075, "borderline"), (0.20, "intermediate"),
              (float("inf"), "high"))


def category(risk: float) -> str:
    return next(name for bound, name in CATEGORIES if risk < bound)


# ---------------------------------------------------------------- 1. statistics

def forged(edges: np.ndarray, kind: str, records: float) -> SiteStatistics:
    """An exact release that passes the coordinator's checks."""
    d = len(edges)
    hist = np.zeros((d, DEFAULT_BINS))
    if kind == "top":
        hist[:, -1] = records
    elif kind == "bottom":
        hist[:, 0] = records
    else:
        hist[:, 0] = hist[:, -1] = np.floor(records / 2)
    mids = (edges[:, :-1] + edges[:, 1:]) / 2
    return SiteStatistics(count=hist.sum(axis=1), total=(hist * mids).sum(axis=1),
                          total_sq=(hist * mids**2).sum(axis=1), n_missing=np.zeros(d),
                          histogram=hist)


def statistics_attacks(data: FederatedDataset, cfg: SimulationConfig) -> dict[str, Any]:
    edges = bin_edges(data.feature_ranges)
    stats = [site_statistics(s.x_train, edges) for s in data.sites]
    width = edges[:, -1] - edges[:, 0]
    median_count = float(np.median([s.count.max() for s in stats]))
    clean = {gated: merge(stats, edges, gated) for gated in (True, False)}
    rows: dict[str, dict[str, Any]] = {}
    worst_case: tuple[float, list[SiteStatistics]] = (-1.0, stats)
    for kind, records in (("top", 1e7), ("bottom", 1e7), ("both ends", 1e7),
                          ("top", median_count), ("withheld", 0.0)):
        label = ("none: the site withholds its release" if kind == "withheld"
                 else f"{kind}, {records:,.0f} records")
        row: dict[str, Any] = {}
        for gated in (False, True):
            mean_move, sd_move = 0.0, 0.0
            for victim in range(len(stats)):
                lie = [] if kind == "withheld" else [forged(edges, kind, records)]
                attacked = [*stats[:victim], *lie, *stats[victim + 1:]]
                merged = merge(attacked, edges, gated)
                moved = float(np.max(np.abs(merged.mean - clean[gated].mean) / width))
                mean_move = max(mean_move, moved)
                sd_move = max(sd_move, float(np.max(np.abs(merged.std / clean[gated].std - 1))))
                if gated and lie and moved > worst_case[0]:
                    worst_case = (moved, attacked)
            row["gated" if gated else "summed"] = {"mean_move": mean_move, "sd_move": sd_move}
        rows[label] = row
        print(f"statistics {label}: {row}", flush=True)
    typical = typical_patient(data)
    risks = {}
    for name, released in (("clean", stats), ("worst attacked", worst_case[1])):
        pre = merge(released, edges, True)
        sites = [_prepared(s, pre, data.feature_ranges) for s in data.sites]
        weights = run_federated(sites, cfg).weights
        risks[name] = float(score(cfg.model, weights, pre.transform(typical[None, :]))[0])
    return {"moves": rows, "typical_patient_risk": risks,
            "typical_patient_risk_change": abs(risks["worst attacked"] - risks["clean"])}


def merge(stats: list[SiteStatistics], edges: np.ndarray, gated: bool) -> Any:
    return merge_statistics(robust_site_statistics(stats, edges)[0] if gated else stats, edges)


def typical_patient(data: FederatedDataset) -> np.ndarray:
    """The pooled test set's per-column median (a 0/1 column's majority)."""
    pooled = np.concatenate([s.x_test for s in data.sites])
    return np.nanmedian(pooled, axis=0)


# ---------------------------------------------------------------- 2. targeted updates

@dataclass(frozen=True)
class Targeted:
    """`malicious` sites send, at their honest update's norm, a direction of `target`
    (one vector over the flattened weights: the patient's logit gradient, negated, or
    minus the smoking coefficients' unit vector)."""

    inner: FederatedAlgorithm
    malicious: frozenset[str]
    target: dict[str, np.ndarray]
    flip: bool = False  # a sign flip instead of the targeted direction
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.inner.name

    def client_update(self, model: Any, weights: Any, x: np.ndarray, y: np.ndarray, *,
                      site: str, **kwargs: Any) -> ClientUpdate:
        update = self.inner.client_update(model, weights, x, y, site=site, **kwargs)
        if site not in self.malicious:
            return update
        if self.flip:
            return replace(update, delta={k: -v * self.scale for k, v in update.delta.items()})
        norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                           for v in update.delta.values()))
        t_norm = np.sqrt(sum(float((v**2).sum()) for v in self.target.values()))
        delta = {k: (norm * self.scale * self.target[k] / t_norm).astype(v.dtype)
                 for k, v in update.delta.items()}
        return replace(update, delta=delta)

    def init_server(self, weights: Any) -> Any:
        return self.inner.init_server(weights)

    def server_update_with_report(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.server_update_with_report(*args, **kwargs)


def lower_risk_of(x: np.ndarray, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Minus the logistic logit's gradient at standardised row `x`."""
    return {"linear.weight": -x.reshape(weights["linear.weight"].shape).astype(np.float64),
            "linear.bias": -np.ones_like(weights["linear.bias"], dtype=np.float64)}


def protective(columns: list[int], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    w = np.zeros_like(weights["linear.weight"], dtype=np.float64)
    w[0, columns] = -1.0
    return {"linear.weight": w, "linear.bias": np.zeros_like(weights["linear.bias"],
                                                             dtype=np.float64)}


def targeted_attacks(data: FederatedDataset, sites: list[PreparedSite],
                     base: dict[str, Any]) -> dict[str, Any]:
    smoking = [j for j, name in enumerate(data.feature_names)
               if "smok" in name or name.startswith("cigs")]
    smallest = sorted(sites, key=lambda s: s.n_train)
    x_test = np.concatenate([s.x_test for s in sites])
    clean_default = run_federated(sites, SimulationConfig.create(**base, **RULES[DEFAULT]))
    risks = score("logistic", clean_default.weights, x_test)
    patient = x_test[int(np.argmin(np.abs(risks - 0.25)))]
    out: dict[str, Any] = {"patient_clean_risk": float(risks[np.argmin(np.abs(risks - 0.25))]),
                           "smoking_columns": [data.feature_names[j] for j in smoking],
                           "rules": {}}
    rules = {**{rule: (settings, None) for rule, settings in RULES.items()},
             **{rule: ({}, fn) for rule, fn in flower_rules().items()}}
    for rule, (settings, flower) in rules.items():
        cfg = SimulationConfig.create(**base, **settings)

        clean = run_federated(sites, cfg, algorithm=_honest(cfg, flower)).weights
        row: dict[str, Any] = {"clean": _summary(clean, patient, smoking)}
        for k in (2, 3):
            malicious = frozenset(s.name for s in smallest[:k])
            for attack, target in (("lower the patient's risk", lower_risk_of(patient, clean)),
                                   ("smoking protective", protective(smoking, clean))):
                algorithm = Targeted(_honest(cfg, flower), malicious, target)
                weights = run_federated(sites, cfg, algorithm=algorithm).weights
                row[f"{attack} ({k})"] = _summary(weights, patient, smoking)
        out["rules"][rule] = row
        print(f"targeted {rule}: {row}", flush=True)
    return out


def _honest(cfg: SimulationConfig, flower: Any) -> Any:
    """The plan's algorithm, with Flower's aggregation function in place of ours if given."""
    inner = cfg.make_algorithm()
    return inner if flower is None else FlowerRule(inner, flower)


def _summary(weights: dict[str, np.ndarray], patient: np.ndarray,
             smoking: list[int]) -> dict[str, Any]:
    risk = float(score("logistic", weights, patient[None, :])[0])
    return {"risk": risk, "category": category(risk),
            "smoking_coefficients": [float(weights["linear.weight"][0, j]) for j in smoking]}


# ---------------------------------------------------------------- 3. asynchronous buffer

def async_attacks(sites: list[PreparedSite], base: dict[str, Any]) -> dict[str, Any]:
    fastest = sorted(sites, key=lambda s: -s.n_train)  # the tier-3 hospitals train fastest
    x_test = np.concatenate([s.x_test for s in sites])
    out: dict[str, Any] = {}
    for label, rule, f, k, window in (
            ("median, K=3 (f=1)", "median", 1, 3, True),
            ("median, K=5 (f=2)", "median", 2, 5, True),
            ("default: weighted median, K=5 (f=2)", "weighted-median", 2, 5, True),
            ("weighted median, K=5 (f=2), the buffer alone", "weighted-median", 2, 5, False),
            ("weighted median, K=7 (f=3)", "weighted-median", 3, 7, True)):
        cfg = SimulationConfig.create(**{**base, "aggregation": "async", "buffer_size": k,
                                         "robust_rule": rule, "robust_byzantine": f,
                                         "async_window": window})
        clean = run_async(sites, cfg)
        auc = float(round_metrics(cfg.model, clean.weights, sites)["pooled_auc"])
        patient = x_test[int(np.argmin(np.abs(score("logistic", clean.weights, x_test)
                                              - 0.25)))]
        row: dict[str, Any] = {"clean_auc": auc}
        for n_bad in (1, 2):
            malicious = frozenset(s.name for s in fastest[:n_bad])
            # The floor no rule goes under: the sites send nothing (their data leaves).
            rest = [s for s in sites if s.name not in malicious]
            row[f"withheld ({n_bad})"] = None if len(rest) < k else auc - float(
                round_metrics(cfg.model, run_async(rest, cfg).weights, sites)["pooled_auc"])
            for attack in ("sign flip", "scale x1e6", "targeted"):
                target = lower_risk_of(patient, clean.weights)
                algorithm = Targeted(cfg.make_algorithm(), malicious, target,
                                     flip=attack != "targeted",
                                     scale=1e6 if attack == "scale x1e6" else 1.0)
                run = run_async(sites, cfg, algorithm=algorithm)
                row[f"{attack} ({n_bad})"] = auc - float(
                    round_metrics(cfg.model, run.weights, sites)["pooled_auc"])
        out[label] = row
        print(f"async {label}: {row}", flush=True)
    return out


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="synthetic only, 10 rounds")
    add_smoke(parser)
    args = parser.parse_args()
    base = dict(BASE)
    datasets = {"synthetic": synthetic_federation(8, seed=0)}
    if args.smoke:
        base["rounds"] = 2
        for rule in [r for r in RULES if r != DEFAULT]:
            del RULES[rule]
    elif args.quick:
        base["rounds"] = 10
    else:
        datasets["framingham"] = load_framingham(args.data_dir, seed=0)
    payload: dict[str, Any] = {"settings": base}
    md = ""
    for name, data in datasets.items():
        cfg = SimulationConfig.create(**base, **RULES[DEFAULT])
        sites = prepare_federation(data, "global", robust=True)
        schedule = {} if args.smoke else STATISTICS_SCHEDULE
        result = {"statistics": statistics_attacks(data, cfg.model_copy(update=schedule)),
                  "targeted": targeted_attacks(data, sites, base),
                  "async": async_attacks(sites, base)}
        payload[name] = result
        md += report(name, result)
    write_results("targeted_attacks", payload, md)


def report(name: str, result: dict[str, Any]) -> str:
    stats = result["statistics"]
    rows = [[label, r["summed"]["mean_move"], r["gated"]["mean_move"], r["summed"]["sd_move"],
             r["gated"]["sd_move"]] for label, r in stats["moves"].items()]
    risks = stats["typical_patient_risk"]
    md = (f"## {name}\n\n### Statistics round: one forged release of 8 (worst over which "
          f"site forges; the last row: its honest data left out)\n\n"
          + markdown_table(["forged release", "mean move / range (summed)",
                            "mean move / range (gated)", "SD move (summed)",
                            "SD move (gated)"], rows)
          + f"\nTypical patient's risk after training (default schedule) on the worst "
            f"forged gated preprocessor: "
            f"{risks['worst attacked']:.4f} vs clean {risks['clean']:.4f} (change "
            f"{stats['typical_patient_risk_change']:.4f}).\n\n")
    targeted = result["targeted"]
    columns = [c for c in next(iter(targeted["rules"].values()))]
    rows = []
    for rule, row in targeted["rules"].items():
        rows.append([rule, *[f"{row[c]['risk']:.3f} {row[c]['category']}; smoking "
                             + "/".join(f"{v:+.2f}" for v in row[c]["smoking_coefficients"])
                             for c in columns]])
    md += (f"### Targeted updates (chosen patient's clean risk "
           f"{targeted['patient_clean_risk']:.3f}; smoking columns "
           f"{', '.join(targeted['smoking_columns'])}; colluding smallest sites)\n\n"
           + markdown_table(["rule", *columns], rows) + "\n")
    asyn = result["async"]
    columns = [c for c in next(iter(asyn.values())) if c != "clean_auc"]
    md += ("### Asynchronous buffer: pooled AUC cost against the clean asynchronous run "
           "(fastest sites malicious; \"withheld\": they send nothing, the floor no rule "
           "goes under; \"stalls\": too few sites left for K)\n\n"
           + markdown_table(["buffer", "clean AUC", *columns],
                            [[k, r["clean_auc"], *["stalls" if r[c] is None else r[c]
                                                   for c in columns]]
                             for k, r in asyn.items()]) + "\n")
    return md


if __name__ == "__main__":
    main()
