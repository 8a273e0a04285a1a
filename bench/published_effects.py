"""A published causal effect on a continuous outcome, reproduced federated across sites.

NHEFS (the NHANES I Epidemiologic Follow-up Study; 1,566 complete cases as shipped in the
``causaldata`` package): the average causal effect of quitting smoking between 1971 and
1982 (qsmk) on weight gain over the period (wt82_71, kg). Hernan MA, Robins JM. Causal
Inference: What If. Chapman & Hall/CRC, 2020, section 12.2: inverse probability
weighting with the propensity model of sex, race, age, education, smoking intensity and
years, exercise, activity and baseline weight (quadratic terms for the continuous ones)
gives 3.4 kg (95% CI 2.4 to 4.5).

The rows are split at random into 4 sites of unequal size (5 different splits); every
site computes sums only (:mod:`cardiofed.causal`). Reported: the federated IPTW estimate
of the ATE and its sandwich interval, the same estimate by statsmodels on the pooled rows
(logistic propensity, then weighted least squares), the largest difference over the
splits, and the overlap-weighted estimate beside it.

The same people followed for death from January 1983 to December 1992 (months; alive at
the end: censored at 120): the IP-weighted risk of death by 120 months in each arm, their
difference and the marginal hazard ratio (:mod:`cardiofed.causal.survival`), with 95%
bootstrap intervals (200 resamples, each site resampling its own rows), on split 0, and
the same computation with every row at one site. No published figure is compared here.

    python bench/published_effects.py
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
from attribution import pooled_rd  # noqa: E402

from cardiofed.causal.combine import run_attribution  # noqa: E402
from cardiofed.causal.sources import (  # noqa: E402
    NHEFS_PUBLISHED,
    nhefs_sites,
    nhefs_survival_sites,
)
from cardiofed.causal.survival import SurvivalSite, survival_effect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smoke(parser)
    args = parser.parse_args()
    splits = (0,) if args.smoke else (0, 1, 2, 3, 4)
    runs: list[dict[str, Any]] = []
    for seed in splits:
        sites, covariates = nhefs_sites(4, seed=seed)
        started = time.perf_counter()
        result = run_attribution(sites, covariates, estimand="ATE",
                                 methods=["iptw", "overlap"], outcome="continuous")
        seconds = time.perf_counter() - started
        x = np.vstack([s.x for s in sites])
        t = np.concatenate([s.treated for s in sites])
        y = np.concatenate([s.outcome for s in sites])
        iptw, overlap = result.effects["iptw"], result.effects["overlap"]
        runs.append({"split": seed, "sites": [len(s.outcome) for s in sites],
                     "iptw": [iptw.risk_difference, iptw.rd_low, iptw.rd_high],
                     "overlap": [overlap.risk_difference, overlap.rd_low, overlap.rd_high],
                     "pooled_statsmodels_iptw": pooled_rd(x, t, y, "iptw", "ATE"),
                     "seconds": seconds})
    worst = max(abs(r["iptw"][0] - r["pooled_statsmodels_iptw"]) for r in runs)
    inside = all(NHEFS_PUBLISHED["low"] <= r["iptw"][0] <= NHEFS_PUBLISHED["high"]
                 for r in runs)
    rows = [[r["split"], " / ".join(map(str, r["sites"])),
             f"{r['iptw'][0]:.3f} [{r['iptw'][1]:.3f}, {r['iptw'][2]:.3f}]",
             f"{r['pooled_statsmodels_iptw']:.3f}",
             f"{abs(r['iptw'][0] - r['pooled_statsmodels_iptw']):.1e}",
             f"{r['overlap'][0]:.3f} [{r['overlap'][1]:.3f}, {r['overlap'][2]:.3f}]",
             f"{r['seconds']:.2f}"] for r in runs]
    md = ("## NHEFS: quitting smoking and weight gain (kg), ATE, federated over 4 sites\n\n"
          f"Published (Hernan & Robins, Causal Inference: What If, section 12.2): "
          f"{NHEFS_PUBLISHED['effect']} kg, 95% CI {NHEFS_PUBLISHED['low']} to "
          f"{NHEFS_PUBLISHED['high']}.\n\n"
          + markdown_table(["split", "patients per site", "federated IPTW [95% CI]",
                            "pooled statsmodels IPTW", "abs difference",
                            "federated overlap weights [95% CI]", "seconds"], rows)
          + f"\nLargest |federated - pooled| {worst:.1e}; every federated estimate inside "
            f"the published interval: {'yes' if inside else 'no'}.\n")
    survival, survival_md = _survival(20 if args.smoke else 200)
    write_results("published_effects", {"published": NHEFS_PUBLISHED, "runs": runs,
                                        "max_abs_federated_minus_pooled": worst,
                                        "inside_published_interval": inside,
                                        "survival": survival}, md + survival_md)


def _survival(resamples: int) -> tuple[dict[str, Any], str]:
    sites = nhefs_survival_sites(4, seed=0)
    started = time.perf_counter()
    effect = survival_effect(sites, horizon=120.0, resamples=resamples, seed=0)
    seconds = time.perf_counter() - started
    pooled = SurvivalSite("all", *(np.concatenate([getattr(s, f) for s in sites])
                                   for f in ("x", "treated", "time", "event")))
    alone = survival_effect([pooled], horizon=120.0, resamples=0)
    gap = max(abs(effect.difference - alone.difference),
              abs(effect.hazard_ratio - alone.hazard_ratio))
    out = {"risk_treated": effect.risk_treated, "risk_control": effect.risk_control,
           "difference": effect.difference, "difference_ci": list(effect.difference_interval),
           "hazard_ratio": effect.hazard_ratio, "hazard_ratio_ci":
           list(effect.hazard_ratio_interval), "resamples": effect.resamples,
           "max_abs_federated_minus_one_site": gap, "seconds": seconds,
           "deaths": int(sum(s.event.sum() for s in sites))}
    low, high = effect.difference_interval
    hr_low, hr_high = effect.hazard_ratio_interval
    md = ("\n## NHEFS: quitting smoking and death by 120 months, ATE (IPTW), 4 sites\n\n"
          + markdown_table(["risk quitters", "risk non-quitters", "difference [95% CI]",
                            "hazard ratio [95% CI]", "deaths", "bootstrap resamples",
                            "max abs federated - one site", "seconds"],
                           [[f"{effect.risk_treated:.4f}", f"{effect.risk_control:.4f}",
                             f"{effect.difference:+.4f} [{low:+.4f}, {high:+.4f}]",
                             f"{effect.hazard_ratio:.3f} [{hr_low:.3f}, {hr_high:.3f}]",
                             out["deaths"], effect.resamples, f"{gap:.1e}",
                             f"{seconds:.1f}"]]))
    return out, md


if __name__ == "__main__":
    main()
