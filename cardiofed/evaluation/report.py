"""Self-contained HTML report: summary table, ROC and calibration grids, AUC per round.

Writes static files only (PNG, HTML, JSON); no JavaScript, no external assets.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from cardiofed.evaluation.metrics import (  # noqa: E402
    calibration_points,
    roc_points,
    validate_binary_inputs,
)

__all__ = ["LearningCurve", "write_report"]

Predictions = Mapping[str, Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]]

ROC_PNG = "roc_curves.png"
CALIBRATION_PNG = "calibration_curves.png"
ROUNDS_PNG = "auc_per_round.png"
LEARNING_PNG = "effective_data.png"
MISSING = "\u2013"  # en dash, shown for nan / None

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
div.wide { overflow-x: auto; }  /* a wide table scrolls; the page does not */
div.wide td:first-child, div.wide th:first-child { position: sticky; left: 0;
  background: #fff; }
div.wide th:first-child { background: #f2f2f2; }
p.note { color: #555; }
"""


def _mpl_text(text: str) -> str:
    """Escape '$' so matplotlib does not parse site or model names as mathtext."""
    return text.replace("$", r"\$")


_CELL_W, _CELL_H = 3.4, 3.2  # inches per panel
_LEFT, _RIGHT, _BOTTOM, _TOP = 0.95, 0.12, 0.52, 0.3  # inches of each panel's margins


