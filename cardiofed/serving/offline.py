"""Offline scoring of a CSV export: ``cardiofed predict``.

The file is read in chunks, harmonised with the site's mapping file (or, without one,
read as canonical columns in canonical units), scored, and written as CSV or Parquet
(by the output's suffix): one row per scored input row, in order, with its row number,
the risk, the risk category, how many features were imputed with the federation's
medians, and optionally each feature's log-odds contribution. No row leaves the machine.

The rule is the risk API's: a row with a missing feature is scored only when
`impute_missing` asks for it, and a row with an invalid value (not a number, outside
the plausible range, an unknown code) is never scored unless its column's mapping says
``on_invalid = "missing"``; a row with none of the model's features is never scored.
Every row that is not scored is listed, with its row number (and id) and the reasons,
never its values, in ``<out>.rejected.csv``; when more than `max_rejected` of the rows
are rejected nothing is written but that list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cardiofed.data.csv_lines import read_csv_chunks
from cardiofed.data.mapping import (
    HarmonisedSite,
    SiteMapping,
    encode,
    harmonise,
)
from cardiofed.evaluation.recalibration import Recalibration
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.serving.model import (
    RISK_CATEGORIES,
    RISK_THRESHOLDS,
    RiskModel,
    risk_categories,
)

CHUNK_ROWS = 250_000
OUTPUT_SUFFIXES = (".csv", ".parquet")


def canonical_mapping(model: RiskModel) -> SiteMapping:
    """A mapping for a file whose columns are the model's canonical features (no label
    is read, so the outcome is only there to satisfy the mapping's schema)."""
    outcomes = model.catalogue.outcomes
    outcome = model.card.outcome if model.card.outcome in outcomes else next(iter(outcomes))
    return SiteMapping.from_dict({"site": "input", "outcome": outcome, "label": {"column": "-"},
                                  "columns": {name: {"source": name}
                                              for name in model.card.features}},
                                 catalogue=model.catalogue)


def score_frame(model: RiskModel, frame: pd.DataFrame, *, contributions: bool = False,
                recalibration: Recalibration | None = None,
                thresholds: Sequence[float] = RISK_THRESHOLDS,
                categories: Sequence[str] = RISK_CATEGORIES) -> pd.DataFrame:
    """Scores of canonical rows (one column per feature, NaN where missing)."""
    x = encode(frame, model.card.features, model.catalogue)
    if contributions:
        explained = model.explain(x)
        risk = explained.risk
    else:
        risk = model.risk(x)
    if recalibration is not None:
        risk = recalibration.apply(risk, model.preprocessor.standardise(x)
                                   if recalibration.coefficients else None)
    out = pd.DataFrame({
        "risk": risk,
        # A model without the categories' horizon gets none (an empty column).
        "category": (risk_categories(risk, thresholds, categories) if model.categorised
                     else np.full(len(risk), "", dtype=object)),
        "n_imputed": frame[model.card.features].isna().sum(axis=1).to_numpy()})
    if contributions:
        for j, name in enumerate(model.card.features):
            out[f"contribution_{name}"] = explained.contributions[:, j]
    return out


@dataclass(frozen=True)
class Scored:
    """What :func:`predict_file` did: rows read, scored and rejected, and where the
    rejected rows' reasons are (None when every row was scored)."""

    rows: int
    scored: int
    rejected: int
    rejected_file: Path | None


def rejected_path(out: Path) -> Path:
    return out.with_name(out.stem + ".rejected.csv")


def _rejections(site_rows: HarmonisedSite, mapping: SiteMapping, features: list[str],
                impute_missing: bool) -> dict[int, str]:
    """Row position -> why it is not scored (missing or invalid features, no values)."""
    reasons: dict[int, list[str]] = {}
    for name in features:
        col = mapping.columns[name]
        strict = (col.on_invalid or mapping.on_invalid) == "error"
        invalid = site_rows.problems.get(name, {}) if strict else {}
        for i, why in invalid.items():
            reasons.setdefault(i, []).append(f"{name} {why}")
        if not impute_missing:
            set_missing = site_rows.problems.get(name, {})
            for i in np.flatnonzero(site_rows.frame[name].isna().to_numpy()).tolist():
                if i not in invalid:
                    why = f"{set_missing[i]}, set missing" if i in set_missing else "missing"
                    reasons.setdefault(i, []).append(f"{name} {why}")
    # A row with no feature at all is a malformed line, not a patient: never scored.
    empty = site_rows.frame[features].isna().all(axis=1).to_numpy()
    for i in np.flatnonzero(empty).tolist():
        reasons[i] = ["no feature of the model present (a malformed line?)"]
    return {i: "; ".join(parts) for i, parts in sorted(reasons.items())}


