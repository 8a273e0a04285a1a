"""The clinical promise site by site: federated (personalised) vs local-only vs pooled vs
achievable, with intervals, on three federations, 5 seeds each.

* synthetic: the demo federation (12 sites; tier2_04 has 30% flipped labels), a fresh
  cohort per seed, each site judged on 20,000 new patients of its own profile, with the
  true risks as the yardstick. Recipe: the demo's (clinical model form, two local epochs
  per round, label-quality check, recalibration), chosen on validation federations (seeds
  100 and 101), never on these.
* framingham: 8 hospitals (partition seed 0), bench/framingham.py's recipe; training
  seeds 0-4.
* uci-heart: FLamby's four hospitals and split, bench/flamby_heart.py's recipe; training
  seeds 0-4.

Every site holds out 25% of its training rows as its calibration split. For each
data set and model form (raw, log and clinical logistic regression, and the MLP) the
table gives the verdicts per site over the seeds (AUC, calibration slope and
calibration-in-the-large each judged on its 95% interval), the DeLong comparison with
the site's local-only model (a cross-validated ridge logistic regression on all of the
site's training rows). The headline table is the logistic form with the lowest log-loss
on the sites' calibration splits in each seed (model selection on validation rows, never
on the test patients), with each site's effective data as the report states it
(:func:`~cardiofed.experiments.clinical_value.effective_claim`: a figure only within the
measured range and where the site is significantly better off, else a bound). Every run
trains to convergence: at most 100 rounds, stopping once the sites' loss stops improving
(the product's default).

    python bench/clinical_value.py [--data-dir DIR] [--seeds 5] [--datasets ...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402

from cardiofed.data.framingham import load_framingham  # noqa: E402
from cardiofed.data.synthetic import synthetic_federation  # noqa: E402
from cardiofed.data.uci_heart import load_uci_heart  # noqa: E402
from cardiofed.experiments.acceptability import acceptability_from_experiment  # noqa: E402
from cardiofed.experiments.clinical_value import clinical_value, effective_claim  # noqa: E402
from cardiofed.experiments.effective_data import site_effective_data  # noqa: E402
from cardiofed.simulation.config import SimulationConfig  # noqa: E402
from cardiofed.simulation.experiment import (  # noqa: E402
    FEDERATED,
    FINETUNED,
    LOCAL,
    POOLED,
    RECALIBRATED,
    TRUE_RISK,
    run_experiment,
)

EVAL_SIZE = 20_000
NOISY_SITE = "tier2_04"
RECIPES: dict[str, dict[str, Any]] = {
    "synthetic": dict(local_epochs=2, label_quality=True),
    "framingham": dict(local_epochs=1, batch_size=32, lr=0.05),
    "uci-heart": dict(local_steps=100, batch_size=4, lr=0.01),
}
# Local work per round, chosen with the form on the calibration splits.
LENGTHS: dict[str, dict[str, dict[str, Any]]] = {
    "synthetic": {"": {}},  # chosen on the validation federations already
    "framingham": {"1 epoch": dict(local_epochs=1), "3 epochs": dict(local_epochs=3)},
    "uci-heart": {"100 steps": dict(local_steps=100), "300 steps": dict(local_steps=300)},
}
FORMS: dict[str, dict[str, Any]] = {
    "raw LR": dict(feature_transform="raw"),
    "log LR": dict(feature_transform="log"),
    "clinical LR": dict(feature_transform="clinical"),
    "MLP": dict(model="mlp", feature_transform="raw"),
}
SELECTED = "selected LR form"
PERSONALISED = dict(recalibrate=True, finetune=True)
MODELS = (LOCAL, FEDERATED, RECALIBRATED, FINETUNED, POOLED)


def _load(name: str, seed: int, data_dir: str | None) -> Any:
    if name == "synthetic":
        return synthetic_federation(12, seed=seed, eval_size=EVAL_SIZE)
    if name == "framingham":
        return load_framingham(data_dir, seed=0)
    return load_uci_heart(data_dir)


def variants(name: str, forms: list[str]) -> dict[str, dict[str, Any]]:
    """Each form at each training length, by name ("clinical LR, 3 epochs")."""
    return {", ".join(p for p in (form, length) if p): {**FORMS[form], **settings}
            for form in forms for length, settings in LENGTHS[name].items()}


def run_form(data: Any, name: str, variant: str, settings: dict[str, Any], seed: int
             ) -> tuple[dict[str, Any], Any]:
    """One experiment: its per-site figures (JSON-ready) and the result itself."""
    config = SimulationConfig.create(**{**RECIPES[name], **settings, **PERSONALISED,
                                        "seed": seed, "eval_every": 0})
    started = time.perf_counter()
    result = run_experiment(data, config)
    out: dict[str, Any] = {"form": variant, "seconds": time.perf_counter() - started,
                           "rounds": result.federated.rounds,
                           "models": {}, "calibration_loss": sum(
                               result.calibration_loss.values())}
    for model in MODELS:
        report = acceptability_from_experiment(result, model=model)
        out["models"][model] = {
            s: {"auc": a.auc, "auc_ci": a.auc_ci, "slope": a.checks[1].value,
                "citl": a.checks[2].value, "verdict": str(a.verdict),
                "slope_verdict": str(a.checks[1].verdict),
                "citl_verdict": str(a.checks[2].verdict),
                "calibrated": a.checks[1].verdict == a.checks[2].verdict == "acceptable",
                "point_slope_ok": a.checks[1].point_ok,
                "share": report.share_of_achievable(s),
                "limited_by_case_mix": report.limited_by_case_mix(s),
                "vs_local": (report.comparisons[s].status if s in report.comparisons
                             else ""),
                "vs_local_difference": (report.comparisons[s].difference
                                        if s in report.comparisons else math.nan)}
            for s, a in report.sites.items()}
    out["achievable"] = ({s: result.metrics[s][TRUE_RISK]["auc"] for s in result.site_types}
                         if TRUE_RISK in next(iter(result.metrics.values())) else {})
    out["updates"] = {s: r.level for s, r in result.recalibrations.items()}
    out["finetune_lambda"] = {s: p.lam for s, p in result.personalisations.items()}
    out["site_types"] = result.site_types
    out["own_sizes"] = result.site_sizes
    out["test_sizes"] = {s.name: s.n_test for s in data.sites}
    return out, result


def run_seed(name: str, grid: dict[str, dict[str, Any]], seed: int, data_dir: str | None,
             repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Every variant on one seed's federation; the logistic one with the lowest log-loss
    on the sites' calibration splits (validation rows, never the test patients) is the
    selected one, and gets the effective data."""
    data = _load(name, seed, data_dir)
    runs, results = {}, {}
    for variant, settings in grid.items():
        runs[variant], results[variant] = run_form(data, name, variant, settings, seed)
    logistic = [v for v, settings in grid.items()
                if settings.get("model", "logistic") == "logistic"]
    chosen = min(logistic, key=lambda f: runs[f]["calibration_loss"])
    started = time.perf_counter()
    eff = site_effective_data(data, results[chosen], repeats=repeats, seed=seed)
    runs[chosen]["effective"] = {s: e.to_dict() for s, e in eff.items()}
    comparisons = clinical_value(results[chosen], eff).report.comparisons
    runs[chosen]["effective_claim"] = {s: effective_claim(e, comparisons.get(s))
                                       for s, e in eff.items()}
    runs[chosen]["effective_seconds"] = time.perf_counter() - started
    runs[SELECTED] = runs[chosen]
    return runs


