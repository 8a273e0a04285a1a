"""Federated attribution against the truth and against a pooled analysis by statsmodels.

Each replication draws the synthetic intervention (:mod:`cardiofed.causal.design`: 12
sites, a confounded propensity, hazard ratio 0.75 on the D'Agostino 10-year risk) with
its own seed and runs the federated analysis (per-site sums only): IPTW and overlap
weights for the ATE and the ATT, 1:1 caliper matching within sites for the ATT. The
pooled reference puts every row in one table: statsmodels' logistic GLM for the
propensity, then statsmodels' weighted least squares of the outcome on treatment (the
weighted difference in means) with the same weights. Reported: the largest |federated -
pooled| risk difference, the 95% intervals' coverage of the design's true effect, the
largest post-adjustment |SMD|, and the seconds per federated analysis.

Loopback (``--loopback``, on by default): the same 12-site analysis (ATT: IPTW, overlap,
matching) as a networked study, a ``cardiofed coordinator`` process (SQLite) on
127.0.0.1 and one :class:`~cardiofed.node.agent.NodeAgent` per site in threads (its own
HTTP client and state, each computing its steps on its own rows as ``cardiofed node
run`` does); timed from the nodes' start to the result, per round from the
coordinator's own records, and compared with the simulation's estimate.

Private (``private_runs``): the private schedule with every site spending epsilon 1, 3
or 10 (delta 1e-5) on overlap weights and 0.05-trimmed IPTW for the ATE, each site with
its own noise, and over secure sums ("secure": one noise per step's sum, split over the
sites, ``secure_dropout`` 0.2): coverage of the truth, bias, interval width, and the
distance to the exact analysis.

    python bench/attribution.py [--replications 200] [--no-loopback]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402


def pooled_rd(x: np.ndarray, t: np.ndarray, y: np.ndarray, method: str, estimand: str
              ) -> float:
    """The weighted difference in means with statsmodels, on the pooled rows."""
    import statsmodels.api as sm

    design = sm.add_constant(x)
    e = sm.GLM(t, design, family=sm.families.Binomial()).fit().predict(design)
    if method == "overlap":
        w = np.where(t == 1, 1 - e, e)
    elif estimand == "ATT":
        w = np.where(t == 1, 1.0, e / (1 - e))
    else:
        w = np.where(t == 1, 1 / e, 1 / (1 - e))
    fit = sm.WLS(y, sm.add_constant(t.astype(float)), weights=w).fit()
    return float(fit.params[1])


def loopback(n_sites: int, seed: int, *, secure: bool = False) -> dict[str, Any]:
    """One networked attribution study over loopback, against its simulation: exact
    (ATT: IPTW, overlap, matching; nodes that opted in to exact attribution), or
    `secure` (the private schedule, overlap and IPTW trimmed at PRIVATE_TRIM, over secure
    sums; every node private with epsilon 1 for the study, the default node)."""
    import tempfile

    from network import Coordinator, run_nodes

    from cardiofed.causal.combine import run_attribution
    from cardiofed.causal.design import TREATMENT
    from cardiofed.causal.sources import synthetic_sites
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig
    from cardiofed.simulation.secure_attribution import run_secure_attribution

    sites, covariates = synthetic_sites(12, seed=seed)
    sites = sites[:n_sites]
    canonical = ["age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp",
                 "bp_treated", "current_smoker", "diabetes"]
    attribution: dict[str, Any] = {"treatment": TREATMENT, "covariates": canonical,
                                   "estimand": "ATT", "seed": seed}
    start = time.perf_counter()
    if secure:
        schedule = {"methods": ["overlap", "iptw"], "trim": PRIVATE_TRIM}
        attribution |= {"private": True, **schedule}
        simulated = run_secure_attribution(sites, covariates, epsilon=1.0, estimand="ATT",
                                           seed=seed, **schedule)
    else:
        simulated = run_attribution(sites, covariates, estimand="ATT", seed=seed)
    simulation_s = time.perf_counter() - start
    plan = {"attribution": attribution, "secure_aggregation": secure}
    names = [s.name for s in sites]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        coordinator = Coordinator(workdir, "attribution")

        def node(name: str) -> dict[str, Any]:
            if secure:
                return {"privacy": {"epsilon_max": 10.0, "study_epsilon": 1.0,
                                    "ledger_dir": str(workdir / f"ledger-{name}")}}
            return {"privacy": "off", "opt_in": ["exact_attribution"]}

        try:
            tokens = coordinator.create_study("att", names, plan, feature_names=None,
                                              feature_ranges=None, outcome="cvd_10y")
            agents = [NodeAgent(NodeConfig.create(
                coordinator_url=coordinator.url, state_dir=str(workdir / name),
                enrolment_token=tokens[name], poll_wait_s=30,
                data={"dataset": "synthetic", "site": name, "seed": seed}, **node(name)))
                for name in names]
            try:
                wall = run_nodes(agents, 600)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc} {coordinator.status('att')}") from None
            result = coordinator.client.get("/v1/studies/att/attribution").json()
            rounds = coordinator.rounds("att")
            server_errors = coordinator.server_errors()
            for a in agents:
                a.client.close()
        finally:
            coordinator.stop()
    differences = {m: abs(result["estimate"][m]["risk_difference"] - e.risk_difference)
                   for m, e in simulated.effects.items()}
    analysis_s = (rounds[-1][3] - rounds[0][2]).total_seconds()  # type: ignore[operator]
    return {"analysis": "epsilon 1, secure sums" if secure else "exact",
            "sites": n_sites, "simulation_s": simulation_s, "loopback_wall_s": wall,
            "loopback_rounds": len(rounds), "first_round_open_to_last_close_s": analysis_s,
            "round_s_median": float(np.median([(c - o).total_seconds()
                                               for _, _, o, c in rounds if c])),
            "max_abs_networked_minus_simulated_rd": max(differences.values()),
            "coordinator_5xx": server_errors}


def matched_truth(result: Any, n_sites: int, seed: int) -> float:
    """The true effect in the treated that matching matched: the design's risks of those
    patients, the matches redone as each site made them."""
    from cardiofed.causal.design import synthetic_intervention
    from cardiofed.causal.estimators import caliper_of, match_within_site
    from cardiofed.causal.study import matching_order

    truth_sites = synthetic_intervention(n_sites, seed=seed)  # synthetic_sites' draw
    x = np.vstack([s.x for s in truth_sites])
    model = result.propensity
    caliper = caliper_of(model, len(x), x.sum(axis=0), x.T @ x)
    effects = []
    for index, s in enumerate(truth_sites):
        pairs = match_within_site(model.logit(s.x), s.treated, caliper,
                                  matching_order(seed, index))
        effects.append(s.risk_treated[pairs[:, 0]] - s.risk_untreated[pairs[:, 0]])
    return float(np.mean(np.concatenate(effects)))


EPSILONS = (1.0, 3.0, 10.0)
PRIVATE_TRIM = 0.05


def private_runs(replications: int, n_sites: int, truth: Any) -> dict[str, Any]:
    """The private schedule (ATE: overlap weights, IPTW trimmed at PRIVATE_TRIM) with
    every site spending epsilon at delta 1e-5, against the truth and against the exact
    analysis of the same replication (same trim)."""
    from cardiofed.causal.combine import run_attribution
    from cardiofed.causal.sources import synthetic_sites
    from cardiofed.simulation.secure_attribution import run_secure_attribution

    methods = ["overlap", "iptw"]
    target = {"overlap": truth.ato_rd, "iptw": truth.ate_rd}
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    arms = [("exact", None, None)] + [
        (f"epsilon {eps:g}{' secure' if secure else ''}", eps, 0.2 if secure else None)
        for eps in EPSILONS for secure in (False, True)]
    for r in range(replications):
        sites, covariates = synthetic_sites(n_sites, seed=r)
        exact = run_attribution(sites, covariates, estimand="ATE", methods=methods,
                                trim=PRIVATE_TRIM).effects
        for arm, eps, dropout in arms:
            settings = {"estimand": "ATE", "methods": methods, "trim": PRIVATE_TRIM}
            result = (run_attribution(sites, covariates, epsilon=eps, **settings)
                      if dropout is None else run_secure_attribution(
                          sites, covariates, epsilon=eps, secure_dropout=dropout,
                          **settings)).effects
            for m in methods:
                e, row = result[m], rows.setdefault((arm, m), {k: [] for k in (
                    "covered", "estimate", "width", "diff")})
                row["covered"].append(e.rd_low <= target[m] <= e.rd_high)
                row["estimate"].append(e.risk_difference)
                row["width"].append(e.rd_high - e.rd_low)
                row["diff"].append(abs(e.risk_difference - exact[m].risk_difference))
    return {f"{arm} {m}": {
        "truth_rd": target[m], "coverage": float(np.mean(v["covered"])),
        "bias": float(np.mean(v["estimate"]) - target[m]),
        "median_ci_width": float(np.median(v["width"])),
        "median_abs_private_minus_exact": float(np.median(v["diff"]))}
        for (arm, m), v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=200)
    parser.add_argument("--sites", type=int, default=12)
    parser.add_argument("--loopback", action=argparse.BooleanOptionalAction, default=True)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.replications, args.loopback = 2, False
    from cardiofed.causal.combine import run_attribution
    from cardiofed.causal.design import design_truth
    from cardiofed.causal.sources import synthetic_sites
    from cardiofed.causal.study import SMD_LIMIT

    truth = design_truth(args.sites)
    target = {("ATE", "iptw"): truth.ate_rd, ("ATT", "iptw"): truth.att_rd,
              ("ATT", "matching"): truth.att_rd, ("ATE", "overlap"): truth.ato_rd}
    runs = {key: {"covered": 0, "max_pooled_diff": 0.0, "max_smd": 0.0, "estimates": []}
            for key in target}
    seconds, matched_covered = [], 0
    for r in range(args.replications):
        sites, covariates = synthetic_sites(args.sites, seed=r)
        x = np.vstack([s.x for s in sites])
        t = np.concatenate([s.treated for s in sites])
        y = np.concatenate([s.outcome for s in sites])
        for estimand, methods in (("ATE", ["iptw", "overlap"]), ("ATT", ["iptw", "matching"])):
            start = time.perf_counter()
            result = run_attribution(sites, covariates, estimand=estimand,
                                     methods=methods, seed=r)
            seconds.append(time.perf_counter() - start)
            for method in methods:
                e, row = result.effects[method], runs[(estimand, method)]
                row["covered"] += e.rd_low <= target[(estimand, method)] <= e.rd_high
                row["estimates"].append(e.risk_difference)
                row["max_smd"] = max(row["max_smd"],
                                     float(np.max(np.abs(result.balance[method]))))
                if method != "matching":  # matching is within sites: no pooled twin
                    row["max_pooled_diff"] = max(row["max_pooled_diff"], abs(
                        e.risk_difference - pooled_rd(x, t, y, method, estimand)))
                else:
                    matched_covered += (e.rd_low <= matched_truth(result, args.sites, r)
                                        <= e.rd_high)
    out: dict[str, Any] = {"replications": args.replications, "sites": args.sites,
                           "truth": truth.__dict__, "seconds_per_analysis_median":
                           float(np.median(seconds)), "estimators": {},
                           "matching_coverage_of_the_matched_treated_effect":
                           matched_covered / args.replications}
    rows = []
    for (estimand, method), row in runs.items():
        coverage = row["covered"] / args.replications
        bias = float(np.mean(row["estimates"]) - target[(estimand, method)])
        out["estimators"][f"{estimand} {method}"] = {
            "truth_rd": target[(estimand, method)], "mean_rd": float(np.mean(row["estimates"])),
            "bias": bias, "coverage": coverage, "max_abs_federated_minus_pooled":
            None if method == "matching" else row["max_pooled_diff"],
            "max_abs_smd_after": row["max_smd"]}
        rows.append([f"{estimand} {method}", target[(estimand, method)],
                     float(np.mean(row["estimates"])), bias, coverage,
                     "-" if method == "matching" else f"{row['max_pooled_diff']:.1e}",
                     row["max_smd"]])
    md = (f"## Federated attribution: {args.replications} replications of the synthetic "
          f"intervention, {args.sites} sites\n\n"
          + markdown_table(["estimand / method", "true RD", "mean RD", "bias",
                            "95% CI coverage", "max |federated - pooled (statsmodels)|",
                            f"max |SMD| after (< {SMD_LIMIT})"], rows, 4)
          + f"\n\nMatching estimates the effect in the treated it matched: its intervals "
            f"cover that effect (from the design's true risks of those patients) in "
            f"{matched_covered / args.replications:.3f} of the replications.\n"
          + f"\nMedian seconds per federated analysis (12 sites, simulation): "
            f"{np.median(seconds):.3f}.\n")
    out["private"] = private = private_runs(args.replications, args.sites, truth)
    md += (f"\n## Private schedule: every site spends epsilon (delta 1e-5) on {PRIVATE_TRIM:g}"
           f"-trimmed IPTW and overlap weights (ATE), with its own noise or over secure "
           f"sums ('secure'); 'exact' is the non-private analysis with the same trim\n\n"
           + markdown_table(["analysis / method", "true RD", "bias", "95% CI coverage",
                             "median CI width", "median |private - exact|"],
                            [[k, v["truth_rd"], v["bias"], v["coverage"], v["median_ci_width"],
                              v["median_abs_private_minus_exact"]]
                             for k, v in private.items()], 4) + "\n")
    if args.loopback:
        out["loopback"] = runs = [loopback(args.sites, seed=0, secure=secure)
                                  for secure in (False, True)]
        md += ("\n## The same analysis as a networked study over loopback (exact: ATT by "
               "IPTW, overlap and matching; secure: the private schedule's overlap and IPTW "
               "at epsilon 1 per site over secure sums; each site's noise is fresh, so a "
               "secure run differs from its simulation by that noise)\n\n"
               + markdown_table(["analysis", "sites", "simulation s", "loopback wall s "
                                 "(nodes' start to result)", "rounds", "median s per round",
                                 "max |networked - simulated| RD", "coordinator 5xx"],
                                [[run["analysis"], run["sites"], run["simulation_s"],
                                  run["loopback_wall_s"], run["loopback_rounds"],
                                  run["round_s_median"],
                                  f"{run['max_abs_networked_minus_simulated_rd']:.1e}",
                                  run["coordinator_5xx"]] for run in runs], 3) + "\n")
    write_results("attribution", out, md)


if __name__ == "__main__":
    main()