def predict_file(model: RiskModel, input_csv: Path, out: Path, *,
                 mapping: SiteMapping | None = None, contributions: bool = False,
                 site: str | None = None, id_column: str | None = None,
                 impute_missing: bool = False, max_rejected: float = 0.01,
                 thresholds: Sequence[float] = RISK_THRESHOLDS,
                 categories: Sequence[str] = RISK_CATEGORIES,
                 on_rows: Callable[[int], None] | None = None) -> Scored:
    """Score the rows of `input_csv` that can be scored into `out` (see the module
    docstring for which can).

    `site` applies that site's recalibration from the model card (an error if the card
    has none). `max_rejected` is the largest fraction of rows that may be rejected, in
    [0, 1]. `on_rows(n)` is called after each chunk (a progress bar).
    """
    if not 0.0 <= max_rejected <= 1.0:
        raise ConfigurationError(f"The 'max_rejected' parameter must be in [0, 1]; got "
                                 f"{max_rejected!r}.")
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigurationError(f"Output {out} must end in {' or '.join(OUTPUT_SUFFIXES)}.")
    if not input_csv.is_file():
        raise DataValidationError(f"Input file {input_csv} does not exist.")
    recal = None if site is None else model.site_recalibration(site)
    if site is not None and recal is None:
        raise ConfigurationError(f"Model {model.card.version or model.card.study} has no "
                                 f"recalibration for site {site!r} (it has "
                                 f"{sorted(model.card.recalibration) or 'none'}).")
    mapping = mapping or canonical_mapping(model)
    missing = sorted(set(model.card.features) - set(mapping.columns))
    if missing:
        raise DataValidationError(f"The mapping has no column for the model's features "
                                  f"{missing}.")
    # Invalid values become missing here; _rejections then applies each column's policy.
    lenient = mapping.model_copy(update={"on_invalid": "missing", "columns": {
        name: col.model_copy(update={"on_invalid": "missing"})
        for name, col in mapping.columns.items()}})
    parts, rejected, done = [], [], 0
    for chunk in read_csv_chunks(input_csv, CHUNK_ROWS):
        frame = chunk.frame
        if id_column is not None and id_column not in frame.columns:
            raise DataValidationError(f"{input_csv}: no column {id_column!r} (it has "
                                      f"{list(frame.columns)}).")
        site_rows = harmonise(frame, lenient, str(input_csv), labels=False)
        reasons = _rejections(site_rows, mapping, model.card.features, impute_missing)
        rows, refused = chunk.rows, list(reasons)
        keep = np.ones(len(frame), dtype=bool)
        keep[refused] = False
        scored = score_frame(model, site_rows.frame[keep], contributions=contributions,
                             recalibration=recal, thresholds=thresholds, categories=categories)
        scored.insert(0, "row", rows[keep])
        if id_column is not None:
            scored.insert(1, id_column, frame[id_column].to_numpy()[keep])
        parts.append(scored)
        bad = pd.DataFrame({"row": [*rows[refused], *chunk.malformed],
                            "reason": [*reasons.values(), *chunk.malformed.values()]})
        if len(bad):
            if id_column is not None:
                bad.insert(1, id_column, [*frame[id_column].to_numpy()[refused],
                                          *[""] * len(chunk.malformed)])
            rejected.append(bad.sort_values("row", kind="stable"))
        done += chunk.size
        if on_rows is not None:
            on_rows(chunk.size)
    if done == 0:  # no chunk at all, or only a header
        raise DataValidationError(f"{input_csv} has no data rows.")
    side = rejected_path(out)
    n_rejected = sum(len(r) for r in rejected)
    if n_rejected:
        pd.concat(rejected, ignore_index=True).to_csv(side, index=False)
    elif side.exists():
        side.unlink()  # an earlier run's list no longer describes this output
    if n_rejected > max_rejected * done:
        raise DataValidationError(
            f"{n_rejected:,} of {done:,} rows ({n_rejected / done:.1%}) cannot be scored, more "
            f"than the {max_rejected:.1%} allowed; nothing was written but their reasons, in "
            f"{side}." + ("" if impute_missing else " Rows with missing features are scored "
                          "with the federation's medians only when asked (impute_missing)."))
    result = pd.concat(parts, ignore_index=True)
    table = pa.Table.from_pandas(result, preserve_index=False)
    if out.suffix == ".parquet":
        pq.write_table(table, out)
    else:
        pacsv.write_csv(table, out)  # about 8x faster than DataFrame.to_csv here
    return Scored(rows=done, scored=done - n_rejected, rejected=n_rejected,
                  rejected_file=side if n_rejected else None)
