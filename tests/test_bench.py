"""Every benchmark script runs: its ``--smoke`` mode (tiny sizes, the same code paths),
in this process, writing to a temporary results folder that then carries the commit,
the machine and the command. A script that stops running fails here, not months later
in front of a reader."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("[a-z]*.py"))
# Scripts without a smoke mode, each with its reason; a new script must have one.
NO_SMOKE: dict[str, str] = {}
# Scripts that measure a PostgreSQL database they wipe: smoked on
# CARDIOFED_BENCH_POSTGRES_URL, else on the test database's schema of this worker (the
# postgres_url fixture; .ci/run sets CARDIOFED_TEST_POSTGRES_URL), else skipped.
POSTGRES = {"network_scale", "upload_cost", "upload_floor"}
# Flower's simulation engine runs in an environment of its own (it pins older FastAPI,
# Starlette and Typer than CardioFed's): smoked where CARDIOFED_BENCH_FLOWER_PYTHON names
# that environment's interpreter.
FLOWER = {"flower_peer"}
# Scripts whose subject is the Framingham data, which may not be redistributed.
FRAMINGHAM = {"framingham", "simulation_overhead"}


def _framingham_available() -> bool:
    from cardiofed.data.framingham import load_framingham

    try:
        load_framingham()
    except (FileNotFoundError, OSError):
        return False
    return True


def _smoke_scripts() -> list[str]:
    return [s for s in SCRIPTS if s not in NO_SMOKE]


def test_every_script_has_a_smoke_mode_or_a_stated_reason() -> None:
    lacking = [s for s in _smoke_scripts() if "add_smoke(parser)" not in
               (BENCH / f"{s}.py").read_text(encoding="utf-8")]
    assert not lacking, f"bench scripts without --smoke: {lacking}"
    assert set(NO_SMOKE) <= set(SCRIPTS), "NO_SMOKE names a script that is gone"


@pytest.mark.parametrize("script", _smoke_scripts())
def test_a_benchmark_runs_in_its_smoke_mode(script: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            request: pytest.FixtureRequest) -> None:
    if script in POSTGRES and not os.environ.get("CARDIOFED_BENCH_POSTGRES_URL", "").startswith(
            "postgresql"):
        if not os.environ.get("CARDIOFED_TEST_POSTGRES_URL"):
            pytest.skip(f"{script} measures a PostgreSQL database it wipes: set "
                        f"CARDIOFED_BENCH_POSTGRES_URL or CARDIOFED_TEST_POSTGRES_URL to "
                        f"smoke it")
        monkeypatch.setenv("CARDIOFED_BENCH_POSTGRES_URL", request.getfixturevalue("postgres_url"))
    if script in FLOWER and not os.environ.get("CARDIOFED_BENCH_FLOWER_PYTHON"):
        pytest.skip(f"{script} runs Flower's simulation engine in its own environment: set "
                    f"CARDIOFED_BENCH_FLOWER_PYTHON to that environment's python to smoke it")
    if script in FRAMINGHAM and not _framingham_available():
        pytest.skip("the Framingham data is not here (see ../shared/data/SOURCES.md)")
    monkeypatch.setenv("CARDIOFED_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", "--smoke"])
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(BENCH / f"{script}.py"), run_name="__main__")
    written = sorted(tmp_path.glob("*.json"))
    assert written, f"{script} --smoke wrote no results file"
    for path in written:
        env = json.loads(path.read_text())["environment"]
        assert len(env["commit"]) == 40 or env["commit"] == "unknown"
        assert env["cores"] >= 1 and env["cpu"] and env["command"].endswith("--smoke")
        assert "_Measured on commit " in path.with_suffix(".md").read_text()


def test_flower_peer_without_flower_names_what_it_needs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CARDIOFED_BENCH_FLOWER_PYTHON", raising=False)
    monkeypatch.setattr(sys, "argv", ["bench/flower_peer.py", "--smoke"])
    monkeypatch.syspath_prepend(str(BENCH))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / "flower_peer.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert ("--flower-python (or CARDIOFED_BENCH_FLOWER_PYTHON) must name the interpreter "
            "of an environment with flwr[simulation]") in capsys.readouterr().err
