"""The peer: Flower's simulation engine (Ray) on the same task as bench/national_scale.py.

The national federation at 200 sites, preprocessed by CardioFed, each site's rows saved
for Flower; Flower 1.x runs FedAvg of logistic regression with one local epoch of
mini-batch SGD (batch 32, lr 0.05) in NumPy clients (bench/_flower_lr.py), 5 rounds;
its seconds per round (between successive aggregations) beside CardioFed's vectorised and
per-site backends (bench/results/national_scale.json). Flower is not a CardioFed
dependency: give the interpreter of an environment that has ``flwr[simulation]``.

    python -m venv /tmp/flwr && /tmp/flwr/bin/pip install "flwr[simulation]" numpy
    python bench/flower_peer.py --flower-python /tmp/flwr/bin/python

``--flower-python`` defaults to ``$CARDIOFED_BENCH_FLOWER_PYTHON``; the test suite smokes
the script (4 sites, 1 round) where that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import add_smoke, markdown_table, results_dir, write_results  # noqa: E402

from cardiofed.data.national import national_federation  # noqa: E402
from cardiofed.simulation.prepare import prepare_federation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-python", default=os.environ.get("CARDIOFED_BENCH_FLOWER_PYTHON"))
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    add_smoke(parser)
    args = parser.parse_args()
    if not args.flower_python:
        parser.error("--flower-python (or CARDIOFED_BENCH_FLOWER_PYTHON) must name the "
                     "interpreter of an environment with flwr[simulation]")
    if args.smoke:
        args.sites, args.rounds = 4, 1
    sites = prepare_federation(national_federation(args.sites, seed=0))
    with tempfile.TemporaryDirectory() as folder:
        data, out = Path(folder) / "sites.npz", Path(folder) / "flower.json"
        np.savez(data, n_sites=len(sites), **{f"x{k}": s.x_train for k, s in enumerate(sites)},
                 **{f"y{k}": s.y_train for k, s in enumerate(sites)})
        subprocess.run([args.flower_python, str(HERE / "_flower_lr.py"), str(data),
                        str(args.rounds), str(out)], check=True, capture_output=True)
        flower = json.loads(out.read_text())
    national = results_dir() / "national_scale.json"
    ours = json.loads(national.read_text())["results"] if national.is_file() else []
    mine = {r["backend"]: r for r in ours if r["n_sites"] == args.sites}
    flower_round = float(np.median(flower["round_s"]))
    rows = [["Flower (Ray), NumPy clients", flower_round,
             f"driver {flower['peak_rss_mb_driver']:.0f}, largest worker "
             f"{flower['peak_rss_mb_children']:.0f}"]]
    rows += [[f"CardioFed, {b}", r["round_s"], f"{r['peak_rss_mb']:.0f}"]
             for b, r in mine.items()]
    table = markdown_table([f"{args.sites} sites, one FedAvg round", "seconds per round",
                            "peak RSS MB"], rows)
    speedup = None
    if "vectorised" in mine:
        speedup = flower_round / mine["vectorised"]["round_s"]
        md = table + (f"\nCardioFed's vectorised backend is {speedup:.0f}x faster per round "
                      f"than Flower (target >= 100x: {'met' if speedup >= 100 else 'missed'}).\n")
    else:
        md = table + (f"\nNo CardioFed figures at {args.sites} sites in {national.name}: run "
                      f"bench/national_scale.py first.\n")
    write_results("flower_peer", {"flower": flower, "cardiofed": mine, "speedup": speedup}, md)


if __name__ == "__main__":
    main()
