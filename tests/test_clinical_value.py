"""The per-site story: each model's AUC with its interval, by site and site type."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from sklearn.metrics import roc_auc_score

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.evaluation.uncertainty import PairedComparison
from cardiofed.experiments.clinical_value import (
    MISSING,
    ClinicalValue,
    clinical_value,
    effective_claim,
)
from cardiofed.experiments.effective_data import LearningCurvePoint, SiteEffectiveData
from cardiofed.experiments.summary import clinical_tables
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    FEDERATED,
    LOCAL,
    POOLED,
    RECALIBRATED,
    TRUE_RISK,
    ExperimentResult,
    run_experiment,
)

Valued = tuple[ExperimentResult, ClinicalValue]


@pytest.fixture(scope="module")
def value() -> Valued:
    data = synthetic_federation(n_sites=4, seed=2, size_scale=0.5, eval_size=3000)
    result = run_experiment(data, SimulationConfig.create(rounds=3, recalibrate=True,
                                                          eval_every=0))
    return result, clinical_value(result)


def test_every_model_and_the_true_risks_are_compared_at_every_site(value: Valued) -> None:
    result, v = value
    assert v.models == [LOCAL, FEDERATED, RECALIBRATED, POOLED, TRUE_RISK]
    assert v.headline == RECALIBRATED
    for site, by_model in v.sites.items():
        for model, (auc, low, high) in by_model.items():
            assert auc == pytest.approx(roc_auc_score(*result.predictions[site][model]))
            assert low < auc < high


def test_a_site_type_pools_its_sites_patients(value: Valued) -> None:
    result, v = value
    members = [s for s, t in result.site_types.items() if t == "community"]
    y = np.concatenate([result.predictions[s][LOCAL][0] for s in members])
    p = np.concatenate([result.predictions[s][LOCAL][1] for s in members])
    assert v.types["community"][LOCAL][0] == pytest.approx(roc_auc_score(y, p))


def test_the_story_names_gains_verdicts_and_the_achievable(value: Valued) -> None:
    _, v = value
    lines = v.type_lines()
    assert len(lines) == len(v.types)
    community = next(line for line in lines if line.startswith("community"))
    assert "vs local-only" in community and "significantly better at" in community
    assert "of the AUC achievable at its sites" in community
    assert len(v.rows()) == len(v.sites) + len(v.types)
    assert len(v.compact_rows()[0]) == len(v.compact_header)
    assert v.to_markdown().count("\n|") >= len(v.sites)
    json.dumps(v.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- one answer per site

_STATUSES = ("estimated", "at least", "at most", "not reachable alone", "extrapolated")


@st.composite
def _effective(draw: st.DrawFn) -> tuple[SiteEffectiveData, PairedComparison]:
    own = draw(st.integers(20, 5000))
    sizes = sorted(draw(st.sets(st.integers(10, 40 * own), min_size=1, max_size=6)))
    kind = draw(st.sampled_from(_STATUSES))
    n_eq = draw(st.floats(0.0, 1e12))
    e = SiteEffectiveData(
        site="s", site_type="t", own_size=own, target_auc=0.7, method="m",
        curve=tuple(LearningCurvePoint(size=n, aucs=(0.6,)) for n in sizes),
        n_equivalent=math.inf if kind == "not reachable alone" else n_eq,
        extrapolated=kind == "extrapolated", lower_bound=kind == "at least",
        upper_bound=kind == "at most")
    difference = draw(st.floats(-0.2, 0.2))
    p = draw(st.floats(0.0, 1.0))
    comp = PairedComparison(auc_a=0.7, auc_b=0.7 - difference, difference=difference,
                            interval=(difference - 0.01, difference + 0.01), p_value=p,
                            alpha=0.05)
    return e, comp


@settings(max_examples=300, deadline=None)
@given(_effective())
def test_effective_data_agrees_with_vs_alone_and_stays_in_the_measured_range(
        case: tuple[SiteEffectiveData, PairedComparison]) -> None:
    e, comp = case
    claim, figure = effective_claim(e, comp)
    measured = max(p.size for p in e.curve) / e.own_size
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", claim)]
    assert all(x <= measured + 0.05 or x == 1.0 for x in numbers), (claim, measured)
    if comp.status == "worse":
        assert claim == "< 1x"
    elif comp.status == "no significant difference":
        assert claim == "~1x"
    else:  # better: more than the site's own rows, as a figure or a bound
        assert claim.startswith((">", "<=")) or (figure is not None and figure > 1)
        assert all(x >= 1.0 for x in numbers)
    assert "inf" not in claim and "nan" not in claim


def test_the_console_answer_fits_80_columns_and_keeps_every_site(value: Valued) -> None:
    _, v = value
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    for table in clinical_tables(v):
        console.print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for site, row in zip(v.sites, v.compact_rows(), strict=True):
        line = next(line for line in text.splitlines() if line.strip().startswith(site))
        assert row[v.compact_header.index("vs alone")] in line
        assert row[v.compact_header.index("eff. data")] in line


def _statements_agree(v: ClinicalValue) -> None:
    """The consistency rules of one answer per site (docs/reading-the-report.md)."""
    header = v.header
    verdict, versus, effective = (header.index(h) for h in (
        f"{v.headline} verdict", "vs local-only", "effective data"))
    for site, row in zip(v.sites, v.rows(), strict=False):
        comp = v.report.comparisons.get(site)
        claim, figure = effective_claim(v.effective.get(site), comp)
        assert row[effective] == claim
        text = " ".join(row)
        assert "inf" not in text and "nan" not in text, row
        if comp is None:
            continue
        assert row[versus].startswith(comp.status)
        assert f"{comp.difference:+.3f}" in row[versus]
        if comp.status == "worse":
            assert claim in ("< 1x", MISSING)
        elif comp.status == "better":
            assert claim == MISSING or claim.startswith((">", "<=")) or (figure or 0) > 1
        else:
            assert claim in ("~1x", MISSING)
        e = v.effective.get(site)
        if figure is not None and e is not None:
            assert figure <= max(p.size for p in e.curve) / e.own_size
        assert row[verdict] in ("acceptable", "not acceptable", "insufficient evidence")


def test_uci_sites_get_one_consistent_answer_each() -> None:
    # Real data (the four UCI hospitals ship with the package): learning curves from the
    # sites' own rows, so a site better off federated can only read "> 1x".
    from cardiofed.data.catalog import load_dataset
    from cardiofed.experiments.effective_data import site_effective_data

    data = load_dataset("uci-heart", seed=0)
    result = run_experiment(data, SimulationConfig.create(rounds=10, eval_every=0))
    v = clinical_value(result, site_effective_data(data, result, repeats=2))
    assert set(v.effective) == set(v.sites)
    _statements_agree(v)
    text = "\n".join(v.type_lines())
    assert "inf" not in text and "nan" not in text


def test_synthetic_sites_get_one_consistent_answer_each(value: Valued) -> None:
    _statements_agree(value[1])


def test_framingham_sites_get_one_consistent_answer_each(framingham_csv: Path) -> None:
    from cardiofed.data.catalog import load_dataset
    from cardiofed.experiments.effective_data import site_effective_data

    data = load_dataset("framingham", seed=0, data_dir=framingham_csv.parents[1])
    result = run_experiment(data, SimulationConfig.create(rounds=5, eval_every=0))
    v = clinical_value(result, site_effective_data(data, result, repeats=1))
    _statements_agree(v)


def test_a_csv_federation_gets_one_consistent_answer_per_site() -> None:
    # The shipped survey example: two sites' own exports, mapping files, a feature file.
    from cardiofed.data.sites import federation_from_csv
    from cardiofed.data.study_features import StudyFeatures
    from cardiofed.experiments.effective_data import site_effective_data

    folder = Path(__file__).resolve().parents[1] / "examples" / "survey"
    config = SimulationConfig.create(
        rounds=5, eval_every=0,
        study_features=StudyFeatures.from_toml(folder / "features.toml"))
    data = federation_from_csv([folder / "site_a.csv", folder / "site_b.csv"],
                               [folder / "site_a.toml", folder / "site_b.toml"],
                               catalogue=config.catalogue())
    result = run_experiment(data, config)
    v = clinical_value(result, site_effective_data(data, result, repeats=1))
    _statements_agree(v)