def at_least(claim: tuple[str, float | None]) -> float:
    """The least effective data a report's claim states: its figure, N of "> Nx", 1 for
    "~1x" (no significant difference), else 0 ("< 1x", "<= Nx", not measured)."""
    text, figure = claim
    if figure is not None:
        return figure
    if text.startswith("> "):
        return float(text.removeprefix("> ").removesuffix("x"))
    return 1.0 if text == "~1x" else 0.0


def _count(values: list[str], what: str) -> int:
    return sum(v == what for v in values)


def site_table(name: str, runs: list[dict[str, Any]], model: str) -> tuple[str, dict]:
    """Per site over the seeds: AUCs, verdicts, comparisons, effective data."""
    sites = list(runs[0]["site_types"])
    rows, summary = [], {}
    for s in sites:
        per = [r["models"][model][s] for r in runs]
        local = [r["models"][LOCAL][s]["auc"] for r in runs]
        pooled = [r["models"][POOLED][s]["auc"] for r in runs]
        verdicts = [p["verdict"] for p in per]
        vs = [p["vs_local"] for p in per]
        shares = [p["share"] for p in per if math.isfinite(p["share"])]
        claims = [r["effective_claim"][s] for r in runs if "effective_claim" in r]
        summary[s] = {
            "type": runs[0]["site_types"][s], "own_size": runs[0]["own_sizes"][s],
            "test_size": runs[0]["test_sizes"][s],
            "auc": float(np.mean([p["auc"] for p in per])),
            "local_auc": float(np.mean(local)), "pooled_auc": float(np.mean(pooled)),
            "achievable_auc": (float(np.mean([r["achievable"][s] for r in runs]))
                               if runs[0]["achievable"] else math.nan),
            "min_share": min(shares) if shares else math.nan,
            "slopes": [p["slope"] for p in per], "citls": [p["citl"] for p in per],
            "n_calibrated": sum(p["calibrated"] for p in per),
            "n_point_slope_ok": sum(p["point_slope_ok"] for p in per),
            "verdicts": {v: _count(verdicts, v) for v in
                         ("acceptable", "insufficient evidence", "not acceptable")},
            "vs_local": {v: _count(vs, v) for v in
                         ("better", "no significant difference", "worse")},
            "n_at_least_local": sum(p["auc"] >= lo for p, lo in zip(per, local, strict=True)),
            "effective": [text for text, _ in claims],
            "effective_at_least": float(np.median([at_least(c) for c in claims]))
            if claims else math.nan,
        }
        m = summary[s]
        rows.append([
            s, m["type"], m["own_size"], m["test_size"], m["local_auc"], m["auc"],
            m["pooled_auc"], m["achievable_auc"],
            f"{m['min_share']:.1%}" if math.isfinite(m["min_share"]) else "–",
            f"{min(m['slopes']):.2f}-{max(m['slopes']):.2f}",
            f"{min(m['citls']):+.2f}-{max(m['citls']):+.2f}",
            f"{m['n_calibrated']}/{len(runs)}",
            f"{m['verdicts']['acceptable']}/{m['verdicts']['insufficient evidence']}/"
            f"{m['verdicts']['not acceptable']}",
            f"{m['vs_local']['better']}/{m['vs_local']['no significant difference']}/"
            f"{m['vs_local']['worse']}",
            ", ".join(f"{text} ({n})" if n > 1 else text
                      for text, n in Counter(m["effective"]).most_common()) or "–"])
    header = ["site", "type", "own n", "test n", "local AUC", f"{model} AUC", "pooled AUC",
              "achievable AUC", "min share of achievable", "slope range", "CITL range",
              "calibration acceptable (slope and CITL)", "verdict acc/insuff./not",
              "vs local better/n.s./worse", "effective data (seeds)"]
    return markdown_table(header, rows), summary


