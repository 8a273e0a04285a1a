"""The privacy audit of a federation, as ``cardiofed audit`` runs it, with its provenance.

The synthetic demo cohort (12 hospitals), 5 federated rounds, each site's DP epsilon 1:
canary records searched for in every payload that leaves a site (federation run without
noise, so a leak would arrive bit-exact), membership inference against the released
model, and inversion of a site's update; each audit with its positive control in the
same run (``cardiofed.experiments.privacy_audit.run_audit``).

    python bench/audit.py [--dp-epsilon 1] [--rounds 5] [--sites 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, single_threaded, write_results  # noqa: E402


def main() -> None:
    from cardiofed.data.catalog import load_dataset
    from cardiofed.experiments.privacy_audit import run_audit
    from cardiofed.simulation.config import SimulationConfig

    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp-epsilon", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=12)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.sites = 1, 3
    config = SimulationConfig.create(rounds=args.rounds, seed=0, dp_epsilon=args.dp_epsilon)
    data = load_dataset("synthetic", seed=0, n_sites=args.sites)
    report = run_audit(data, config, epsilon=args.dp_epsilon, seed=0)
    write_results("audit", report.to_dict(), report.to_markdown())


if __name__ == "__main__":
    main()
