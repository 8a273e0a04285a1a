"""Simulator overhead: CardioFed's in-process backend vs a bare PyTorch loop.

Logistic regression on Framingham split IID into N = 4, 50 and 200 sites; 20 rounds of
FedAvg, one local epoch, batch 32, SGD lr 0.05. The bare loop does the same arithmetic
in one process with nothing else: load the global weights, run the site's mini-batches,
add ``n_k * (local - global)`` to a running sum, average. Each run is a fresh
subprocess so that peak memory (ru_maxrss) belongs to that run alone; both use one
PyTorch thread. Wall time is the
median of ``--repeats`` runs. Target: simulator within 1.5x of the bare loop at every N.

    python bench/simulation_overhead.py [--repeats 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402

SITE_COUNTS = (4, 50, 200)
ROUNDS = 20
SETTINGS = dict(model="logistic", algorithm="fedavg", rounds=ROUNDS, local_epochs=1,
                batch_size=32, lr=0.05, eval_every=0, seed=0,
                stop_patience=None)  # every round, as the bare loop runs them


def _iid_sites(n_sites: int, data_dir: str | None):  # type: ignore[no-untyped-def]
    from cardiofed.data.dataset import FederatedDataset, SiteData
    from cardiofed.data.framingham import load_framingham
    from cardiofed.simulation.prepare import prepare_federation

    fram = load_framingham(data_dir)
    x = np.concatenate([s.x_train for s in fram.sites])
    y = np.concatenate([s.y_train for s in fram.sites])
    order = np.random.default_rng(0).permutation(len(y))
    parts = np.array_split(order, n_sites)
    sites = [SiteData(name=f"site{k}", site_type="hospital", x_train=x[p], y_train=y[p],
                      x_test=x[p[:2]], y_test=y[p[:2]]) for k, p in enumerate(parts)]
    data = FederatedDataset(name="iid", feature_names=fram.feature_names,
                            feature_ranges=fram.feature_ranges, sites=sites, outcome="chd_10y")
    return prepare_federation(data, "global")


def _bare(sites) -> None:  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(sites[0].x_train.shape[1], 1)
    params = list(model.parameters())
    global_w = [p.detach().clone() for p in params]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.from_numpy(s.x_train), torch.from_numpy(s.y_train)) for s in sites]
    for _ in range(ROUNDS):
        acc = [torch.zeros_like(g) for g in global_w]
        total = 0
        for x, y in data:
            with torch.no_grad():
                for p, g in zip(params, global_w, strict=True):
                    p.copy_(g)
            opt = torch.optim.SGD(params, lr=0.05)
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                loss_fn(model(x[idx]).squeeze(-1), y[idx]).backward()
                opt.step()
            with torch.no_grad():
                for a, p, g in zip(acc, params, global_w, strict=True):
                    a += len(y) * (p - g)
            total += len(y)
        global_w = [g + a / total for g, a in zip(global_w, acc, strict=True)]


def _worker(kind: str, n_sites: int, data_dir: str | None) -> None:
    from _common import single_threaded

    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.runner import run_federated

    single_threaded()  # both loops alike
    sites = _iid_sites(n_sites, data_dir)
    start = time.perf_counter()
    if kind == "bare":
        _bare(sites)
    else:
        run_federated(sites, SimulationConfig.create(**SETTINGS))
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    counts = SITE_COUNTS[:1] if args.smoke else SITE_COUNTS
    if args.smoke:
        args.repeats = 1
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.data_dir)
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    for n in counts:
        for kind in ("bare", "cardiofed"):
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--worker", kind, str(n)]
                if args.data_dir:
                    cmd += ["--data-dir", args.data_dir]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            wall = statistics.median(r["wall_s"] for r in runs)
            results.setdefault(str(n), {})[kind] = {
                "total_s": wall, "per_round_s": wall / ROUNDS,
                "peak_mb": max(r["peak_mb"] for r in runs)}
    rows = []
    for n, r in results.items():
        ratio = r["cardiofed"]["total_s"] / r["bare"]["total_s"]
        r["ratio"] = {"time": ratio, "within_1.5x": float(ratio <= 1.5)}
        rows.append([n, r["bare"]["per_round_s"], r["cardiofed"]["per_round_s"],
                     r["bare"]["total_s"], r["cardiofed"]["total_s"], ratio,
                     r["bare"]["peak_mb"], r["cardiofed"]["peak_mb"]])
    md = ("## Simulation overhead: 20 rounds FedAvg, logistic regression, Framingham IID\n\n"
          + markdown_table(["N sites", "bare s/round", "CardioFed s/round", "bare total s",
                            "CardioFed total s", "ratio", "bare peak MB",
                            "CardioFed peak MB"], rows)
          + "\nPeak MB is the process's maximum resident set (Python, PyTorch and data "
            "included); time excludes start-up and data loading.\n")
    write_results("simulation_overhead", {"settings": SETTINGS, "repeats": args.repeats,
                                         "results": results}, md)


if __name__ == "__main__":
    main()
