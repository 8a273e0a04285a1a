"""Shared helpers of the benchmark scripts: result files and Markdown tables."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# Where results go instead (the test suite's smoke runs write to a temporary folder).
RESULTS_ENV = "CARDIOFED_BENCH_RESULTS"


def single_threaded() -> None:
    """One PyTorch intra-op thread: the models are tiny, and a second thread only spins
    (and is starved whenever anything else runs on the 2 cores)."""
    import torch

    torch.set_num_threads(1)


def add_smoke(parser: argparse.ArgumentParser) -> None:
    """The ``--smoke`` flag every script takes: tiny sizes, seconds, the same code paths
    (the test suite runs it, so a benchmark that stops running fails CI)."""
    parser.add_argument("--smoke", action="store_true",
                        help="Tiny sizes, to check the script runs (figures mean nothing).")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_status_mb(pid: int, field: str) -> float:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``...) in MB; nan
    where the process has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def environment() -> dict[str, Any]:
    """What produced a results file: the commit (and whether the tree had uncommitted
    changes), the machine, the command, the date."""
    import torch

    return {"commit": _git("rev-parse", "HEAD") or "unknown",
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no",
                                             "--", ".", ":!bench/results")),
            "command": " ".join(["python", *sys.argv]),
            "cores": os.cpu_count(), "cpu": _cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def provenance_line(env: dict[str, Any]) -> str:
    """The Markdown line that says where a results file's figures come from."""
    commit = str(env["commit"])[:12] + (" with uncommitted changes"
                                         if env["uncommitted_changes"] else "")
    return (f"_Measured on commit {commit}, {env['cores']} cores ({env['cpu']}), Python "
            f"{env['python']}, {env['date']}: `{env['command']}`._")


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_dir() -> Path:
    """``bench/results``, or ``$CARDIOFED_BENCH_RESULTS`` where set."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """Write ``<results>/<name>.json`` and ``.md`` (with where the figures come from:
    commit, machine, command) and print the table."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"environment": env, **payload}
    markdown = markdown.rstrip("\n") + "\n\n" + provenance_line(env) + "\n"
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)
