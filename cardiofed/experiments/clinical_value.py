"""The clinical promise, site by site: what each kind of hospital gains by federating.

For every site and site type: the AUC (with its DeLong interval) of the local-only,
federated, personalised and pooled models and of the true risks where known (the
achievable), the acceptability verdict of the site's model, whether it is significantly
better than the site's local-only model, and the site's effective data (how many of its
own patients it would need alone). A site type's AUC pools the test patients of its
sites, so the type's interval reflects all of them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cardiofed.evaluation.metrics import auc_score
from cardiofed.evaluation.uncertainty import PairedComparison, auc_interval
from cardiofed.experiments.acceptability import AcceptabilityReport, acceptability_from_experiment
from cardiofed.experiments.effective_data import SiteEffectiveData

if TYPE_CHECKING:
    from cardiofed.simulation.experiment import ExperimentResult

__all__ = ["ClinicalValue", "clinical_value"]

MISSING = "\u2013"
Interval = tuple[float, float, float]  # estimate, low, high


def _auc(y: np.ndarray, p: np.ndarray, level: float) -> Interval:
    low, high = auc_interval(y, p, level=level)  # checks the inputs
    auc = auc_score(y, p)
    return auc, low, high


def _shown(value: Interval) -> str:
    auc, low, high = value
    if not math.isfinite(auc):
        return MISSING
    return f"{auc:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{auc:.3f}"


def effective_claim(e: SiteEffectiveData | None, comp: PairedComparison | None
                    ) -> tuple[str, float | None]:
    """A site's effective data as the report states it, and the multiple when it is a
    figure (None for a bound). One comparison decides (the federation against the site's
    own model, DeLong): worse gives "< 1x", no significant difference "~1x"; better, a
    multiple above 1, read off the site's learning curve only within the sizes it
    measured: beyond them, "> Nx" with N the largest multiple measured. So effective
    data never disagrees with "vs alone", and no figure lies beyond what was measured."""
    if e is None or e.status == "not estimable" or not e.curve:
        return MISSING, None
    if comp is not None and comp.status == "worse":
        return "< 1x", None
    if comp is not None and comp.status != "better":
        return "~1x", None
    smallest, largest = (f(p.size for p in e.curve) / e.own_size for f in (min, max))
    floor = 1.0 if comp is not None else 0.0  # better than alone: more than its own rows
    if (e.status == "estimated" and not e.extrapolated
            and floor < e.multiple <= largest):
        return f"{e.multiple:.1f}x", e.multiple
    if e.status == "at most" and floor < min(e.multiple, smallest):
        return f"<= {min(e.multiple, smallest):.3g}x", None
    return f"> {max(floor, min(largest, e.multiple)):.3g}x", None


def _versus(comp: PairedComparison | None) -> str:
    """The signed AUC difference to the site alone, and whether it is significant."""
    if comp is None or not math.isfinite(comp.difference):
        return MISSING
    word = {"better": "better", "worse": "worse"}.get(comp.status, "n.s.")
    return f"{comp.difference:+.3f} {word}"


@dataclass(frozen=True)
class ClinicalValue:
    """Per site and per site type: each model's AUC with its interval, the headline
    model's verdict and comparison with local-only, and the effective data."""

    models: list[str]  # in display order; the headline model among them
    headline: str
    site_types: dict[str, str]
    own_sizes: dict[str, int]
    sites: dict[str, dict[str, Interval]]
    types: dict[str, dict[str, Interval]]
    report: AcceptabilityReport  # of the headline model
    effective: dict[str, SiteEffectiveData]

    def type_lines(self) -> list[str]:
        """One sentence per site type: what its sites gain, with intervals."""
        from cardiofed.simulation.experiment import LOCAL

        lines = []
        for site_type, by_model in self.types.items():
            members = [s for s, t in self.site_types.items() if t == site_type]
            comps = [self.report.comparisons[s] for s in members
                     if s in self.report.comparisons]
            better = sum(c.status == "better" for c in comps)
            worse = sum(c.status == "worse" for c in comps)
            verdicts = [str(self.report.sites[s].verdict) for s in members]
            parts = [f"{site_type} ({len(members)} site{'s' if len(members) > 1 else ''}): "
                     f"{self.headline} AUC {_shown(by_model[self.headline])}"]
            if LOCAL in by_model:
                parts.append(f"vs local-only {_shown(by_model[LOCAL])}; significantly "
                             f"better at {better}, worse at {worse} of {len(members)}")
            shares = [self.report.share_of_achievable(s) for s in members]
            shares = [v for v in shares if math.isfinite(v)]
            if shares:
                spread = (f"{min(shares):.1%}" if len(shares) == 1
                          else f"{min(shares):.1%} to {max(shares):.1%}")
                parts.append(f"{spread} of the AUC achievable at its sites")
            parts.append(", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)))
            claims = [effective_claim(self.effective.get(s), self.report.comparisons.get(s))
                      for s in members if s in self.effective]
            figures = [m for _, m in claims if m is not None]
            if figures:
                parts.append(f"effective data {float(np.median(figures)):.1f}x own training "
                             f"size (median of {len(figures)} site"
                             f"{'s' if len(figures) > 1 else ''} with a measured figure)")
            lines.append("; ".join(parts) + ".")
        return lines

    def rows(self) -> list[list[str]]:
        """Table rows: one per site (the answer first: verdict, comparison with the site
        alone, effective data; then each model's AUC and the calibration), then one per
        site type, whose patients pool its sites' test patients."""
        out = []
        for site, by_model in self.sites.items():
            a = self.report.sites[site]
            comp = self.report.comparisons.get(site)
            share = self.report.share_of_achievable(site)
            out.append([site, self.site_types[site], f"{self.own_sizes[site]:,}",
                        str(a.verdict),
                        (f"{comp.status} ({comp.difference:+.3f})" if comp and
                         math.isfinite(comp.difference) else MISSING),
                        effective_claim(self.effective.get(site), comp)[0],
                        *[_shown(by_model.get(m, (math.nan,) * 3)) for m in self.models],
                        f"{share:.1%}" if math.isfinite(share) else MISSING,
                        f"{a.checks[1].value:.2f}", f"{a.checks[2].value:+.3f}"])
        for site_type, by_model in self.types.items():
            a = self.report.types[site_type]
            out.append([f"all {site_type} (pooled patients)", site_type, "", str(a.verdict),
                        "", "", *[_shown(by_model.get(m, (math.nan,) * 3))
                                  for m in self.models],
                        "", f"{a.checks[1].value:.2f}", f"{a.checks[2].value:+.3f}"])
        return out

    def compact_rows(self) -> list[list[str]]:
        """Console rows: the headline model with its interval, the others' AUCs alone."""
        from cardiofed.simulation.experiment import LOCAL, POOLED, TRUE_RISK

        out = []
        for site, by_model in self.sites.items():
            a = self.report.sites[site]
            comp = self.report.comparisons.get(site)
            short = {"acceptable": "ok", "not acceptable": "no",
                     "insufficient evidence": "?"}[str(a.verdict)]
            out.append([site, f"{self.own_sizes[site]:,}",
                        f"{by_model[LOCAL][0]:.3f}" if LOCAL in by_model else MISSING,
                        _shown(by_model[self.headline]).replace(" [", " (").replace(", ", "-")
                        .replace("]", ")"),
                        f"{by_model[POOLED][0]:.3f}" if POOLED in by_model else MISSING,
                        f"{by_model[TRUE_RISK][0]:.3f}" if TRUE_RISK in by_model else MISSING,
                        f"{a.checks[1].value:.2f}", f"{a.checks[2].value:+.2f}", short,
                        _versus(comp),
                        effective_claim(self.effective.get(site), comp)[0]])
        return out

    @property
    def compact_header(self) -> list[str]:
        return ["site", "n", "alone", "federated (95% CI)", "pooled", "true", "slope", "CITL",
                "ok?", "vs alone", "eff. data"]  # summary.clinical_tables picks by name

    @property
    def header(self) -> list[str]:
        pct = f"{self.report.criteria.ci_level:.0%}"
        return ["site", "type", "own n", f"{self.headline} verdict", "vs local-only",
                "effective data", *[f"{m} AUC [{pct} CI]" for m in self.models],
                "share of achievable", "slope", "CITL"]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join([*lines, "", *self.type_lines()]) + "\n"

    def to_html(self) -> str:
        esc = html.escape
        story = "".join(f"<li>{esc(line)}</li>" for line in self.type_lines())
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows())
        return (f"<ul>{story}</ul><div class=\"wide\"><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table></div>")

    def to_dict(self) -> dict[str, Any]:
        def interval(v: Interval) -> list[float | None]:
            return [float(x) if math.isfinite(x) else None for x in v]

        return {"headline_model": self.headline, "models": self.models,
                "sites": {s: {m: interval(v) for m, v in by.items()}
                          for s, by in self.sites.items()},
                "types": {t: {m: interval(v) for m, v in by.items()}
                          for t, by in self.types.items()},
                "acceptability": self.report.to_dict(),
                "effective_data": {s: e.to_dict() for s, e in self.effective.items()},
                "story": self.type_lines()}


