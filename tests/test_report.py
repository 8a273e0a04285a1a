"""Tests for cardiofed.evaluation.report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cardiofed.evaluation.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ["north", "south", "<b>site</b>"]
MODELS = ["local-only", "federated", "pooled"]


def _predictions(
    sites: list[str], n: int = 200
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for site in sites:
        p_true = rng.uniform(0.05, 0.95, n)
        y = (rng.uniform(size=n) < p_true).astype(int)
        out[site] = {
            m: (y, np.clip(p_true + rng.normal(0, 0.1 * (i + 1), n), 0, 1))
            for i, m in enumerate(MODELS)
        }
    return out


def _rows(sites: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"site": s, "n": 200, "auc": 0.7 + 0.01 * i, "brier": math.nan}
        for i, s in enumerate(sites)
    ]
    rows.append({"site": "pooled test", "n": 200 * len(sites), "auc": 0.71234, "brier": 0.2})
    return rows


def _history(sites: list[str]) -> list[dict[str, float]]:
    return [
        {"round": r, "pooled_auc": 0.6 + 0.02 * r, **{f"auc/{s}": 0.55 + 0.02 * r for s in sites}}
        for r in range(1, 6)
    ]


def _write(tmp_path: Path, sites: list[str], **kwargs: object) -> Path:
    args: dict[str, object] = {
        "title": "CardioFed <run>",
        "summary_rows": _rows(sites),
        "round_history": _history(sites),
        "site_predictions": _predictions(sites),
    }
    args.update(kwargs)
    return write_report(tmp_path / "nested" / "report", **args)  # type: ignore[arg-type]


def test_writes_all_files(tmp_path: Path) -> None:
    index = _write(tmp_path, SITES, notes=["Trained with <DP> & secure aggregation."],
                   sections=[("Extra & more", "<p id='frag'>raw fragment</p>")])
    out = index.parent
    assert index == out / "index.html"
    for name in ("roc_curves.png", "calibration_curves.png", "auc_per_round.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000
        assert data.startswith(PNG_SIGNATURE)

    page = index.read_text(encoding="utf-8")
    assert "north" in page and "south" in page and "pooled test" in page
    assert "&lt;b&gt;site&lt;/b&gt;" in page
    assert "<b>site</b>" not in page
    assert "CardioFed &lt;run&gt;" in page
    assert "Trained with &lt;DP&gt; &amp; secure aggregation." in page
    assert "<h2>Extra &amp; more</h2>" in page and "<p id='frag'>raw fragment</p>" in page
    assert "0.712" in page and "0.71234" not in page  # floats shown with 3 decimals
    assert "\u2013" in page  # nan shown as an en dash
    for name in ("roc_curves.png", "calibration_curves.png", "auc_per_round.png"):
        assert f'src="{name}"' in page


def test_summary_json_has_null_for_nan(tmp_path: Path) -> None:
    index = _write(tmp_path, SITES)
    text = (index.parent / "summary.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    data = json.loads(text)
    assert data["summary_rows"][0]["brier"] is None
    assert data["summary_rows"][-1]["auc"] == pytest.approx(0.71234)
    assert data["summary_rows"][2]["site"] == "<b>site</b>"
    assert len(data["round_history"]) == 5
    assert data["round_history"][0]["auc/north"] == pytest.approx(0.57)


def test_one_class_site_and_empty_history(tmp_path: Path) -> None:
    preds = _predictions(["a", "b"])
    y_one = np.zeros(50, dtype=int)
    preds["one-class"] = {m: (y_one, np.full(50, 0.2)) for m in MODELS}
    index = _write(tmp_path, ["a", "b", "one-class"], site_predictions=preds, round_history=[])
    out = index.parent
    assert (out / "roc_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "calibration_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (out / "auc_per_round.png").exists()
    assert "auc_per_round.png" not in index.read_text(encoding="utf-8")
    assert json.loads((out / "summary.json").read_text())["round_history"] == []


@pytest.mark.parametrize("n_sites", [1, 16])
def test_grid_sizes(tmp_path: Path, n_sites: int) -> None:
    sites = [f"site-{i:02d}" for i in range(n_sites)]
    index = _write(tmp_path, sites)
    assert (index.parent / "roc_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "site-00" in index.read_text(encoding="utf-8")


def test_dollar_signs_in_names_do_not_break_plots(tmp_path: Path) -> None:
    preds = _predictions(["cost $5 $x$"])
    index = _write(tmp_path, ["cost $5 $x$"], site_predictions=preds)
    assert (index.parent / "roc_curves.png").exists()


def test_invalid_predictions_raise(tmp_path: Path) -> None:
    preds = {"a": {"local-only": (np.array([0, 1]), np.array([0.5, 1.5]))}}
    with pytest.raises(ValueError, match=r"y_prob must be in \[0, 1\]"):
        _write(tmp_path, ["a"], site_predictions=preds)
