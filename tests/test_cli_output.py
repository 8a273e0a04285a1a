"""What the command line prints reads at 80 columns, and brackets in messages survive."""

from __future__ import annotations

import io
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from test_coordinator import SITES, Federation  # type: ignore[import-not-found]
from typer.testing import CliRunner

from cardiofed._console import fail
from cardiofed.cli import app
from cardiofed.cli.admin import status_view


def _rendered(renderable: object, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def test_the_status_is_a_table_that_fits_80_columns(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    agents = [fed.agent(s) for s in SITES]
    assert fed.step(agents[:2]) == 2  # one site still to report
    fed.client.post("/v1/studies/s1/sites/community_01/revoke", headers=fed.auth(fed.admin))
    text = _rendered(status_view(fed.status()))  # type: ignore[arg-type]
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())
    assert "Study s1" in flat and "reported tier2_01, tier3_01" in flat
    assert "revoked community_01" in flat


@settings(max_examples=50, deadline=None)
@given(reason=st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]),
                      min_size=1, max_size=300))
def test_a_refusal_reason_is_printed_as_given_within_80_columns(reason: str) -> None:
    state = {"study": "s[1]", "phase": "train", "round": 2, "kind": "train",
             "model_version": 1, "rounds_planned": 5, "aggregation": "sync",
             "halted": None, "reported": [], "waiting_for": ["[bold]a"], "deadline": "x",
             "min_sites": 1, "round_outcome": None, "revoked": [], "non_private_sites": [],
             "refusals": [{"site": "a", "round": 2, "reason": reason}]}
    text = _rendered(status_view(state))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "".join(reason.split()) in "".join(text.split())  # wrapped, never eaten
    assert "s[1]" in text and "[bold]a" in text


def test_an_error_keeps_its_brackets(capsys: object) -> None:
    fail("column [age] is missing")
    assert "column [age] is missing" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_help_keeps_its_brackets() -> None:
    result = CliRunner().invoke(app, ["admin", "create-study", "--help"],
                                env={"COLUMNS": "80"})
    assert "an [attribution] table" in " ".join(result.output.split())


def test_every_feature_name_is_whole_at_80_columns() -> None:
    from cardiofed.schema import CATALOGUE

    result = CliRunner().invoke(app, ["features"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    first_words = {line.split()[0] for line in lines if line.strip()}
    assert set(CATALOGUE.features) <= first_words
    assert set(CATALOGUE.outcomes) <= first_words
    assert "[columns.<name>]" in result.output


def test_a_demo_of_fewer_than_three_sites_is_refused_by_name() -> None:
    result = CliRunner().invoke(app, ["demo", "--sites", "2", "--no-register"])
    assert result.exit_code == 2
    assert "Invalid value for '--sites'" in result.output
    assert "greater than or equal to 3" in result.output
