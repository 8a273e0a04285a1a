"""Clinical acceptability report, per site and per site type.

A model is *acceptable* at a site when it discriminates well enough (AUC at least
``min_auc``) and is calibrated there (calibration slope inside ``slope_range`` and
calibration-in-the-large within ``±max_abs_citl``). Each verdict comes with a percentile
bootstrap confidence interval for the AUC and, when it fails, a reason that names the
criterion and the value, e.g. ``"calibration slope 0.62 outside [0.8, 1.2]"``.

The report also pools the test predictions of all sites of one type (tier3, tier2,
community) and asks whether any site is worse off with the federated model than with a
model trained on its own rows alone ("no site is worse off").

All randomness (the bootstrap) comes from numpy Generators seeded from ``seed``, the site
or type name: the same inputs and seed give the same report, and adding a site does not
change the intervals of the others.
"""

from __future__ import annotations

import html
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import binary_metrics, validate_binary_inputs
from cardiofed.exceptions import ConfigurationError

if TYPE_CHECKING:  # the simulation pulls in torch; scoring code should not need it
    from cardiofed.simulation.experiment import ExperimentResult

__all__ = [
    "AcceptabilityCriteria",
    "AcceptabilityReport",
    "LocalComparison",
    "SiteAssessment",
    "acceptability_from_experiment",
    "acceptability_report",
    "assess",
    "auc_confidence_interval",
]

FloatArray = npt.NDArray[np.float64]
Predictions = Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]

MISSING = "\u2013"  # en dash, shown for nan / None
_MAX_BOOTSTRAP_CELLS = 2_000_000  # resamples x rows held in memory at once


