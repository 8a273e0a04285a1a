"""The survival command's report as a page: each site's answer first (Uno's C, observed
against predicted risk by the horizon, calibration, the verdict and why), then the model's
hazard ratios and the sites that took no part."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

__all__ = ["write_survival_page"]

_STYLE = ("body{font:15px system-ui;margin:1.5em;max-width:1200px}table{border-collapse:"
          "collapse;margin:.5em 0}td,th{padding:.3em .6em;border-bottom:1px solid #ddd;"
          "text-align:right}td:first-child,th:first-child{text-align:left}"
          ".no{color:#a1141b;font-weight:600}.ok{color:#0b6b2f;font-weight:600}"
          ".why{text-align:left;font-size:13px}@media(max-width:700px){.why{display:none}}")
_VERDICT = {"acceptable": ("ok", "acceptable"), "not acceptable": ("no", "not acceptable"),
            "insufficient evidence": ("", "insufficient evidence")}


def write_survival_page(report: dict[str, Any], out: Path, *, title: str) -> Path:
    """`report` as ``cardiofed survival`` writes it to survival.json; returns the page."""
    h = report["horizon_years"]
    e = html.escape
    rows = []
    for site, j in report["sites"].items():
        css, word = _VERDICT[j["verdict"]]
        rows.append(
            f"<tr><td>{e(site)}</td><td>{j['n']:,} / {j['events']:,}</td>"
            f"<td>{j['uno_c']:.3f} ({j['uno_c_ci'][0]:.3f}-{j['uno_c_ci'][1]:.3f})</td>"
            f"<td>{j['observed']:.3f} ({j['observed_ci'][0]:.3f}-{j['observed_ci'][1]:.3f})"
            f"</td><td>{j['predicted']:.3f}</td>"
            f"<td>{j['slope']:.2f} ({j['slope_ci'][0]:.2f} to {j['slope_ci'][1]:.2f})</td>"
            f"<td>{j['citl']:+.2f} ({j['citl_ci'][0]:+.2f} to {j['citl_ci'][1]:+.2f})</td>"
            f"<td class=\"{css}\">{word}</td>"
            f"<td class=\"why\">{'; '.join(e(r) for r in j['reasons'])}</td></tr>")
    coefficients = "".join(
        f"<tr><td>{e(name)}</td><td>{b:+.4f}</td><td>{se:.4f}</td><td>{math.exp(b):.3f} "
        f"({math.exp(b - 1.959964 * se):.3f}-{math.exp(b + 1.959964 * se):.3f})</td></tr>"
        for (name, b), se in zip(report["coefficients"].items(),
                                 report["standard_errors"].values(), strict=True))
    excluded = "".join(f"<li>{e(site)}: {e(why)}</li>"
                       for site, why in report["excluded"].items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title><style>{_STYLE}</style></head><body>
<h1>{e(title)}</h1>
<h2>Each site's answer: risk by {h:g} years on its own test patients</h2>
<table><tr><th>site</th><th>patients / events</th><th>Uno's C (95% CI)</th>
<th>observed (95% CI)</th><th>predicted</th><th>calibration slope</th>
<th>calibration-in-the-large</th><th>verdict</th><th class="why">why</th></tr>
{''.join(rows)}</table>
<p>Observed: 1 minus the Kaplan-Meier survival by {h:g} years (Greenwood interval).
Verdict: Uno's C at least 0.7, slope in [0.8, 1.2] and |calibration-in-the-large| at
most 0.1, each judged on its 95% interval (acceptable, insufficient evidence, not
acceptable).</p>
<h2>The model: Cox proportional hazards, {'stratified by site' if report['stratified']
                                          else 'one baseline hazard'}</h2>
<table><tr><th>term</th><th>coefficient</th><th>SE</th><th>hazard ratio (95% CI)</th></tr>
{coefficients}</table>
<p>{report['newton_steps']} federated Newton steps; terms of the '{e(report['form'])}' form,
standardised.</p>
{f'<h2>Sites that took no part</h2><ul>{excluded}</ul>' if excluded else ''}
</body></html>"""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