def form_table(results: dict[str, list[dict[str, Any]]], exclude: set[str]) -> str:
    """Model forms side by side: mean AUC, calibration and verdict counts, per model."""
    rows = []
    for form, runs in results.items():
        for model in (FEDERATED, RECALIBRATED, FINETUNED):
            per = [r["models"][model][s] for r in runs for s in r["site_types"]
                   if s not in exclude]
            if not per:
                continue
            shares = [p["share"] for p in per if math.isfinite(p["share"])]
            rows.append([form, model, float(np.mean([p["auc"] for p in per])),
                         f"{np.mean(shares):.1%}" if shares else "–",
                         float(np.mean([abs(p["citl"]) for p in per])),
                         float(np.mean([abs(p["slope"] - 1) for p in per])),
                         f"{sum(p['calibrated'] for p in per)}/{len(per)}",
                         f"{sum(p['verdict'] == 'acceptable' for p in per)}/{len(per)}",
                         f"{sum(p['vs_local'] == 'worse' for p in per)}/{len(per)}",
                         f"{min(r['rounds'] for r in runs)}-{max(r['rounds'] for r in runs)}",
                         float(np.mean([r["seconds"] for r in runs]))])
    return markdown_table(["form", "model", "mean AUC", "mean share of achievable",
                           "mean |CITL|", "mean |slope - 1|", "calibration acceptable",
                           "acceptable", "significantly worse than local",
                           "rounds (converged)", "s per run"],
                          rows)