def _is_real(value: object) -> TypeGuard[float]:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_) and math.isfinite(float(value)))


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def _check_level(value: object) -> float:
    if not (_is_real(value) and 0.0 < float(value) < 1.0):
        raise ConfigurationError(f"ci_level must be in (0, 1); got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class AcceptabilityCriteria:
    """Thresholds a model must meet at a site to be called clinically acceptable.

    Attributes:
        min_auc: smallest acceptable AUC (inclusive), in [0, 1].
        slope_range: (low, high) acceptable calibration slope, inclusive, low < high.
        max_abs_citl: largest acceptable |calibration-in-the-large| (logit scale), >= 0.
        threshold: decision threshold for sensitivity / specificity, in [0, 1].
        n_bootstrap: bootstrap resamples for the AUC interval; 0 skips the interval.
        ci_level: coverage of the AUC interval, in (0, 1).
    """

    min_auc: float = 0.70
    slope_range: tuple[float, float] = (0.8, 1.2)
    max_abs_citl: float = 0.1
    threshold: float = 0.5
    n_bootstrap: int = 500
    ci_level: float = 0.95

    def __post_init__(self) -> None:
        if not (_is_real(self.min_auc) and 0.0 <= self.min_auc <= 1.0):
            raise ConfigurationError(f"min_auc must be in [0, 1]; got {self.min_auc!r}")
        rng_ok = (isinstance(self.slope_range, Sequence) and len(self.slope_range) == 2
                  and all(_is_real(v) for v in self.slope_range)
                  and self.slope_range[0] < self.slope_range[1])
        if not rng_ok:
            raise ConfigurationError("slope_range must be two finite numbers (low, high) with "
                                     f"low < high; got {self.slope_range!r}")
        object.__setattr__(self, "slope_range",
                           (float(self.slope_range[0]), float(self.slope_range[1])))
        if not (_is_real(self.max_abs_citl) and self.max_abs_citl >= 0.0):
            raise ConfigurationError(
                f"max_abs_citl must be a finite number >= 0; got {self.max_abs_citl!r}")
        if not (_is_real(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ConfigurationError(f"threshold must be in [0, 1]; got {self.threshold!r}")
        _check_count("n_bootstrap", self.n_bootstrap)
        _check_level(self.ci_level)

    def describe(self) -> str:
        low, high = self.slope_range
        return (f"AUC >= {self.min_auc:g}, calibration slope in [{low:g}, {high:g}], "
                f"|calibration-in-the-large| <= {self.max_abs_citl:g}")


# --------------------------------------------------------------------------- bootstrap


def _weighted_auc(order: npt.NDArray[np.intp], starts: npt.NDArray[np.intp],
                  is_pos: npt.NDArray[np.bool_], weights: FloatArray) -> FloatArray:
    """Mann-Whitney AUC (ties count 1/2) of each row of `weights` (row multiplicities).

    `order` sorts the scores, `starts` marks the first index of each tie group in sorted
    order, `is_pos` is the sorted positive mask. Returns nan for rows lacking a class.
    """
    w = weights[:, order]
    pos_w = np.add.reduceat(np.where(is_pos, w, 0.0), starts, axis=1)
    neg_w = np.add.reduceat(np.where(is_pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    total_pos = pos_w.sum(axis=1)
    total_neg = neg_w.sum(axis=1)
    wins = np.sum(pos_w * (neg_below + 0.5 * neg_w), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = wins / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def auc_confidence_interval(y: npt.ArrayLike, p: npt.ArrayLike, *, n_bootstrap: int,
                            level: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval for the AUC, resampling rows with replacement.

    Resamples holding a single outcome class are skipped. Returns (nan, nan) when the
    interval is impossible: `y` has one class, ``n_bootstrap`` is 0, or every resample
    had one class.
    """
    n_boot = _check_count("n_bootstrap", n_bootstrap)
    level = _check_level(level)
    if not isinstance(rng, np.random.Generator):
        raise ConfigurationError(f"rng must be a numpy Generator; got {type(rng).__name__}")
    yv, pv = validate_binary_inputs(y, p)
    n = yv.size
    if n_boot == 0 or yv.min() == yv.max():
        return math.nan, math.nan
    order = np.argsort(pv, kind="stable")
    sorted_p = pv[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    is_pos = yv[order] == 1.0
    chunk = max(1, _MAX_BOOTSTRAP_CELLS // n)
    aucs: list[FloatArray] = []
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        idx = rng.integers(0, n, size=(b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        weights = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        aucs.append(_weighted_auc(order, starts, is_pos, weights))
    values = np.concatenate(aucs)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


# --------------------------------------------------------------------------- verdicts


def _fmt_value(value: float, low: float, high: float) -> str:
    """`value` with 2 decimals, or more when rounding would put it inside [low, high]."""
    for digits in range(2, 8):
        if not low <= round(value, digits) <= high:
            return f"{value:.{digits}f}"
    return repr(value)


@dataclass(frozen=True)
class SiteAssessment:
    """Metrics, AUC interval and acceptability verdicts of one model on one test set."""

    metrics: dict[str, float]
    auc_ci: tuple[float, float]
    auc_ok: bool
    slope_ok: bool
    citl_ok: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def acceptable(self) -> bool:
        return self.auc_ok and self.slope_ok and self.citl_ok

    @property
    def auc(self) -> float:
        return self.metrics["auc"]

    @property
    def n(self) -> int:
        return int(self.metrics["n"])

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": {k: _json_float(v) for k, v in self.metrics.items()},
                "auc_ci": [_json_float(v) for v in self.auc_ci],
                "auc_ok": self.auc_ok, "slope_ok": self.slope_ok, "citl_ok": self.citl_ok,
                "acceptable": self.acceptable, "reasons": list(self.reasons)}


def assess(y: npt.ArrayLike, p: npt.ArrayLike, criteria: AcceptabilityCriteria | None = None,
           *, rng: np.random.Generator) -> SiteAssessment:
    """Judge predicted risks `p` against outcomes `y` under `criteria`.

    A metric that is not estimable (nan: one outcome class, separation) fails its criterion.
    """
    criteria = criteria or AcceptabilityCriteria()
    metrics = binary_metrics(y, p, threshold=criteria.threshold)
    ci = auc_confidence_interval(y, p, n_bootstrap=criteria.n_bootstrap,
                                 level=criteria.ci_level, rng=rng)
    auc = metrics["auc"]
    slope = metrics["calibration_slope"]
    citl = metrics["calibration_intercept"]
    low, high = criteria.slope_range
    limit = criteria.max_abs_citl
    reasons: list[str] = []

    auc_ok = math.isfinite(auc) and auc >= criteria.min_auc
    if math.isnan(auc):
        reasons.append("AUC not estimable (one outcome class)")
    elif not auc_ok:
        reasons.append(f"AUC {_fmt_value(auc, criteria.min_auc, 1.0)} below minimum "
                       f"{criteria.min_auc:g}")
    slope_ok = math.isfinite(slope) and low <= slope <= high
    if math.isnan(slope):
        reasons.append("calibration slope not estimable")
    elif not slope_ok:
        reasons.append(f"calibration slope {_fmt_value(slope, low, high)} outside "
                       f"[{low:g}, {high:g}]")
    citl_ok = math.isfinite(citl) and abs(citl) <= limit
    if math.isnan(citl):
        reasons.append("calibration-in-the-large not estimable")
    elif not citl_ok:
        reasons.append(f"calibration-in-the-large {_fmt_value(citl, -limit, limit)} outside "
                       f"[{-limit:g}, {limit:g}]")
    return SiteAssessment(metrics=metrics, auc_ci=ci, auc_ok=auc_ok, slope_ok=slope_ok,
                          citl_ok=citl_ok, reasons=reasons)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class LocalComparison:
    """Federated vs local-only AUC at one site: is the site worse off by federating?

    ``status`` is "better", "tie" (exactly equal AUCs), "within tolerance" (lower, but by no
    more than the tolerance), "worse" or "not estimable"; ``not_worse`` is
    federated >= local-only - tolerance (None when either AUC is nan).
    """

    federated_auc: float
    local_auc: float
    difference: float  # federated - local-only
    tolerance: float
    not_worse: bool | None
    status: str

    @classmethod
    def of(cls, federated_auc: float, local_auc: float, tolerance: float) -> LocalComparison:
        diff = federated_auc - local_auc
        if math.isnan(diff):
            return cls(federated_auc, local_auc, diff, tolerance, None, "not estimable")
        if diff == 0.0:
            status = "tie"
        elif diff > 0.0:
            status = "better"
        else:
            status = "within tolerance" if diff >= -tolerance else "worse"
        return cls(federated_auc, local_auc, diff, tolerance, bool(diff >= -tolerance), status)

    def to_dict(self) -> dict[str, Any]:
        return {"federated_auc": _json_float(self.federated_auc),
                "local_auc": _json_float(self.local_auc),
                "difference": _json_float(self.difference), "tolerance": self.tolerance,
                "not_worse": self.not_worse, "status": self.status}


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _num(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else MISSING


@dataclass(frozen=True)
class AcceptabilityReport:
    """Per-site and per-site-type acceptability of one model, and the worse-off check."""

    criteria: AcceptabilityCriteria
    seed: int
    site_types: dict[str, str]
    sites: dict[str, SiteAssessment]
    types: dict[str, SiteAssessment]
    type_members: dict[str, list[str]]
    comparisons: dict[str, LocalComparison] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """Worst site and its AUC, AUC spread (max - min), counts, and the worse-off verdict.

        ``no_site_worse_off`` is True when every site was compared and none is worse off,
        False when any is worse off, and None when no comparison was made or some AUC
        was not estimable.
        """
        aucs = {s: a.auc for s, a in self.sites.items() if math.isfinite(a.auc)}
        worst = min(aucs, key=aucs.__getitem__) if aucs else None
        verdicts = [c.not_worse for c in self.comparisons.values()]
        if any(v is False for v in verdicts):
            no_worse: bool | None = False
        elif verdicts and len(verdicts) == len(self.sites) and all(verdicts):
            no_worse = True
        else:
            no_worse = None
        return {
            "n_sites": len(self.sites),
            "n_acceptable": sum(a.acceptable for a in self.sites.values()),
            "acceptable_sites": [s for s, a in self.sites.items() if a.acceptable],
            "worst_site": worst,
            "worst_site_auc": aucs[worst] if worst is not None else math.nan,
            "auc_spread": max(aucs.values()) - min(aucs.values()) if aucs else math.nan,
            "n_types_acceptable": sum(a.acceptable for a in self.types.values()),
            "n_compared": len(self.comparisons),
            "n_worse_off": sum(v is False for v in verdicts),
            "no_site_worse_off": no_worse,
        }

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows for a table: one per site, then one per site type (pooled)."""
        out: list[dict[str, Any]] = []
        entries = ([("site", s, self.site_types[s], a) for s, a in self.sites.items()]
                   + [("type", t, t, a) for t, a in self.types.items()])
        for level, name, site_type, a in entries:
            m = a.metrics
            comp = self.comparisons.get(name) if level == "site" else None
            out.append({
                "level": level, "name": name, "type": site_type, "n": a.n,
                "prevalence": m["prevalence"], "auc": m["auc"],
                "auc_ci_low": a.auc_ci[0], "auc_ci_high": a.auc_ci[1],
                "calibration_slope": m["calibration_slope"],
                "calibration_intercept": m["calibration_intercept"],
                "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                "auc_ok": a.auc_ok, "slope_ok": a.slope_ok, "citl_ok": a.citl_ok,
                "acceptable": a.acceptable, "reasons": "; ".join(a.reasons),
                "local_auc": comp.local_auc if comp else math.nan,
                "auc_vs_local": comp.difference if comp else math.nan,
                "vs_local": comp.status if comp else "",
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nan and infinities become None."""
        c = self.criteria
        summary = {k: _json_float(v) if isinstance(v, float) else v
                   for k, v in self.summary.items()}
        return {
            "criteria": {"min_auc": c.min_auc, "slope_range": list(c.slope_range),
                         "max_abs_citl": c.max_abs_citl, "threshold": c.threshold,
                         "n_bootstrap": c.n_bootstrap, "ci_level": c.ci_level},
            "seed": self.seed,
            "site_types": dict(self.site_types),
            "sites": {s: a.to_dict() for s, a in self.sites.items()},
            "types": {t: {**a.to_dict(), "sites": list(self.type_members[t])}
                      for t, a in self.types.items()},
            "comparisons": {s: c.to_dict() for s, c in self.comparisons.items()},
            "summary": summary,
        }

    def _table(self) -> tuple[list[str], list[list[str]], list[bool]]:
        pct = f"{self.criteria.ci_level * 100:g}%"
        header = ["Level", "Site / type", "Type", "n", "AUC", f"AUC {pct} CI", "Slope",
                  "CITL", "Sens.", "Spec.", "vs local-only", "Acceptable", "Reasons"]
        body: list[list[str]] = []
        verdicts: list[bool] = []
        for r in self.rows():
            ci = (f"{_num(r['auc_ci_low'])}\u2013{_num(r['auc_ci_high'])}"
                  if math.isfinite(r["auc_ci_low"]) else MISSING)
            vs = (f"{r['vs_local']} ({r['auc_vs_local']:+.3f})"
                  if r["vs_local"] and math.isfinite(r["auc_vs_local"])
                  else (r["vs_local"] or MISSING))
            body.append([r["level"], r["name"], r["type"], str(r["n"]), _num(r["auc"]), ci,
                         _num(r["calibration_slope"], 2), _num(r["calibration_intercept"], 2),
                         _num(r["sensitivity"], 2), _num(r["specificity"], 2), vs,
                         "yes" if r["acceptable"] else "no", r["reasons"] or MISSING])
            verdicts.append(bool(r["acceptable"]))
        return header, body, verdicts

    def _summary_line(self) -> str:
        s = self.summary
        worse = {True: "no site is worse off than with its local-only model",
                 False: f"{s['n_worse_off']} site(s) worse off than with their local-only model",
                 None: "worse-off check incomplete or not run"}[s["no_site_worse_off"]]
        worst = (f"worst site {s['worst_site']} (AUC {_num(s['worst_site_auc'])})"
                 if s["worst_site"] is not None else "no site AUC estimable")
        return (f"{s['n_acceptable']} of {s['n_sites']} sites acceptable; {worst}; "
                f"AUC spread {_num(s['auc_spread'])}; {worse}.")

    def to_markdown(self) -> str:
        header, body, verdicts = self._table()

        def cell(text: str) -> str:
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = [f"Criteria: {self.criteria.describe()}.", "",
                 "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        for row, ok in zip(body, verdicts, strict=True):
            row = [*row[:11], "\u2713 yes" if ok else "\u2717 **no**", row[12]]
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        lines += ["", self._summary_line()]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """An HTML fragment (a <section>): criteria, the table with marks, the summary."""
        header, body, verdicts = self._table()
        esc = html.escape
        parts = ['<section class="acceptability">',
                 f"<p>Criteria: {esc(self.criteria.describe())}.</p>",
                 '<table class="acceptability">',
                 "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                 + "</tr></thead>", "<tbody>"]
        for row, ok in zip(body, verdicts, strict=True):
            mark = ('<td class="ok">\u2713 acceptable</td>' if ok
                    else '<td class="not-ok">\u2717 not acceptable</td>')
            cells = [f"<td>{esc(c)}</td>" for c in row[:11]] + [mark, f"<td>{esc(row[12])}</td>"]
            parts.append(f'<tr class="{esc(row[0])}">' + "".join(cells) + "</tr>")
        parts += ["</tbody>", "</table>", f"<p>{esc(self._summary_line())}</p>", "</section>"]
        return "\n".join(parts) + "\n"


def _rng(seed: int, kind: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, kind, zlib.crc32(name.encode("utf-8"))])


def acceptability_report(predictions: Predictions, site_types: Mapping[str, str], *,
                         criteria: AcceptabilityCriteria | None = None, seed: int = 0,
                         local_only: Predictions | None = None,
                         tolerance: float = 0.0) -> AcceptabilityReport:
    """Assess a model's test predictions at every site and for every site type.

    Args:
        predictions: site -> (y_true, y_prob) of the model under review (the federated one)
            on that site's test split.
        site_types: site -> type (tier3, tier2, community); must cover every site.
        criteria: acceptability thresholds (defaults: :class:`AcceptabilityCriteria`).
        seed: seeds the bootstrap; each site and type draws from its own stream.
        local_only: site -> (y_true, y_prob) of the site's local-only model on its test
            split; sites present in both get a federated vs local-only AUC comparison.
        tolerance: a site is "not worse off" when federated AUC >= local-only AUC - tolerance.
    """
    criteria = criteria or AcceptabilityCriteria()
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigurationError(f"seed must be a non-negative integer; got {seed!r}")
    if not (_is_real(tolerance) and tolerance >= 0.0):
        raise ConfigurationError(f"tolerance must be a finite number >= 0; got {tolerance!r}")
    if not predictions:
        raise ConfigurationError("predictions must hold at least one site; got none")
    missing = [s for s in predictions if s not in site_types]
    if missing:
        raise ConfigurationError(f"site_types has no type for site(s) {missing!r}")

    arrays = {s: validate_binary_inputs(*predictions[s]) for s in predictions}
    sites = {s: assess(y, p, criteria, rng=_rng(int(seed), 0, s)) for s, (y, p) in arrays.items()}
    members: dict[str, list[str]] = {}
    for s in predictions:
        members.setdefault(site_types[s], []).append(s)
    types = {
        t: assess(np.concatenate([arrays[s][0] for s in names]),
                  np.concatenate([arrays[s][1] for s in names]), criteria,
                  rng=_rng(int(seed), 1, t))
        for t, names in members.items()
    }
    comparisons: dict[str, LocalComparison] = {}
    for s in predictions:
        if local_only is not None and s in local_only:
            local = binary_metrics(*local_only[s])["auc"]
            comparisons[s] = LocalComparison.of(sites[s].auc, local, float(tolerance))
    return AcceptabilityReport(criteria=criteria, seed=int(seed),
                               site_types={s: site_types[s] for s in predictions},
                               sites=sites, types=types, type_members=members,
                               comparisons=comparisons)


def acceptability_from_experiment(result: ExperimentResult, *, model: str | None = None,
                                  criteria: AcceptabilityCriteria | None = None,
                                  seed: int = 0, tolerance: float = 0.0
                                  ) -> AcceptabilityReport:
    """The report for one model of a :class:`~cardiofed.simulation.experiment.ExperimentResult`.

    `model` defaults to the federated one; local-only predictions, when the experiment ran
    baselines, feed the worse-off check.
    """
    from cardiofed.simulation.experiment import FEDERATED, LOCAL

    label = model or FEDERATED
    preds = {s: by_model[label] for s, by_model in result.predictions.items()
             if label in by_model}
    if not preds:
        raise ConfigurationError(f"model {label!r} has no predictions in this experiment")
    local = {s: by_model[LOCAL] for s, by_model in result.predictions.items()
             if LOCAL in by_model and label != LOCAL}
    return acceptability_report(preds, result.site_types, criteria=criteria, seed=seed,
                                local_only=local or None, tolerance=tolerance)
