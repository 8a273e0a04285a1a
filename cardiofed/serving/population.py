"""A model card's population: who the model learnt from (the sites, how many of each
type, the records where known, each continuous feature's pooled median), and the one
line a reader sees."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cardiofed.data.preprocessing import Preprocessor
from cardiofed.schema import Catalogue, FeatureKind


def population_of(preprocessor: Preprocessor, encoded_names: Sequence[str],
                  catalogue: Catalogue, *, sites: Sequence[str],
                  site_types: Mapping[str, str] | None = None,
                  records: int | None = None) -> dict[str, Any]:
    """A card's population: the sites (and how many of each type), the records where
    known, and each continuous feature's pooled median (the preprocessor's fill value)."""
    medians = {name: float(f"{value:.3g}") for name, value
               in zip(encoded_names, preprocessor.fill, strict=True)
               if name in catalogue.features
               and catalogue.feature(name).kind is FeatureKind.CONTINUOUS}
    population: dict[str, Any] = {"sites": len(sites), "medians": medians}
    if site_types:
        population["site_types"] = dict(sorted(Counter(site_types[s] for s in sites).items()))
    if records is not None:
        population["records"] = records
    return population


def population_text(population: Mapping[str, Any], catalogue: Catalogue) -> str:
    """A card's population in one line, e.g. ``4 sites (2 tier3, 2 community), 2,677
    records; medians: age 54 years, systolic_bp 130 mmHg``."""
    if not population:
        return "not recorded (a model registered before model cards described it)"
    types = population.get("site_types") or {}
    text = f"{population['sites']} sites" + (
        " (" + ", ".join(f"{n} {t}" for t, n in types.items()) + ")" if types else "")
    if population.get("records") is not None:
        text += f", {population['records']:,} records"
    medians = population.get("medians") or {}
    if medians:
        text += "; medians: " + ", ".join(
            f"{name} {value:g} {catalogue.feature(name).unit or ''}".rstrip()
            for name, value in medians.items())
    return text
