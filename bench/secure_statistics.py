"""The statistics and evaluation rounds over secure sums: what one forged site moves, as
one sum of every site and in groups of 3 through the statistics gate.

The demo's synthetic hospitals (12; the smoke run 6, in groups of 2), every site
private with a budget that leaves the secure sum's noise under a record (epsilon 1e4),
so what moves is the attack alone. One site sends, in place of its exact histograms
and record count (:func:`cardiofed.simulation.secure_statistics.statistics_vector`), a
forged vector the ring carries: 10,000,000 records in the top bin of every column, in
the bottom bin, split between both ends, in the top bin with the median site's record
count, or in one bin drawn at random per column (a new draw per run). Every site takes
the attacker's place in turn; the table shows the worst over them of the largest move
of any column's merged mean (share of the column's range) and SD (relative) against
the clean merge of the same arm. One sum is merged as it is; with groups
(``secure_group_size`` 3, dealt by the study's seed) each group's sum is one release to
the statistics gate (:mod:`cardiofed.aggregation.robust_statistics`), as a grouped
networked study merges them. For scale, the noise alone at epsilon 1 (the clean merge
at epsilon 1 against the clean merge at 1e4, 5 draws, the largest move).

The evaluation round: each site's test split scored by its true risk (a calibrated
model, no training needed), one sum or groups of 3 of the sites' score histograms
(:func:`cardiofed.simulation.secure_evaluation.secure_evaluation`), epsilon 1e4. One
site sends instead 10,000,000 negatives in the lowest score bin and as many positives in
the highest (the AUC pushed up), the reverse (pushed down), or the reverse inside the
honest range: the median site's test count as negatives in the bin of the pooled
positives' median score and as positives in the bin of the negatives'. The table shows
the worst over which site forges of the pooled AUC's and calibration slope's move.

    python bench/secure_statistics.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.aggregation.robust_statistics import robust_site_statistics  # noqa: E402
from cardiofed.data.dataset import FederatedDataset  # noqa: E402
from cardiofed.data.preprocessing import (  # noqa: E402
    PRIVATE_BINS,
    Preprocessor,
    bin_edges,
    merge_statistics,
)
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.evaluation.private_metrics import score_bin_edges  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import site_privacy  # noqa: E402
from cardiofed.simulation.secure_evaluation import (  # noqa: E402
    EVALUATION_LENGTH,
    secure_evaluation,
)
from cardiofed.simulation.secure_runner import secure_groups  # noqa: E402
from cardiofed.simulation.secure_statistics import secure_statistics  # noqa: E402

RECORDS = 1e7
Attack = Callable[[str, np.ndarray], np.ndarray]


def merged(data: FederatedDataset, epsilon: float, groups: list[list[str]] | None,
           attack: Attack | None = None) -> Preprocessor:
    """The merged preprocessor of one secure statistics round."""
    config = SimulationConfig.create(dp_epsilon=epsilon, secure_aggregation=True)
    edges = bin_edges(data.feature_ranges)
    released = secure_statistics(data.sites, bin_edges(data.feature_ranges, PRIVATE_BINS),
                                 site_privacy(data, config), config.secure_dropout,
                                 groups=groups, attack=attack)
    if groups is not None:
        released = robust_site_statistics(released, edges)[0]
    return merge_statistics(released, edges)


def moves(a: Preprocessor, b: Preprocessor, width: np.ndarray) -> tuple[float, float]:
    """The largest move of a column's mean (share of its range) and SD (relative)."""
    return (float(np.max(np.abs(a.mean - b.mean) / width)),
            float(np.max(np.abs(a.std / b.std - 1))))


def forging(kind: str, attacker: str, d: int, records: float,
            rng: np.random.Generator) -> Attack:
    """What `attacker` sends instead of its vector (the others' are left alone)."""
    hist = np.zeros((d, PRIVATE_BINS))
    if kind == "top":
        hist[:, -1] = records
    elif kind == "bottom":
        hist[:, 0] = records
    elif kind == "both ends":
        hist[:, 0] = hist[:, -1] = np.floor(records / 2)
    else:  # one bin per column, at random
        hist[np.arange(d), rng.integers(0, PRIVATE_BINS, d)] = records
    vector = np.concatenate([hist.ravel(), [records]])
    return lambda site, honest: vector if site == attacker else honest


