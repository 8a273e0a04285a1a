"""An attribution analysis as files: summary JSON, a Love plot, the overlap of the
propensity scores by arm, and an HTML page with the effects, balance and E-values."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from cardiofed.causal.study import OVERLAP_BINS, SMD_LIMIT, AttributionResult


def love_plot(result: AttributionResult, path: Path) -> None:
    """|SMD| of every covariate before and after each estimator, the 0.1 line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.arange(len(result.covariates))
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(y) + 1.5))
    for (name, smd), marker in zip(result.balance.items(), "osD^v", strict=False):
        ax.plot(np.abs(smd), y, marker, label=name, alpha=0.8)
    ax.axvline(SMD_LIMIT, color="grey", linestyle="--")
    ax.set_yticks(y, result.covariates)
    ax.set_xlabel("|standardised mean difference|")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overlap_plot(result: AttributionResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = (np.arange(OVERLAP_BINS) + 0.5) / OVERLAP_BINS
    fig, ax = plt.subplots(figsize=(6, 3))
    for arm, counts in result.overlap.items():
        share = counts / max(counts.sum(), 1)
        ax.bar(centres, share, width=1 / OVERLAP_BINS, alpha=0.5, label=arm)
    ax.set_xlabel("propensity score")
    ax.set_ylabel("share of the arm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: AttributionResult, out: Path, *, title: str,
                 caveats: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {"title": title, "caveats": caveats, **result.to_dict()}
    (out / "attribution.json").write_text(json.dumps(summary, indent=2) + "\n")
    love_plot(result, out / "love_plot.png")
    overlap_plot(result, out / "overlap.png")
    rows = []
    for method, e in result.effects.items():
        ev, ev_ci = result.e_values(method)
        rows.append(f"<tr><td>{method}</td><td>{e.treated_risk:.4f}</td>"
                    f"<td>{e.control_risk:.4f}</td><td>{e.risk_difference:+.4f} "
                    f"({e.rd_low:+.4f} to {e.rd_high:+.4f})</td><td>{e.risk_ratio:.3f} "
                    f"({e.rr_low:.3f} to {e.rr_high:.3f})</td><td>{ev:.2f} / {ev_ci:.2f}</td>"
                    f"<td>{e.n_treated:g} / {e.n_control:g}</td></tr>")
    balance = "".join(
        f"<tr><td>{html.escape(c)}</td>"
        + "".join(f"<td{' class=bad' if abs(v[i]) >= SMD_LIMIT else ''}>{v[i]:+.3f}</td>"
                  for v in result.balance.values()) + "</tr>"
        for i, c in enumerate(result.covariates))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>body{{font:14px system-ui;margin:2em;max-width:960px}}
table{{border-collapse:collapse}}td,th{{padding:.3em .7em;border-bottom:1px solid #ddd}}
.bad{{color:#a1141b;font-weight:600}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Estimand {result.estimand}; {result.sites} sites; propensity model fitted in
{result.propensity.iterations} federated Newton steps; {result.trimmed} patients trimmed.</p>
{f'<p><strong>Caveats.</strong> {html.escape(caveats)}</p>' if caveats else ''}
<h2>Effects (95% intervals)</h2>
<table><tr><th>method</th><th>risk treated</th><th>risk untreated</th><th>risk difference</th>
<th>risk ratio</th><th>E-value (estimate / CI)</th><th>n treated / untreated</th></tr>
{''.join(rows)}</table>
<p>{'; '.join(html.escape(n) for n in result.notes)}</p>
<h2>Balance: standardised mean differences (|SMD| &ge; {SMD_LIMIT} in red)</h2>
<table><tr><th>covariate</th>{''.join(f'<th>{html.escape(k)}</th>' for k in result.balance)}</tr>
{balance}</table>
<p><img src="love_plot.png" alt="Love plot"> <img src="overlap.png" alt="overlap"></p>
</body></html>"""
    (out / "attribution.html").write_text(page)
