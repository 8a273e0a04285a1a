"""The command line's own speed: help screens, and the demo beside a busy process.

* ``cardiofed --help`` and every command's ``--help``: wall time of a fresh process,
  median of 5 (target < 1 s; the commands import what they need only when they run).
* ``cardiofed demo --no-register``: wall time alone and with one CPU-bound process
  beside it (a pure-Python loop, the kind of neighbour a shared hospital server has);
  target: within 1.5x of the quiet time (one PyTorch thread per process, so neither
  starves the other).
* the same demo with ``--dp-epsilon 1`` (every site's releases under DP), alone;
  target: within 2x of the non-private demo.

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
from _common import markdown_table, write_results  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo-args", default="--no-register")
    args = parser.parse_args()
    help_rows = []
    for command in COMMANDS:
        times = [_wall([*CARDIOFED, *command.split(), "--help"]) for _ in range(args.repeats)]
        help_rows.append([f"cardiofed {command} --help".replace("  ", " "),
                          statistics.median(times), max(times)])
    demo = [*CARDIOFED, "demo", *shlex.split(args.demo_args)]
    with tempfile.TemporaryDirectory() as folder:
        quiet = _wall(demo, cwd=folder)
        stop = multiprocessing.Event()
        neighbour = multiprocessing.Process(target=_busy, args=(stop,))
        neighbour.start()
        try:
            busy = _wall(demo, cwd=folder)
        finally:
            stop.set()
            neighbour.join()
        private = _wall([*demo, "--dp-epsilon", "1"], cwd=folder)
    ratio = busy / quiet
    dp_ratio = private / quiet
    slowest = max(r[1] for r in help_rows)
    md = (f"## Help screens (fresh process, median of {args.repeats})\n\n"
          + markdown_table(["command", "median s", "max s"], help_rows)
          + f"\nSlowest median {slowest:.2f} s (target < 1 s: "
            f"{'met' if slowest < 1 else 'missed'}).\n\n"
          + "## The demo beside a CPU-bound process\n\n"
          + markdown_table(["run", "wall s"], [["alone", quiet], ["beside a busy process",
                                                                 busy]])
          + f"\nRatio {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'missed'}).\n\n"
          + "## The demo with differential privacy (--dp-epsilon 1)\n\n"
          + markdown_table(["run", "wall s"], [["without DP", quiet], ["epsilon 1", private]])
          + f"\nRatio {dp_ratio:.2f} (target <= 2: "
            f"{'met' if dp_ratio <= 2 else 'missed'}).\n")
    write_results("cli", {"help": help_rows, "demo_quiet_s": quiet, "demo_busy_s": busy,
                          "ratio": ratio, "demo_dp_s": private, "dp_ratio": dp_ratio,
                          "demo_args": args.demo_args}, md)


if __name__ == "__main__":
    main()
