"""Survival exports: a mapping's follow-up column, and the synthetic federation's
censored follow-up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.data.mapping import SiteMapping, harmonise
from cardiofed.data.sites import site_from_export
from cardiofed.data.synthetic import LOSS_PER_YEAR, synthetic_federation
from cardiofed.exceptions import DataValidationError


def mapping(unit: str = "days") -> SiteMapping:
    return SiteMapping.from_dict({
        "site": "clinic_a", "outcome": "cvd_10y",
        "label": {"column": "EVENT", "positive": ["1"], "negative": ["0"]},
        "follow_up": {"column": "FU", "unit": unit},
        "columns": {"age": {"source": "AGE"}}})


def export(fu: list[str]) -> pd.DataFrame:
    n = len(fu)
    return pd.DataFrame({"AGE": ["50"] * n, "EVENT": (["1", "0"] * n)[:n], "FU": fu},
                        dtype=str)


@pytest.mark.parametrize(("unit", "text", "years"), [
    ("days", "365.25", 1.0), ("weeks", "52", 52 * 7 / 365.25), ("months", "18", 1.5),
    ("years", "10", 10.0)])
def test_follow_up_is_read_in_years(unit, text, years):
    site = harmonise(export([text, text]), mapping(unit))
    assert site.follow_up == pytest.approx([years, years])
    assert site.labels.tolist() == [1, 0]


@pytest.mark.parametrize(("text", "why"), [
    ("", "is missing"), ("soon", "is not a number"), ("0", "is not > 0"),
    ("-3", "is not > 0"), ("50000", "over 120 years"), ("inf", "is not a number")])
def test_a_bad_follow_up_names_the_row_not_the_value(text, why):
    with pytest.raises(DataValidationError, match=why) as caught:
        harmonise(export(["100", text]), mapping())
    assert "row 2" in str(caught.value) and "'FU'" in str(caught.value)
    if text:
        assert repr(text) not in str(caught.value)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                          st.text(max_size=6)), min_size=1, max_size=8))
def test_any_follow_up_column_is_read_or_refused_by_name(texts):
    try:
        site = harmonise(export(texts), mapping("years"))
    except DataValidationError as exc:
        assert "follow-up column 'FU'" in str(exc)
    else:
        assert site.follow_up is not None
        assert np.isfinite(site.follow_up).all() and (site.follow_up > 0).all()


def test_scoring_new_patients_needs_no_follow_up():
    site = harmonise(export(["10"]).drop(columns=["FU", "EVENT"]), mapping(), labels=False)
    assert site.follow_up is None


def test_follow_up_times_follow_their_rows_into_the_splits():
    times = [str(v) for v in range(1, 41)]
    site, _ = site_from_export(export(times), mapping("years"), ["age"], test_fraction=0.25,
                               seed=0)
    assert site.survival
    seen = np.sort(np.concatenate([site.time_train, site.time_test]))
    assert seen.tolist() == list(range(1, 41))
    assert site.time_test.size == site.y_test.size


def test_an_unknown_unit_is_refused():
    with pytest.raises(DataValidationError, match="follow_up"):
        mapping("fortnights")


def test_synthetic_survival_federation_is_censored_most_where_clinics_lose_patients():
    data = synthetic_federation(survival=True, seed=3)
    again = synthetic_federation(survival=True, seed=3)
    assert all(np.array_equal(a.time_train, b.time_train)
               for a, b in zip(data.sites, again.sites, strict=True))
    by_type: dict[str, list[float]] = {}
    for s in data.sites:
        assert s.survival and (s.time_train > 0).all()
        censored_early = float(((s.y_train == 0) & (s.time_train < 10)).mean())
        by_type.setdefault(s.site_type, []).append(censored_early)
    assert LOSS_PER_YEAR["community"] > LOSS_PER_YEAR["tier3"]
    assert min(by_type["community"]) > max(by_type["tier3"])
    plain = synthetic_federation(seed=3)
    assert not plain.sites[0].survival
    judged = synthetic_federation(n_sites=3, survival=True, eval_size=500, seed=3)
    assert all(s.time_test.size == 500 and s.time_train.size == s.n_train
               for s in judged.sites)
