"""Clinical acceptability per site and per site type, judged on confidence intervals.

A model is *acceptable* at a site when it discriminates (AUC at least ``min_auc``) and is
calibrated there (calibration slope inside ``slope_range``, calibration-in-the-large
within ``±max_abs_citl``). A test split of 100 patients with 8 events cannot show either,
so each criterion is judged on its ``ci_level`` interval
(:mod:`cardiofed.evaluation.uncertainty`), with three verdicts:

* **acceptable**: the whole interval meets the criterion;
* **not acceptable**: the whole interval misses it;
* **insufficient evidence**: the interval spans the threshold, or the metric is not
  estimable (one outcome class).

A site is not acceptable when any criterion is, acceptable when all are, and
insufficient evidence otherwise. The comparison with the site's local-only model is
DeLong's paired test on the same patients: "better" or "worse" only when significant.
Where the true risks are known (synthetic cohorts), each site also gets its *achievable*
AUC, that of the true risks on the same outcomes, and the model's share of it; a site
whose true risks reach less than ``min_auc`` is limited by its case mix, not the model.

The report pools the test predictions of each site type (tier3, tier2, community) as
well. Nothing here is random.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import binary_metrics, validate_binary_inputs
from cardiofed.evaluation.uncertainty import (
    PairedComparison,
    auc_interval,
    calibration_intervals,
    paired_auc_test,
)
from cardiofed.exceptions import ConfigurationError

if TYPE_CHECKING:  # the simulation pulls in torch; scoring code should not need it
    from cardiofed.simulation.experiment import ExperimentResult

__all__ = [
    "AcceptabilityCriteria",
    "AcceptabilityReport",
    "Check",
    "SiteAssessment",
    "Verdict",
    "acceptability_from_experiment",
    "acceptability_report",
    "assess",
]

Predictions = Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]
MISSING = "\u2013"  # en dash, shown for nan / None


def _is_real(value: object) -> TypeGuard[float]:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_) and math.isfinite(float(value)))


@dataclass(frozen=True, kw_only=True)
class AcceptabilityCriteria:
    """Thresholds a model must meet at a site to be called clinically acceptable.

    Attributes:
        min_auc: smallest acceptable AUC (inclusive), in [0, 1].
        slope_range: (low, high) acceptable calibration slope, inclusive, low < high.
        max_abs_citl: largest acceptable |calibration-in-the-large| (logit scale), >= 0.
        threshold: decision threshold for sensitivity / specificity, in [0, 1].
        ci_level: coverage of every interval, in (0, 1); 1 - ci_level is also the
            significance level of the comparison with local-only models.
    """

    min_auc: float = 0.70
    slope_range: tuple[float, float] = (0.8, 1.2)
    max_abs_citl: float = 0.1
    threshold: float = 0.5
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
        if not (_is_real(self.ci_level) and 0.0 < self.ci_level < 1.0):
            raise ConfigurationError(f"ci_level must be in (0, 1); got {self.ci_level!r}")

    def describe(self) -> str:
        low, high = self.slope_range
        return (f"AUC >= {self.min_auc:g}, calibration slope in [{low:g}, {high:g}], "
                f"|calibration-in-the-large| <= {self.max_abs_citl:g}, each judged on its "
                f"{self.ci_level:.0%} interval")


class Verdict(StrEnum):
    ACCEPTABLE = "acceptable"
    NOT_ACCEPTABLE = "not acceptable"
    INSUFFICIENT = "insufficient evidence"


@dataclass(frozen=True)
class Check:
    """One criterion at one site: the estimate, its interval and the verdict."""

    criterion: str  # "AUC", "calibration slope" or "calibration-in-the-large"
    value: float
    interval: tuple[float, float]
    low: float  # the acceptable region [low, high]
    high: float
    verdict: Verdict
    reason: str  # empty when acceptable

    @property
    def point_ok(self) -> bool:
        """The point estimate alone meets the criterion."""
        return math.isfinite(self.value) and self.low <= self.value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {"value": _json_float(self.value),
                "interval": [_json_float(v) for v in self.interval],
                "verdict": str(self.verdict), "point_ok": self.point_ok,
                "reason": self.reason}


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else MISSING


def _check(criterion: str, value: float, interval: tuple[float, float], low: float,
           high: float, region: str) -> Check:
    lo, hi = interval
    if not (math.isfinite(value) and math.isfinite(lo) and math.isfinite(hi)):
        return Check(criterion, value, interval, low, high, Verdict.INSUFFICIENT,
                     f"{criterion} not estimable")
    shown = f"{criterion} {_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"
    if low <= lo and hi <= high:
        return Check(criterion, value, interval, low, high, Verdict.ACCEPTABLE, "")
    if hi < low or lo > high:
        return Check(criterion, value, interval, low, high, Verdict.NOT_ACCEPTABLE,
                     f"{shown} outside {region}")
    return Check(criterion, value, interval, low, high, Verdict.INSUFFICIENT,
                 f"{shown} spans the limit of {region}")


@dataclass(frozen=True)
class SiteAssessment:
    """Metrics of one model on one test set and its three checks."""

    metrics: dict[str, float]
    checks: tuple[Check, Check, Check]  # AUC, calibration slope, calibration-in-the-large

    @property
    def verdict(self) -> Verdict:
        return combined(self.checks)

    @property
    def acceptable(self) -> bool:
        return self.verdict is Verdict.ACCEPTABLE

    @property
    def point_acceptable(self) -> bool:
        """Every point estimate meets its criterion (ignoring the intervals)."""
        return all(c.point_ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if c.reason]

    @property
    def auc(self) -> float:
        return self.metrics["auc"]

    @property
    def auc_ci(self) -> tuple[float, float]:
        return self.checks[0].interval

    @property
    def n(self) -> int:
        return int(self.metrics["n"])

    def to_dict(self) -> dict[str, Any]:
        auc, slope, citl = self.checks
        return {"metrics": {k: _json_float(v) for k, v in self.metrics.items()},
                "auc": auc.to_dict(), "calibration_slope": slope.to_dict(),
                "calibration_intercept": citl.to_dict(), "verdict": str(self.verdict),
                "point_acceptable": self.point_acceptable, "reasons": self.reasons}


def assess(y: npt.ArrayLike, p: npt.ArrayLike,
           criteria: AcceptabilityCriteria | None = None) -> SiteAssessment:
    """Judge predicted risks `p` against outcomes `y` under `criteria`."""
    c = criteria or AcceptabilityCriteria()
    metrics = binary_metrics(y, p, threshold=c.threshold)
    calibration = calibration_intervals(y, p, level=c.ci_level)
    checks = (
        discrimination_check(metrics["auc"], auc_interval(y, p, level=c.ci_level), c),
        *calibration_checks(metrics["calibration_slope"], calibration["calibration_slope"],
                            metrics["calibration_intercept"],
                            calibration["calibration_intercept"], c),
    )
    return SiteAssessment(metrics=metrics, checks=checks)


def combined(checks: Sequence[Check]) -> Verdict:
    """One verdict of several checks: not acceptable if any is, acceptable if all are,
    else insufficient evidence."""
    verdicts = {c.verdict for c in checks}
    if Verdict.NOT_ACCEPTABLE in verdicts:
        return Verdict.NOT_ACCEPTABLE
    return Verdict.ACCEPTABLE if verdicts == {Verdict.ACCEPTABLE} else Verdict.INSUFFICIENT


def discrimination_check(value: float, interval: tuple[float, float],
                         criteria: AcceptabilityCriteria | None = None,
                         name: str = "AUC") -> Check:
    """A discrimination statistic (AUC, or a survival model's C index) judged on its
    interval against ``criteria.min_auc``, as :func:`assess` judges the AUC."""
    c = criteria or AcceptabilityCriteria()
    return _check(name, value, interval, c.min_auc, 1.0, f">= {c.min_auc:g}")


def calibration_checks(slope: float, slope_interval: tuple[float, float], citl: float,
                       citl_interval: tuple[float, float],
                       criteria: AcceptabilityCriteria | None = None
                       ) -> tuple[Check, Check]:
    """The calibration slope and calibration-in-the-large judged on their intervals, as
    :func:`assess` judges them (also for metrics a site reported, on the dashboard)."""
    c = criteria or AcceptabilityCriteria()
    low, high = c.slope_range
    limit = c.max_abs_citl
    return (_check("calibration slope", slope, slope_interval, low, high,
                   f"[{low:g}, {high:g}]"),
            _check("calibration-in-the-large", citl, citl_interval, -limit, limit,
                   f"[{-limit:g}, {limit:g}]"))


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def interval_text(check: Check, digits: int = 3) -> str:
    """A check's estimate and interval as a table shows them, e.g. ``0.95 [0.81, 1.09]``."""
    lo, hi = check.interval
    if not (math.isfinite(check.value) and math.isfinite(lo)):
        return _fmt(check.value)
    return f"{check.value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


@dataclass(frozen=True)
class AcceptabilityReport:
    """Per-site and per-site-type acceptability of one model, the comparison with each
    site's local-only model, and (synthetic data) the share of the achievable AUC."""

    criteria: AcceptabilityCriteria
    site_types: dict[str, str]
    sites: dict[str, SiteAssessment]
    types: dict[str, SiteAssessment]
    type_members: dict[str, list[str]]
    comparisons: dict[str, PairedComparison] = field(default_factory=dict)
    achievable: dict[str, SiteAssessment] = field(default_factory=dict)

    def share_of_achievable(self, site: str) -> float:
        """The model's AUC as a fraction of the true risks' AUC at `site` (nan: unknown)."""
        if site not in self.achievable:
            return math.nan
        return self.sites[site].auc / self.achievable[site].auc

    def limited_by_case_mix(self, site: str) -> bool:
        """Even the true risks reach an AUC below ``min_auc`` at `site`."""
        a = self.achievable.get(site)
        return a is not None and a.auc < self.criteria.min_auc

    @property
    def summary(self) -> dict[str, Any]:
        """Counts of each verdict, the worst site, the comparison with local-only models.

        ``no_site_worse_off`` is True when every site was compared and none is
        significantly worse, False when any is, and None when the comparison is
        incomplete.
        """
        aucs = {s: a.auc for s, a in self.sites.items() if math.isfinite(a.auc)}
        worst = min(aucs, key=aucs.__getitem__) if aucs else None
        statuses = [c.status for c in self.comparisons.values()]
        if "worse" in statuses:
            no_worse: bool | None = False
        elif statuses and len(statuses) == len(self.sites) and "not estimable" not in statuses:
            no_worse = True
        else:
            no_worse = None
        verdicts = [a.verdict for a in self.sites.values()]
        shares = [self.share_of_achievable(s) for s in self.sites]
        shares = [v for v in shares if math.isfinite(v)]
        return {
            "n_sites": len(self.sites),
            "n_acceptable": verdicts.count(Verdict.ACCEPTABLE),
            "n_not_acceptable": verdicts.count(Verdict.NOT_ACCEPTABLE),
            "n_insufficient_evidence": verdicts.count(Verdict.INSUFFICIENT),
            "n_point_acceptable": sum(a.point_acceptable for a in self.sites.values()),
            "acceptable_sites": [s for s, a in self.sites.items() if a.acceptable],
            "worst_site": worst,
            "worst_site_auc": aucs[worst] if worst is not None else math.nan,
            "auc_spread": max(aucs.values()) - min(aucs.values()) if aucs else math.nan,
            "n_types_acceptable": sum(a.acceptable for a in self.types.values()),
            "n_compared": len(self.comparisons),
            "n_worse_off": statuses.count("worse"),
            "n_better": statuses.count("better"),
            "no_site_worse_off": no_worse,
            "min_share_of_achievable": min(shares) if shares else math.nan,
            "limited_by_case_mix": [s for s in self.sites if self.limited_by_case_mix(s)],
        }

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows for a table: one per site, then one per site type (pooled)."""
        out: list[dict[str, Any]] = []
        entries = ([("site", s, self.site_types[s], a) for s, a in self.sites.items()]
                   + [("type", t, t, a) for t, a in self.types.items()])
        for level, name, site_type, a in entries:
            m = a.metrics
            auc, slope, citl = a.checks
            comp = self.comparisons.get(name) if level == "site" else None
            oracle = self.achievable.get(name) if level == "site" else None
            out.append({
                "level": level, "name": name, "type": site_type, "n": a.n,
                "prevalence": m["prevalence"], "auc": auc.value,
                "auc_ci_low": auc.interval[0], "auc_ci_high": auc.interval[1],
                "calibration_slope": slope.value, "slope_ci_low": slope.interval[0],
                "slope_ci_high": slope.interval[1], "calibration_intercept": citl.value,
                "citl_ci_low": citl.interval[0], "citl_ci_high": citl.interval[1],
                "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                "verdict": str(a.verdict), "acceptable": a.acceptable,
                "reasons": "; ".join(a.reasons),
                "local_auc": comp.auc_b if comp else math.nan,
                "auc_vs_local": comp.difference if comp else math.nan,
                "vs_local_p": comp.p_value if comp else math.nan,
                "vs_local": comp.status if comp else "",
                "achievable_auc": oracle.auc if oracle else math.nan,
                "share_of_achievable": self.share_of_achievable(name) if oracle else math.nan,
                "limited_by_case_mix": level == "site" and self.limited_by_case_mix(name),
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
                         "ci_level": c.ci_level},
            "site_types": dict(self.site_types),
            "sites": {s: a.to_dict() for s, a in self.sites.items()},
            "types": {t: {**a.to_dict(), "sites": list(self.type_members[t])}
                      for t, a in self.types.items()},
            "comparisons": {s: c.to_dict() for s, c in self.comparisons.items()},
            "achievable": {s: {"auc": a.checks[0].to_dict(),
                               "share": _json_float(self.share_of_achievable(s)),
                               "limited_by_case_mix": self.limited_by_case_mix(s)}
                           for s, a in self.achievable.items()},
            "summary": summary,
        }

    def _table(self) -> tuple[list[str], list[list[str]], list[str]]:
        pct = f"{self.criteria.ci_level:.0%}"
        header = ["Level", "Site / type", "Type", "n", f"AUC [{pct} CI]",
                  f"Slope [{pct} CI]", f"CITL [{pct} CI]", "vs local-only"]
        if self.achievable:
            header.append("Share of achievable AUC")
        header += ["Verdict", "Reasons"]
        body: list[list[str]] = []
        verdicts: list[str] = []
        for row, a in zip(self.rows(), [*self.sites.values(), *self.types.values()],
                          strict=True):
            auc, slope, citl = a.checks
            vs = (f"{row['vs_local']} ({row['auc_vs_local']:+.3f}, p={row['vs_local_p']:.2g})"
                  if math.isfinite(row["auc_vs_local"]) else (row["vs_local"] or MISSING))
            cells = [row["level"], row["name"], row["type"], str(row["n"]), interval_text(auc),
                     interval_text(slope, 2), interval_text(citl, 2), vs]
            if self.achievable:
                share = row["share_of_achievable"]
                cells.append(MISSING if not math.isfinite(share) else
                             f"{share:.1%} of {row['achievable_auc']:.3f}"
                             + (" (case mix limits the site)" if row["limited_by_case_mix"]
                                else ""))
            cells += [row["verdict"], row["reasons"] or MISSING]
            body.append(cells)
            verdicts.append(row["verdict"])
        return header, body, verdicts

    def _summary_line(self) -> str:
        s = self.summary
        worse = {True: "no site is significantly worse off than with its local-only model",
                 False: f"{s['n_worse_off']} site(s) significantly worse off than with their "
                        f"local-only model",
                 None: "comparison with local-only models incomplete or not run"}[
            s["no_site_worse_off"]]
        return (f"{s['n_acceptable']} of {s['n_sites']} sites acceptable, "
                f"{s['n_not_acceptable']} not acceptable, {s['n_insufficient_evidence']} "
                f"with insufficient evidence; {s['n_better']} significantly better than "
                f"local-only; {worse}.")

    def to_markdown(self) -> str:
        header, body, _ = self._table()

        def cell(text: str) -> str:
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = [f"Criteria: {self.criteria.describe()}.", "",
                 "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
        lines += ["", self._summary_line()]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """An HTML fragment (a <section>): criteria, the table with marks, the summary."""
        header, body, verdicts = self._table()
        esc = html.escape
        css = {str(Verdict.ACCEPTABLE): "ok", str(Verdict.NOT_ACCEPTABLE): "not-ok",
               str(Verdict.INSUFFICIENT): "unsure"}
        parts = ['<section class="acceptability">',
                 f"<p>Criteria: {esc(self.criteria.describe())}.</p>",
                 '<table class="acceptability">',
                 "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                 + "</tr></thead>", "<tbody>"]
        for row, verdict in zip(body, verdicts, strict=True):
            cells = [f"<td>{esc(c)}</td>" for c in row[:-2]]
            cells += [f'<td class="{css[verdict]}">{esc(verdict)}</td>',
                      f"<td>{esc(row[-1])}</td>"]
            parts.append(f'<tr class="{esc(row[0])}">' + "".join(cells) + "</tr>")
        parts += ["</tbody>", "</table>", f"<p>{esc(self._summary_line())}</p>", "</section>"]
        return "\n".join(parts) + "\n"


def acceptability_report(predictions: Predictions, site_types: Mapping[str, str], *,
                         criteria: AcceptabilityCriteria | None = None,
                         local_only: Predictions | None = None,
                         achievable: Predictions | None = None) -> AcceptabilityReport:
    """Assess a model's test predictions at every site and for every site type.

    Args:
        predictions: site -> (y_true, y_prob) of the model under review on that site's
            test split.
        site_types: site -> type (tier3, tier2, community); must cover every site.
        criteria: acceptability thresholds (defaults: :class:`AcceptabilityCriteria`).
        local_only: site -> (y_true, y_prob) of the site's local-only model on the same
            rows; sites present in both get DeLong's paired comparison.
        achievable: site -> (y_true, true risk) on the same rows, where known.
    """
    criteria = criteria or AcceptabilityCriteria()
    if not predictions:
        raise ConfigurationError("predictions must hold at least one site; got none")
    missing = [s for s in predictions if s not in site_types]
    if missing:
        raise ConfigurationError(f"site_types has no type for site(s) {missing!r}")
    arrays = {s: validate_binary_inputs(*predictions[s]) for s in predictions}
    sites = {s: assess(y, p, criteria) for s, (y, p) in arrays.items()}
    members: dict[str, list[str]] = {}
    for s in predictions:
        members.setdefault(site_types[s], []).append(s)
    types = {t: assess(np.concatenate([arrays[s][0] for s in names]),
                       np.concatenate([arrays[s][1] for s in names]), criteria)
             for t, names in members.items()}
    comparisons = {}
    for s, (y, p) in arrays.items():
        if local_only is not None and s in local_only:
            y_local, p_local = validate_binary_inputs(*local_only[s])
            if not np.array_equal(y_local, y):
                raise ConfigurationError(f"local_only[{s!r}] is not on the same rows as the "
                                         f"model's predictions")
            comparisons[s] = paired_auc_test(y, p, p_local, level=criteria.ci_level)
    oracle = {s: assess(*achievable[s], criteria) for s in predictions
              if achievable is not None and s in achievable}
    return AcceptabilityReport(criteria=criteria,
                               site_types={s: site_types[s] for s in predictions},
                               sites=sites, types=types, type_members=members,
                               comparisons=comparisons, achievable=oracle)


def acceptability_from_experiment(result: ExperimentResult, *, model: str | None = None,
                                  criteria: AcceptabilityCriteria | None = None
                                  ) -> AcceptabilityReport:
    """The report for one model of a :class:`~cardiofed.simulation.experiment.ExperimentResult`.

    `model` defaults to the experiment's best federated model (personalised when the
    experiment personalised it); local-only predictions, when the experiment ran
    baselines, feed the comparison, and true risks (synthetic data) the achievable AUC.
    """
    from cardiofed.simulation.experiment import LOCAL, TRUE_RISK

    label = model or result.headline_model
    preds = {s: by_model[label] for s, by_model in result.predictions.items()
             if label in by_model}
    if not preds:
        raise ConfigurationError(f"model {label!r} has no predictions in this experiment")

    def of(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        found = {s: by_model[name] for s, by_model in result.predictions.items()
                 if name in by_model and s in preds}
        return found or None

    return acceptability_report(preds, result.site_types, criteria=criteria,
                                local_only=of(LOCAL) if label != LOCAL else None,
                                achievable=of(TRUE_RISK))
