"""The peer: Flower's simulation engine (Ray) on the same task as bench/national_scale.py.

The national federation at 200 sites, preprocessed by CardioFed, each site's rows saved
for Flower; Flower 1.x runs FedAvg of logistic regression with one local epoch of
mini-batch SGD (batch 32, lr 0.05) in NumPy clients (bench/_flower_lr.py), 5 rounds;
its seconds per round (between successive aggregations) beside CardioFed's vectorised and
per-site backends (bench/results/national_scale.json). Flower is not a CardioFed
dependency: give the interpreter of an environment that has ``flwr[simulation]``.

    python -m venv /tmp/flwr && /tmp/flwr/bin/pip install "flwr[simulation]" numpy
    python bench/flower_peer.py --flower-python /tmp/flwr/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import markdown_table, results_dir, write_results  # noqa: E402

from cardiofed.data.national import national_federation  # noqa: E402
from cardiofed.simulation.prepare import prepare_federation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-python", required=True)
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sites = prepare_federation(national_federation(args.sites, seed=0))
    with tempfile.TemporaryDirectory() as folder:
        data, out = Path(folder) / "sites.npz", Path(folder) / "flower.json"
        np.savez(data, n_sites=len(sites), **{f"x{k}": s.x_train for k, s in enumerate(sites)},
                 **{f"y{k}": s.y_train for k, s in enumerate(sites)})
        subprocess.run([args.flower_python, str(HERE / "_flower_lr.py"), str(data),
                        str(args.rounds), str(out)], check=True, capture_output=True)
        flower = json.loads(out.read_text())
    ours = json.loads((results_dir() / "national_scale.json").read_text())["results"]
    mine = {r["backend"]: r for r in ours if r["n_sites"] == args.sites}
    flower_round = float(np.median(flower["round_s"]))
    rows = [["Flower (Ray), NumPy clients", flower_round,
             f"driver {flower['peak_rss_mb_driver']:.0f}, largest worker "
             f"{flower['peak_rss_mb_children']:.0f}"]]
    rows += [[f"CardioFed, {b}", r["round_s"], f"{r['peak_rss_mb']:.0f}"]
             for b, r in mine.items()]
    speedup = flower_round / mine["vectorised"]["round_s"]
    md = (markdown_table([f"{args.sites} sites, one FedAvg round", "seconds per round",
                          "peak RSS MB"], rows)
          + f"\nCardioFed's vectorised backend is {speedup:.0f}x faster per round than Flower "
            f"(target >= 100x: {'met' if speedup >= 100 else 'missed'}).\n")
    write_results("flower_peer", {"flower": flower, "cardiofed": mine, "speedup": speedup}, md)


if __name__ == "__main__":
    main()