def targets(name: str, summary: dict[str, dict[str, Any]], n_seeds: int) -> list[str]:
    lines = []
    worse = {s: m["vs_local"]["worse"] for s, m in summary.items() if m["vs_local"]["worse"]}
    lines.append(f"- significantly worse than local-only: "
                 f"{worse or 'none'} (target: none)")
    below = {s: f"{m['n_at_least_local']}/{n_seeds}" for s, m in summary.items()
             if m["n_at_least_local"] < n_seeds}
    lines.append("- point AUC at least local-only's: all sites in all seeds"
                 if not below else f"- point AUC at least local-only's in only some seeds "
                                   f"(seeds at least as good): {below}")
    if name == "synthetic":
        clean = {s: m for s, m in summary.items() if s != NOISY_SITE}
        uncal = {s: f"{m['n_calibrated']}/{n_seeds}" for s, m in clean.items()
                 if m["n_calibrated"] < n_seeds}
        lines.append(f"- calibration acceptable (slope and CITL intervals inside the limits) "
                     f"at every site but {NOISY_SITE}: "
                     + ("met in every seed" if not uncal else f"missed at {uncal} (seeds "
                        "acceptable)"))
        low = {s: f"{m['min_share']:.1%}" for s, m in clean.items() if m["min_share"] < 0.95}
        lines.append("- AUC >= 95% of the achievable at every site but the noisy one: "
                     + ("met (lowest " + f"{min(m['min_share'] for m in clean.values()):.1%})"
                        if not low else f"missed at {low}"))
        community = [m["effective_at_least"] for m in summary.values()
                     if m["type"] == "community"]
        median = float(np.median(community))
        lines.append(f"- median community clinic's effective data at least {median:.1f}x "
                     f"its own training size (each site's median over the seeds of what its "
                     f"report can claim: a figure, or the bound of '> N'; target >= 3x): "
                     f"{'met' if median >= 3 else 'missed'}")
    else:
        slopes = {s: f"{m['n_point_slope_ok']}/{n_seeds}" for s, m in summary.items()
                  if m["n_point_slope_ok"] < n_seeds}
        lines.append("- calibration slope in [0.8, 1.2] (point) at every site: "
                     + ("met in every seed" if not slopes else f"missed at {slopes}"))
    return lines


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="synthetic,framingham,uci-heart")
    parser.add_argument("--forms", default=",".join(FORMS))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one seed, one form, two rounds, the shipped UCI data
        args.seeds, args.datasets, args.forms = 1, "uci-heart", "raw LR"
        RECIPES["uci-heart"].update(rounds=2, local_steps=2)
        LENGTHS["uci-heart"] = {"": {}}
    seeds = list(range(args.seeds))
    payload: dict[str, Any] = {"seeds": seeds, "recipes": RECIPES, "forms": FORMS,
                               "lengths": LENGTHS,
                               "eval_size": EVAL_SIZE}
    md = ""
    for name in args.datasets.split(","):
        grid = variants(name, args.forms.split(","))
        forms = list(grid)
        per_seed = [run_seed(name, grid, s, args.data_dir, 1 if args.smoke else 3)
                    for s in seeds]
        results = {form: [r[form] for r in per_seed] for form in [*forms, SELECTED]}
        chosen = [r[SELECTED]["form"] for r in per_seed]
        table, summary = site_table(name, results[SELECTED], RECALIBRATED)
        payload[name] = {"runs": {f: results[f] for f in forms}, "selected_forms": chosen,
                         "sites": summary, "targets": targets(name, summary, len(seeds))}
        md += (f"## {name}: personalised by recalibration on held-out rows, {len(seeds)} "
               f"seeds; form (and length) chosen per seed on the calibration splits: "
               f"{', '.join(chosen)}\n\n{table}\n"
               + "\n".join(payload[name]["targets"]) + "\n\n"
               f"### {name}: model forms and personalisation (all sites"
               f"{' but ' + NOISY_SITE if name == 'synthetic' else ''}, all seeds)\n\n"
               + form_table({f: results[f] for f in forms},
                            {NOISY_SITE} if name == "synthetic" else set()) + "\n")
        write_results("clinical_value", payload, md)


if __name__ == "__main__":
    main()
