"""The quick-start study's calibration at its sites, simulated.

docs/running.md walks through a networked study of three synthetic hospitals
(tier3_01, tier2_01, community_01) on private nodes with the default budget (epsilon 1
per study, delta 1e-5), the plan `cardiofed admin create-study` makes (the networked
defaults of :func:`cardiofed.coordinator.studies.network_plan`). The simulator runs the
same plan with the same DP mechanism (``backend = "loop"``: one site at a time, as nodes
train), with fresh secret noise each run. Per run and site: the calibration slope and
calibration-in-the-large with their 95% intervals and verdicts on the site's test split
(the simulation's exact view, whose intervals are narrower than those of the sites'
noisy evaluation releases), for the default 20 rounds and for 5.

Target (issue 31): calibration "acceptable" or "insufficient evidence" at every site.

    python bench/quickstart.py [--runs 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.coordinator.studies import network_plan  # noqa: E402
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.experiments.acceptability import (  # noqa: E402
    Verdict,
    acceptability_from_experiment,
    combined,
)
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import FEDERATED, run_experiment  # noqa: E402

SITES = ("tier3_01", "tier2_01", "community_01")
SHORT = {Verdict.ACCEPTABLE: "ok", Verdict.INSUFFICIENT: "?", Verdict.NOT_ACCEPTABLE: "no"}


def run_once(rounds: int, seed: int, size_scale: float) -> dict[str, Any]:
    data = synthetic_federation(seed=0, size_scale=size_scale)
    study = dataclasses.replace(data, sites=[data.site(s) for s in SITES])
    plan = network_plan(SimulationConfig.create(rounds=rounds, seed=seed, dp_epsilon=1.0,
                                                dp_delta=1e-5, backend="loop", eval_every=0),
                        len(SITES))
    report = acceptability_from_experiment(run_experiment(study, plan, baselines=False),
                                           model=FEDERATED)
    sites = {}
    for site, a in report.sites.items():
        _, slope, citl = a.checks
        sites[site] = {"slope": slope.value, "slope_ci": list(slope.interval),
                       "citl": citl.value, "citl_ci": list(citl.interval),
                       "calibration_verdict": str(combined((slope, citl)))}
    return sites


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    add_smoke(parser)
    args = parser.parse_args()
    schedules, runs, scale = ((20, 5), args.runs, 1.0) if not args.smoke else ((2,), 1, 0.2)
    payload: dict[str, Any] = {"sites": list(SITES), "runs": {}}
    rows, summary = [], []
    for rounds in schedules:
        results = [run_once(rounds, seed, scale) for seed in range(runs)]
        payload["runs"][str(rounds)] = results
        for k, sites in enumerate(results):
            rows.append([rounds, k, *(
                f"{s['slope']:.2f} / {s['citl']:+.2f} "
                f"{SHORT[Verdict(s['calibration_verdict'])]}" for s in sites.values())])
        bad = sum(s["calibration_verdict"] == Verdict.NOT_ACCEPTABLE
                  for sites in results for s in sites.values())
        summary.append(f"{rounds} rounds: {bad} of {runs * len(SITES)} site-runs "
                       f"\"not acceptable\" in calibration")
        print(summary[-1], flush=True)
    md = ("## The quick-start study at epsilon 1 per site: calibration slope / CITL and the "
          "verdict per site (ok, ? insufficient evidence, no)\n\n"
          + markdown_table(["rounds", "run", *SITES], rows) + "\n" + "; ".join(summary) + ".\n")
    write_results("quickstart", payload, md)


if __name__ == "__main__":
    main()