def evaluation_attacks(data: FederatedDataset, arms: dict[str, list[list[str]] | None],
                       attackers: list[str], smoke: bool) -> dict[str, Any]:
    """The pooled AUC's and slope's worst moves under each forged evaluation vector."""
    outcomes = [(s.name, s.y_test, s.true_risk_test) for s in data.sites]
    config = SimulationConfig.create(dp_epsilon=1e4, secure_aggregation=True)
    rng = np.random.default_rng(0)

    def pooled(groups: list[list[str]] | None, attack: Attack | None = None) -> Any:
        return secure_evaluation(outcomes, site_privacy(data, config), config.secure_dropout,
                                 rng, groups=groups, attack=attack)

    n = EVALUATION_LENGTH // 2
    edges = score_bin_edges(n)
    y = np.concatenate([s.y_test for s in data.sites])
    p = np.concatenate([s.true_risk_test for s in data.sites])
    bin_of = [int(np.searchsorted(edges, np.median(p[y == k]))) - 1 for k in (0, 1)]
    median_n = float(np.median([len(s.y_test) for s in data.sites]))
    forgeries = {"negatives lowest, positives highest, 10,000,000 each": (0, n - 1, RECORDS),
                 "negatives highest, positives lowest, 10,000,000 each": (n - 1, 0, RECORDS),
                 "swapped inside the honest range, the median site's count":
                     (bin_of[1], bin_of[0], median_n)}
    clean = {arm: pooled(groups) for arm, groups in arms.items()}
    moves: dict[str, dict[str, dict[str, float]]] = {}
    for label, (neg_bin, pos_bin, records) in forgeries.items():
        vector = np.zeros(EVALUATION_LENGTH)
        vector[neg_bin], vector[n + pos_bin] = records, records
        for arm, groups in arms.items():
            worst = {"auc_move": 0.0, "slope_move": 0.0}
            for attacker in attackers:
                got = pooled(groups, lambda site, v, a=attacker, f=vector: f if site == a else v)
                worst["auc_move"] = max(worst["auc_move"], abs(got["auc"] - clean[arm]["auc"]))
                worst["slope_move"] = max(worst["slope_move"], abs(
                    got["calibration_slope"] - clean[arm]["calibration_slope"]))
            moves.setdefault(label, {})[arm] = worst
            print(f"evaluation {arm} {label}: {worst}", flush=True)
        if smoke:
            break
    return {"clean": clean, "moves": moves}


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smoke(parser)
    args = parser.parse_args()
    n_sites, size = (6, 2) if args.smoke else (12, 3)
    data = synthetic_federation(n_sites, seed=0, size_scale=0.2 if args.smoke else 1.0)
    names = [s.name for s in data.sites]
    arms = {"one sum": None, f"groups of {size}, gated": secure_groups(names, size, 0)}
    edges = bin_edges(data.feature_ranges)
    width = edges[:, -1] - edges[:, 0]
    median_records = float(np.median([s.n_train for s in data.sites]))
    attacks = [("top", RECORDS), ("bottom", RECORDS), ("both ends", RECORDS),
               ("top", median_records), ("random bins", RECORDS)]
    attackers = names[:1] if args.smoke else names
    rng = np.random.default_rng(0)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for arm, groups in arms.items():
        clean = merged(data, 1e4, groups)
        noise = max((moves(merged(data, 1.0, groups), clean, width)
                     for _ in range(1 if args.smoke else 5)), key=lambda m: m[0])
        rows.setdefault("noise alone at epsilon 1", {})[arm] = {
            "mean_move": noise[0], "sd_move": noise[1]}
        for kind, records in attacks[:2] if args.smoke else attacks:
            label = f"{kind}, {records:,.0f} records"
            worst = (0.0, 0.0)
            for attacker in attackers:
                attack = forging(kind, attacker, len(width), records, rng)
                mean_move, sd_move = moves(merged(data, 1e4, groups, attack), clean, width)
                worst = (max(worst[0], mean_move), max(worst[1], sd_move))
            rows.setdefault(label, {})[arm] = {"mean_move": worst[0], "sd_move": worst[1]}
            print(f"{arm} {label}: {worst}", flush=True)
    evaluation = evaluation_attacks(data, arms, attackers, args.smoke)
    header = ["forged vector (one site)"] + [f"{m} ({arm})" for arm in arms
                                             for m in ("mean move / range", "SD move")]
    table = [[label, *[r[arm][k] for arm in arms for k in ("mean_move", "sd_move")]]
             for label, r in rows.items()]
    md = (f"# The statistics and evaluation rounds over secure sums: one forged site of "
          f"{n_sites}\n\n## The statistics round: merged means and SDs moved\n\n"
          f"Worst over which site forges; moves against the clean merge of the same arm "
          f"(epsilon 1e4: noise under a record); the first row is the noise alone at "
          f"epsilon 1.\n\n" + markdown_table(header, table))
    md += ("\n## The evaluation round: pooled AUC and calibration slope moved by one "
           "forged site (worst over which site)\n\n"
           + markdown_table(["forged vector (one site)"]
                            + [f"{m} ({arm})" for arm in arms
                               for m in ("AUC move", "slope move")],
                            [[label, *[r[arm][k] for arm in arms
                                       for k in ("auc_move", "slope_move")]]
                             for label, r in evaluation["moves"].items()])
           + "\nClean: " + "; ".join(f"{arm} AUC {m['auc']:.3f}, slope "
                                      f"{m['calibration_slope']:.3f}"
                                      for arm, m in evaluation["clean"].items()) + ".\n")
    write_results("secure_statistics", {"sites": n_sites, "group_size": size,
                                        "rows": rows, "evaluation": evaluation}, md)


if __name__ == "__main__":
    main()
