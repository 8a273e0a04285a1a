"""Peak memory of a real coordinator and of real hospital nodes in a networked study.

A coordinator process (``cardiofed coordinator --insecure``; ``bench/network.py``'s
:class:`Coordinator`) runs a logistic-regression study of two synthetic sites to the
end, and each site is a ``cardiofed node run`` process of its own, as a hospital runs
it. Peak RSS is the kernel's: ``ru_maxrss`` of a process's waited-for children, taken in
a small launcher process per node (so one node's peak is not mixed with another's), and
``VmHWM`` from ``/proc`` for the coordinator before it stops. Two studies: nodes with
``privacy = "off"``, and the default private nodes (DP-SGD, their ledgers).

    python bench/memory.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, proc_status_mb, write_results  # noqa: E402
from network import SETTINGS, STUDY_LIMIT_S, Coordinator  # noqa: E402

SITES = ["tier3_01", "community_01"]
TARGET_MB = 200.0  # issue 31: a logistic regression's node

# Runs one node as a child and prints its peak RSS in kB (Linux: ru_maxrss is in kB).
LAUNCHER = ("import resource, subprocess, sys; "
            "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.STDOUT).returncode; "
            "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _vm_hwm_mb(pid: int) -> float:
    peak = proc_status_mb(pid, "VmHWM")
    if math.isnan(peak):
        raise RuntimeError(f"no VmHWM for process {pid}")
    return peak


def study(workdir: Path, private: bool, rounds: int) -> dict[str, Any]:
    """One study on its own coordinator, each node a process; their peak RSS in MB."""
    tag = "private" if private else "off"
    coordinator = Coordinator(workdir, tag)
    try:
        tokens = coordinator.create_study("bench", SITES, {**SETTINGS, "rounds": rounds})
        launchers = []
        for site in SITES:
            folder = workdir / tag / site
            folder.mkdir(parents=True)
            lines = [f'coordinator_url = "{coordinator.url}"', 'state_dir = "state"',
                     f'enrolment_token = "{tokens[site]}"', "poll_wait_s = 1",
                     *([] if private else ['privacy = "off"']),
                     "[data]", 'dataset = "synthetic"', f'site = "{site}"']
            (folder / "node.toml").write_text("\n".join(lines) + "\n")
            node = [sys.executable, "-m", "cardiofed.cli", "node", "run", "--config",
                    str(folder / "node.toml")]
            launchers.append(subprocess.Popen([sys.executable, "-c", LAUNCHER, *node],
                                              cwd=folder, stdout=subprocess.PIPE, text=True))
        peaks = {}
        for site, launcher in zip(SITES, launchers, strict=True):
            out, _ = launcher.communicate(timeout=STUDY_LIMIT_S)
            code, kb = out.split()
            if code != "0":
                raise RuntimeError(f"node {site} exited with {code}")
            peaks[site] = int(kb) / 1024
        state = coordinator.status("bench")
        if state["phase"] != "done":
            raise RuntimeError(f"{tag}: the study ended in {state}")
        return {"privacy": "private (default)" if private else "off", "node_peak_mb": peaks,
                "coordinator_peak_mb": _vm_hwm_mb(coordinator.proc.pid), "rounds": rounds}
    finally:
        coordinator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    with tempfile.TemporaryDirectory(prefix="cardiofed-bench-") as tmp:
        runs = [study(Path(tmp), private, args.rounds) for private in (False, True)]
    rows = [[r["privacy"], *(f"{r['node_peak_mb'][s]:.0f}" for s in SITES),
             f"{r['coordinator_peak_mb']:.0f}"] for r in runs]
    worst = max(max(r["node_peak_mb"].values()) for r in runs if r["privacy"] == "off")
    md = ("## Peak memory of a networked study (MB)\n\n"
          + markdown_table(["node privacy", *(f"node {s}" for s in SITES), "coordinator"],
                           rows)
          + f"\nLogistic regression, FedAvg, {args.rounds} training rounds, two synthetic "
          f"sites, each a `cardiofed node run` process; the coordinator a "
          f"`cardiofed coordinator` process (SQLite). A node's peak: `ru_maxrss` of its "
          f"launcher's children; the coordinator's: `VmHWM` before it stops. Issue 31's "
          f"target, a logistic regression's node under {TARGET_MB:.0f} MB: "
          f"{'met' if worst < TARGET_MB else 'not met'} without privacy ({worst:.0f} MB), "
          f"and a private node loads PyTorch through Opacus in any case.\n")
    write_results("memory", {"settings": {**SETTINGS, "rounds": args.rounds, "sites": SITES},
                             "runs": runs, "target_mb": TARGET_MB}, md)


if __name__ == "__main__":
    main()