def clinical_value(result: ExperimentResult,
                   effective: dict[str, SiteEffectiveData] | None = None) -> ClinicalValue:
    """The per-site and per-type comparison of an experiment's models."""
    from cardiofed.simulation.experiment import (
        FEDERATED,
        FINETUNED,
        LOCAL,
        POOLED,
        RECALIBRATED,
        TRUE_RISK,
    )

    report = acceptability_from_experiment(result)
    level = report.criteria.ci_level
    present = {m for by in result.predictions.values() for m in by}
    models = [m for m in (LOCAL, FEDERATED, RECALIBRATED, FINETUNED, POOLED, TRUE_RISK)
              if m in present]
    sites = {s: {m: _auc(*by[m], level) for m in models if m in by}
             for s, by in result.predictions.items()}
    types: dict[str, dict[str, Interval]] = {}
    for site_type, members in report.type_members.items():
        types[site_type] = {}
        for m in models:
            pairs = [result.predictions[s][m] for s in members if m in result.predictions[s]]
            if len(pairs) == len(members):
                types[site_type][m] = _auc(np.concatenate([y for y, _ in pairs]),
                                           np.concatenate([p for _, p in pairs]), level)
    return ClinicalValue(models=models, headline=result.headline_model,
                         site_types=dict(result.site_types), own_sizes=dict(result.site_sizes),
                         sites=sites, types=types, report=report, effective=effective or {})
