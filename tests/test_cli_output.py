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
from cardiofed.names import NAME_PATTERN


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


def _privacy_result(sites: list[str], delta: list[float]) -> object:
    from types import SimpleNamespace

    privacy = {site: {"n_records": 3000 - 10 * i, "delta": delta[i % len(delta)],
                      "epsilon_max": 1.0, "epsilon_statistics": 0.1,
                      "epsilon_train": 0.8123456, "epsilon_evaluate": 0.3967,
                      "epsilon_spent": 0.99987, "noise_multiplier": 2.3456,
                      "max_grad_norm": 2.0, "rounds_trained": 20}
               for i, site in enumerate(sites)}
    return SimpleNamespace(privacy=privacy, config=SimpleNamespace(dp_accountant="rdp"))


@settings(max_examples=30, deadline=None)
@given(sites=st.lists(st.from_regex(NAME_PATTERN, fullmatch=True), min_size=1, max_size=6,
                      unique=True),
       mixed_delta=st.booleans())
def test_the_privacy_table_fits_80_columns_with_every_site_and_figure(
        sites: list[str], mixed_delta: bool) -> None:
    from cardiofed.experiments.summary import privacy_table

    result = _privacy_result(sites, [1e-5, 1e-6] if mixed_delta and len(sites) > 1
                             else [1e-5])
    text = _rendered(privacy_table(result))  # type: ignore[arg-type]
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = "".join(text.split())
    lines = text.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if "───" in line) + 1:]
    shown: list[str] = []
    for line in body[:body.index(next(line for line in body if not line.strip()))]:
        tokens = line.split()
        if len(tokens) > 1:
            shown.append(tokens[0])
        else:  # a long name folds onto the next line
            shown[-1] += tokens[0]
    assert shown == sites  # folded, never cut
    for figure in ("3,000", "0.812", "0.397", "2.35", "20"):
        assert figure in flat
    # a setting every site shares is said once, in the title
    assert "epsilonmax1" in flat.replace("eps", "epsilon").replace("epsilonilon", "epsilon")
    assert ("delta1e-05" in flat) != (mixed_delta and len(sites) > 1)


def test_the_load_table_fits_80_columns_with_every_feature_name() -> None:
    from cardiofed.cli.experiments import _load_table
    from cardiofed.data.mapping import LoadReport

    report = LoadReport(source="export.csv", rows=100)
    for name in ("total_cholesterol", "hdl_cholesterol", "systolic_bp"):
        report.missing[name] = 7
        report.out_of_range[name] = 2
        report.converted_units[name] = "mmol/L -> mg/dL (x38.67)"
    text = _rendered(_load_table({"community_06": report, "tier3_01": report}))
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.split())
    assert "total_cholesterol" in flat and "hdl_cholesterol" in flat
    assert flat.count("community_06") == 2  # once in the table, once below
    assert ("community_06 total_cholesterol, hdl_cholesterol, systolic_bp mmol/L -> mg/dL "
            "(x38.67)") in flat
