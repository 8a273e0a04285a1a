"""Turn one site's export into a :class:`SiteData`: harmonise, encode, split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cardiofed.data.dataset import FederatedDataset, SiteData, feature_ranges_for
from cardiofed.data.mapping import (
    MALFORMED,
    LoadReport,
    SiteMapping,
    encode,
    harmonise,
    read_export,
)
from cardiofed.data.omop import is_omop_mapping, omop_site_rows
from cardiofed.exceptions import DataValidationError
from cardiofed.schema import Catalogue, encoded_feature_names


def split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of row indices, stratified when both classes have >= 2 rows."""
    from sklearn.model_selection import train_test_split  # 0.7 s: only when splitting

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
    idx = np.arange(len(y))
    counts = np.bincount(y, minlength=2)
    stratify = y if counts.min() >= 2 else None
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                   shuffle=True, stratify=stratify)
    return np.sort(train), np.sort(test)


def site_from_export(raw: pd.DataFrame, mapping: SiteMapping, features: list[str], *,
                     test_fraction: float | None, seed: int,
                     source: str = "<data>") -> tuple[SiteData, LoadReport]:
    """Harmonise `raw` with `mapping`, encode `features` and split it into train and test
    (``test_fraction=None``: every row is training data, the test split is empty)."""
    missing = [f for f in features if f not in mapping.columns]
    if missing:
        raise DataValidationError(
            f"{source}: the mapping for site {mapping.site!r} does not map features {missing} "
            f"that the study uses."
        )
    if mapping.label.kind == "continuous":
        raise DataValidationError(
            f"{source}: the mapping for site {mapping.site!r} labels a continuous outcome, "
            f"which serves causal attribution only (cardiofed attribution --csv); a risk "
            f"model needs a binary [label].")
    site = harmonise(raw, mapping, source=source)
    x = encode(site.frame, features, mapping.catalogue)
    if len(x) < 2:
        raise DataValidationError(f"{source}: site {mapping.site!r} has {len(x)} rows; "
                                  f"at least 2 are needed for a train/test split.")
    if test_fraction is None:
        train, test = np.arange(len(x)), np.arange(0)
    else:
        train, test = split_indices(site.labels, test_fraction, seed)
    times = site.follow_up
    data = SiteData(name=mapping.site, site_type=mapping.site_type,
                    x_train=x[train], y_train=site.labels[train],
                    x_test=x[test], y_test=site.labels[test],
                    time_train=None if times is None else times[train],
                    time_test=None if times is None else times[test])
    return data, site.report


def load_site_rows(path: Path, mapping_path: Path, catalogue: Catalogue | None
               ) -> tuple[pd.DataFrame, SiteMapping, dict[str, int]]:
    """A site's rows, their mapping and who was left out: a CSV or Parquet export with its
    mapping file, or an OMOP database (a folder of tables, a .db file) with an OMOP
    mapping file (one that names an index date)."""
    if is_omop_mapping(mapping_path):
        raw, mapping, excluded = omop_site_rows(path, mapping_path, catalogue)
        return raw, mapping, dict(excluded)
    raw, malformed = read_export(path)
    return (raw, SiteMapping.from_toml(mapping_path, catalogue),
            {MALFORMED: len(malformed)} if malformed else {})


def federation_from_csv(csv_paths: list[Path], mapping_paths: list[Path], *,
                        features: list[str] | None = None, test_fraction: float = 0.3,
                        seed: int = 0, name: str = "csv",
                        catalogue: Catalogue | None = None) -> FederatedDataset:
    """A federation from a user's own exports, one file (CSV, Parquet, or an OMOP
    database with an OMOP mapping, :mod:`cardiofed.data.omop`) and one mapping per site.

    `features` defaults to the features every mapping maps, in the first mapping's order.
    `catalogue` holds the study's own features and outcome besides the built-in ones.
    """
    if len(csv_paths) != len(mapping_paths) or not csv_paths:
        raise DataValidationError(
            f"Give one mapping file per CSV file; got {len(csv_paths)} CSV and "
            f"{len(mapping_paths)} mapping files."
        )
    loaded = [load_site_rows(csv, p, catalogue) for csv, p in zip(csv_paths, mapping_paths,
                                                               strict=True)]
    mappings = [mapping for _, mapping, _ in loaded]
    outcomes = {m.outcome for m in mappings}
    if len(outcomes) > 1:
        raise DataValidationError(
            f"All sites must predict the same outcome; got {sorted(outcomes)}.")
    if features is None:
        shared = set.intersection(*(set(m.features) for m in mappings))
        features = [f for f in mappings[0].features if f in shared]
    sites, reports = [], {}
    for k, (csv, mapping) in enumerate(zip(csv_paths, mappings, strict=True)):
        raw, _, excluded = loaded[k]
        site, report = site_from_export(raw, mapping, features,
                                        test_fraction=test_fraction, seed=seed + k,
                                        source=str(csv))
        report.excluded.update(excluded)
        sites.append(site)
        reports[site.name] = report
    names = encoded_feature_names(features, catalogue)
    return FederatedDataset(name=name, feature_names=names,
                            feature_ranges=feature_ranges_for(names, catalogue), sites=sites,
                            outcome=mappings[0].outcome, load_reports=reports)