def _grid(n: int) -> tuple[plt.Figure, list[Axes]]:
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    # Fixed margins in inches around each 3.4 x 3.2 in cell (labels, title) instead of
    # tight_layout, which measured every text of a dozen panels (a second of the demo).
    width, height = _CELL_W * ncols, _CELL_H * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=_LEFT / width, right=1 - _RIGHT / width,
                        bottom=_BOTTOM / height, top=1 - _TOP / height,
                        wspace=(_LEFT + _RIGHT) / (_CELL_W - _LEFT - _RIGHT),
                        hspace=(_BOTTOM + _TOP) / (_CELL_H - _BOTTOM - _TOP))
    flat: list[Axes] = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _plot_roc(path: Path, predictions: Predictions) -> None:
    fig, axes = _grid(len(predictions))
    for ax, (site, models) in zip(axes, predictions.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        one_class = False
        for label, (y_true, y_prob) in models.items():
            y, p = validate_binary_inputs(y_true, y_prob)
            if y.min() == y.max():
                one_class = True
                continue
            fpr, tpr = roc_points(y, p)
            auc = float(np.trapezoid(tpr, fpr))  # the area under these points: the AUC
            ax.plot(fpr, tpr, linewidth=1.5, label=_mpl_text(f"{label} (AUC {auc:.3f})"))
        if one_class:
            ax.text(0.5, 0.5, "one class only", ha="center", va="center",
                    transform=ax.transAxes, color="firebrick")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="x-small")
        ax.set(title=_mpl_text(site), xlabel="False positive rate", ylabel="True positive rate",
               xlim=(0, 1), ylim=(0, 1))
        ax.title.set_fontsize("small")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_calibration(path: Path, predictions: Predictions) -> None:
    fig, axes = _grid(len(predictions))
    for ax, (site, models) in zip(axes, predictions.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for label, (y_true, y_prob) in models.items():
            mean_p, frac, _ = calibration_points(y_true, y_prob)
            ax.plot(mean_p, frac, marker="o", markersize=3, linewidth=1.2,
                    label=_mpl_text(label))
        if models:
            ax.legend(loc="upper left", fontsize="x-small")
        ax.set(title=_mpl_text(site), xlabel="Mean predicted risk", ylabel="Observed fraction",
               xlim=(0, 1), ylim=(0, 1))
        ax.title.set_fontsize("small")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_rounds(path: Path, round_history: Sequence[Mapping[str, float]]) -> None:
    rounds = [float(r.get("round", i + 1)) for i, r in enumerate(round_history)]
    keys: list[str] = []
    for row in round_history:
        keys += [k for k in row if (k == "pooled_auc" or k.startswith("auc/")) and k not in keys]
    keys.sort(key=lambda k: k != "pooled_auc")  # pooled first, sites in given order
    colors = plt.get_cmap("tab20" if len(keys) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, key in enumerate(keys):
        values = [float(r.get(key, math.nan)) for r in round_history]
        pooled = key == "pooled_auc"
        ax.plot(rounds, values, marker="o", markersize=3, linewidth=2.5 if pooled else 1,
                color="black" if pooled else colors(i % colors.N),
                label="pooled" if pooled else _mpl_text(key.removeprefix("auc/")))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="Round", ylabel="AUC", title="AUC per round")
    if keys:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class LearningCurve:
    """A site's local learning curve: mean AUC per training size, the AUC it gets from the
    federation, its own size, and the size at which the curve reaches that AUC."""

    sizes: Sequence[int]
    aucs: Sequence[float]
    target: float
    own_size: int
    n_equivalent: float


def _plot_learning_curves(path: Path, curves: Mapping[str, LearningCurve]) -> None:
    fig, axes = _grid(len(curves))
    for ax, (site, c) in zip(axes, curves.items(), strict=True):
        ax.plot(c.sizes, c.aucs, marker="o", markersize=3, linewidth=1.2, label="alone")
        ax.axhline(c.target, color="tab:green", linewidth=1, label="federated")
        ax.axvline(c.own_size, color="grey", linestyle=":", linewidth=1, label="own size")
        if math.isfinite(c.n_equivalent):
            ax.plot([c.n_equivalent], [c.target], marker="*", color="tab:green", markersize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=_mpl_text(site), xlabel="Own patients", ylabel="AUC")
        ax.title.set_fontsize("small")
        ax.legend(loc="lower right", fontsize="x-small")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float | np.floating):
        return MISSING if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(_cell(row[c])) if c in row else ''}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _jsonable(value: object) -> object:
    """Convert to JSON-safe Python types; nan/inf become None (null)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, object]],
    round_history: Sequence[Mapping[str, float]],
    site_predictions: Predictions,
    sections: Sequence[tuple[str, str]] = (),
    first: Sequence[tuple[str, str]] = (),
    notes: Sequence[str] = (),
    learning_curves: Mapping[str, LearningCurve] | None = None,
    details: Mapping[str, object] | None = None,
) -> Path:
    """Write index.html, summary.json and PNG figures into out_dir; return index.html's path.

    Args:
        out_dir: output directory, created with parents if missing.
        title: report title (escaped).
        summary_rows: one row per site plus e.g. a "pooled test" row; floats shown with 3
            decimals, nan/None as an en dash; all cells escaped.
        round_history: per round {"round": r, "pooled_auc": ..., "auc/<site>": ...}; may be
            empty, in which case auc_per_round.png is not written.
        site_predictions: site -> model label -> (y_true, y_prob) on that site's test split;
            probabilities are risks in [0, 1].
        sections: extra (heading, HTML fragment) pairs; headings are escaped, fragments are
            inserted verbatim (they must already be escaped).
        first: sections shown before everything else, under the title (the answer).
        notes: short paragraphs shown under the title (escaped).
        learning_curves: site -> its local learning curve (the effective-data figure).
        details: further JSON-ready entries for summary.json (nan/inf become null).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    esc = html.escape

    images: list[tuple[str, str]] = []
    if site_predictions:
        _plot_roc(out / ROC_PNG, site_predictions)
        _plot_calibration(out / CALIBRATION_PNG, site_predictions)
        images += [("ROC curves per site", ROC_PNG), ("Calibration per site", CALIBRATION_PNG)]
    if round_history:
        _plot_rounds(out / ROUNDS_PNG, round_history)
        images.append(("AUC per round", ROUNDS_PNG))
    if learning_curves:
        _plot_learning_curves(out / LEARNING_PNG, learning_curves)
        images.append(("Effective data: each site's AUC alone against its number of "
                       "patients", LEARNING_PNG))

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>",
        f"<h1>{esc(title)}</h1>",
        *(f'<p class="note">{esc(note)}</p>' for note in notes),
    ]
    for heading, fragment in first:
        parts += [f"<h2>{esc(heading)}</h2>", fragment]
    compared = (" The comparisons, with intervals and significance, are in the first "
                "section." if first else "")
    parts += ["<h2>Summary</h2>",
              (f'<p class="note">Point estimates of every model at every site; a row pooling '
               f'every site\'s test patients is not compared.{compared}</p>'
               f'<div class="wide">{_table(summary_rows)}</div>' if summary_rows
               else "<p>No summary rows.</p>")]
    for heading, src in images:
        parts += [f"<h2>{esc(heading)}</h2>", f'<img src="{src}" alt="{esc(heading)}">']
    for heading, fragment in sections:
        parts += [f"<h2>{esc(heading)}</h2>", fragment]
    parts.append("</body>\n</html>\n")

    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    payload = {"summary_rows": _jsonable(list(summary_rows)),
               "round_history": _jsonable(list(round_history)),
               **{str(k): _jsonable(v) for k, v in (details or {}).items()}}
    (out / "summary.json").write_text(
        json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    return index
