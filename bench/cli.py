"""The command line's own speed: help screens, and the demo beside a busy process.

* ``cardiofed --help`` and every command's ``--help``: wall time of a fresh process,
  median of 5 (target < 1 s; the commands import what they need only when they run).
* ``cardiofed demo --no-register``: wall time alone (median of 3; target < 25 s) and
  with one CPU-bound process beside it (a pure-Python loop, the kind of neighbour a
  shared hospital server has); target: within 1.5x of the quiet time (one PyTorch
  thread per process, so neither starves the other).
* the same demo with ``--dp-epsilon 1`` (every site's releases under DP), alone;
  target: within 2x of the non-private demo.
* ``cardiofed check`` on a 1,000-row export with its mapping, and ``cardiofed predict``
  of a logistic model on 1,000 rows: wall time of a fresh process, median of 5 (target
  < 1 s each; neither loads PyTorch, a logistic regression scores with NumPy).

    python bench/cli.py [--repeats 5] [--demo-args "..."]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402

COMMANDS = ["", "demo", "simulate", "check", "audit", "coordinator", "status",
            "admin create-study", "node run", "node audit", "node ledger",
            "node reset-ledger", "serve", "predict",
            "models list", "keys create"]
CARDIOFED = [sys.executable, "-m", "cardiofed.cli"]


def _wall(args: list[str], cwd: str | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - started


def _busy(stop: multiprocessing.synchronize.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def _work(folder: Path, repeats: int) -> list[list[object]]:
    """Median and max wall time of check and predict on 1,000 rows."""
    import pandas as pd

    from cardiofed.data.mapping import harmonise
    from cardiofed.data.synthetic import default_profiles, generate_exports, synthetic_federation
    from cardiofed.serving import provenance
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import run_experiment

    survey = Path(__file__).resolve().parents[1] / "examples" / "survey"
    site = pd.read_csv(survey / "site_a.csv", dtype=str, keep_default_na=False)
    pd.concat([site] * 2, ignore_index=True)[:1000].to_csv(folder / "export.csv", index=False)
    export = generate_exports(default_profiles(1), seed=0)[0]
    rows = pd.concat([export.raw] * (-(-1000 // len(export.raw))), ignore_index=True)[:1000]
    harmonise(rows, export.mapping, labels=False).frame.to_csv(folder / "patients.csv",
                                                                index=False)
    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.3)
    result = run_experiment(data, SimulationConfig.create(rounds=2, eval_every=0),
                            baselines=False)
    provenance.from_experiment(result, study="bench", feature_names=data.feature_names,
                               outcome=data.outcome).save(folder / "model.safetensors")
    out = []
    for name, command in (
            ("cardiofed check (1,000 rows, 17 features)",
             ["check", "--csv", "export.csv", "--mapping", str(survey / "site_a.toml"),
              "--features", str(survey / "features.toml")]),
            ("cardiofed predict, logistic (1,000 rows)",
             ["predict", "patients.csv", "--model", "model.safetensors", "--out",
              "risks.csv", "--max-rejected", "1"])):
        times = [_wall([*CARDIOFED, *command], cwd=str(folder)) for _ in range(repeats)]
        out.append([name, statistics.median(times), max(times)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-args", default="--no-register")
    add_smoke(parser)
    args = parser.parse_args()
    commands = COMMANDS
    if args.smoke:  # the demo's own run is tests/test_estimator_cli.py's
        args.repeats, commands, args.demo_args = 1, COMMANDS[:2], "--help"
    help_rows = []
    for command in commands:
        times = [_wall([*CARDIOFED, *command.split(), "--help"]) for _ in range(args.repeats)]
        help_rows.append([f"cardiofed {command} --help".replace("  ", " "),
                          statistics.median(times), max(times)])
    demo = [*CARDIOFED, "demo", *shlex.split(args.demo_args)]
    with tempfile.TemporaryDirectory() as folder:
        quiet_runs = [_wall(demo, cwd=folder) for _ in range(1 if args.smoke else 3)]
        quiet = statistics.median(quiet_runs)
        stop = multiprocessing.Event()
        neighbour = multiprocessing.Process(target=_busy, args=(stop,))
        neighbour.start()
        try:
            busy = _wall(demo, cwd=folder)
        finally:
            stop.set()
            neighbour.join()
        private = _wall([*demo, "--dp-epsilon", "1"], cwd=folder)
        work = _work(Path(folder), args.repeats)
    ratio = busy / quiet
    slowest_work = max(r[1] for r in work)
    dp_ratio = private / quiet
    slowest = max(r[1] for r in help_rows)
    md = (f"## Help screens (fresh process, median of {args.repeats})\n\n"
          + markdown_table(["command", "median s", "max s"], help_rows)
          + f"\nSlowest median {slowest:.2f} s (target < 1 s: "
            f"{'met' if slowest < 1 else 'missed'}).\n\n"
          + "## The demo beside a CPU-bound process\n\n"
          + markdown_table(["run", "wall s"], [["alone (median of "
                                                f"{len(quiet_runs)})", quiet],
                                               ["beside a busy process", busy]])
          + f"\nAlone {quiet:.1f} s (target < 25 s: {'met' if quiet < 25 else 'missed'}; "
            f"runs {', '.join(f'{t:.1f}' for t in quiet_runs)} s). "
            f"Ratio {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'missed'}).\n\n"
          + "## The demo with differential privacy (--dp-epsilon 1)\n\n"
          + markdown_table(["run", "wall s"], [["without DP", quiet], ["epsilon 1", private]])
          + f"\nRatio {dp_ratio:.2f} (target <= 2: "
            f"{'met' if dp_ratio <= 2 else 'missed'}).\n\n"
          + f"## Checking and scoring 1,000 rows (fresh process, median of {args.repeats})\n\n"
          + markdown_table(["command", "median s", "max s"], work)
          + f"\nSlowest median {slowest_work:.2f} s (target < 1 s: "
            f"{'met' if slowest_work < 1 else 'missed'}).\n")
    write_results("cli", {"help": help_rows, "demo_quiet_s": quiet,
                          "demo_quiet_runs_s": quiet_runs, "demo_busy_s": busy,
                          "ratio": ratio, "demo_dp_s": private, "dp_ratio": dp_ratio,
                          "work": work,
                          "demo_args": args.demo_args}, md)


if __name__ == "__main__":
    main()
