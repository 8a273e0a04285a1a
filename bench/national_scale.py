"""National scale in simulation: one FedAvg round over up to 36,000 institutions.

The national federation (cardiofed.data.national: the size mix of a country's
hospitals) at 200, 2,000 and 36,000 sites; logistic regression, one local epoch, batch
32, SGD lr 0.05. For each size and backend ("vectorised": every site of the round
trained at once; "loop": one site after another, the reference), in a fresh process:
seconds to generate and to prepare (federated statistics), seconds for one round (the
second of two: local training of every site plus the server step; evaluation excluded),
the process's
peak memory, and where both backends ran, the largest difference between their models.
Targets: one round at 36,000 sites <= 5 s vectorised.

    python bench/national_scale.py [--sizes 200,2000,36000] [--loop-up-to 36000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402


def worker(n_sites: int, backend: str, out: Path) -> None:
    """One size and backend, in this process: timings, peak memory, the model."""
    from cardiofed.data.national import national_federation
    from cardiofed.models.networks import set_threads
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.prepare import prepare_federation
    from cardiofed.simulation.runner import run_federated

    set_threads()
    started = time.perf_counter()
    data = national_federation(n_sites, seed=0)
    generated = time.perf_counter()
    sites = prepare_federation(data)
    prepared = time.perf_counter()
    # Two rounds; the second is timed (the first also builds the model and the optimiser).
    config = SimulationConfig.create(rounds=2, local_epochs=1, batch_size=32, lr=0.05,
                                     seed=0, eval_every=0, backend=backend)
    marks: list[float] = []
    run = run_federated(sites, config, on_round=lambda r, w: marks.append(time.perf_counter()))
    rows = sum(s.n_train for s in sites)
    result = {"n_sites": n_sites, "backend": backend, "train_rows": rows,
              "generate_s": generated - started, "prepare_s": prepared - generated,
              "round_s": marks[1] - marks[0],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "pooled_auc": run.history[-1]["pooled_auc"],
              "weights": {k: v.ravel().tolist() for k, v in run.weights.items()}}
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,2000,36000")
    parser.add_argument("--loop-up-to", type=int, default=36_000)
    parser.add_argument("--worker", nargs=3, metavar=("SITES", "BACKEND", "OUT"))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.loop_up_to = "20", 20
    if args.worker:
        worker(int(args.worker[0]), args.worker[1], Path(args.worker[2]))
        return
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        for backend in ("vectorised", "loop"):
            if backend == "loop" and n > args.loop_up_to:
                continue
            out = Path(f"/tmp/national-{n}-{backend}.json")
            subprocess.run([sys.executable, __file__, "--worker", str(n), backend, str(out)],
                           check=True)
            results.append(json.loads(out.read_text()))
            print(f"{n} sites, {backend}: round {results[-1]['round_s']:.2f} s", flush=True)
    rows = []
    for r in results:
        twin = next((o for o in results if o["n_sites"] == r["n_sites"]
                     and o["backend"] != r["backend"]), None)
        diff = (max(float(np.max(np.abs(np.array(r["weights"][k]) - np.array(twin["weights"][k]))))
                    for k in r["weights"]) if twin else float("nan"))
        r["max_weight_difference"] = diff
        rows.append([f"{r['n_sites']:,}", r["backend"], f"{r['train_rows']:,}",
                     r["generate_s"], r["prepare_s"], r["round_s"], r["peak_rss_mb"],
                     r["pooled_auc"], f"{diff:.1e}" if twin else "–"])
    big = next((r for r in results if r["n_sites"] == 36_000 and r["backend"] == "vectorised"),
               None)
    verdict = ("" if big is None else
               f"\nOne round at 36,000 institutions, vectorised: {big['round_s']:.2f} s "
               f"(target <= 5 s: {'met' if big['round_s'] <= 5 else 'missed'}), peak "
               f"{big['peak_rss_mb']:,.0f} MB.\n")
    md = markdown_table(["sites", "backend", "training rows", "generate s", "prepare s",
                         "one round s", "peak RSS MB", "pooled AUC after 2 rounds",
                         "max |w - w(other backend)|"], rows) + verdict
    for r in results:
        r.pop("weights")
    write_results("national_scale", {"results": results}, md)


if __name__ == "__main__":
    main()
