"""``cardiofed survival``: a federated Cox model fitted in simulation, judged at every
site at a horizon, and written as a model file ``cardiofed predict`` and the registry
take."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cardiofed._console import console, fail
from cardiofed.exceptions import CardioFedError


def survival(
    csv: Annotated[list[Path] | None, typer.Option(
        help="A site's export with follow-up times (repeat; default: the synthetic "
             "federation).")] = None,
    mapping: Annotated[list[Path] | None, typer.Option(
        help="The site's mapping file with its [follow_up], in the same order as --csv "
             "(repeat).")] = None,
    features: Annotated[Path | None, typer.Option(
        help="The study's own features and outcome (TOML), besides the built-in ones.")]
        = None,
    sites: Annotated[int, typer.Option(min=3, help="Synthetic hospitals.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic cohort and the splits.")]
        = 0,
    horizon: Annotated[float, typer.Option(help="Years: the risk by then is what the model "
                                                "serves and is judged on.")] = 10.0,
    stratified: Annotated[bool, typer.Option(
        "--stratified", help="A baseline hazard per site (not served: one model file needs "
                             "one baseline).")] = False,
    label_check: Annotated[bool, typer.Option(
        help="Leave out a site whose events the other sites' model cannot predict.")]
        = True,
    form: Annotated[str, typer.Option(help="raw, log or clinical model columns.")]
        = "clinical",
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("cardiofed-survival"),
) -> None:
    """Fit a federated Cox model (exact, from per-site sums) and judge it at a horizon."""
    from rich.table import Table

    from cardiofed.data.sites import federation_from_csv
    from cardiofed.data.study_features import catalogue_from_file
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.experiments.survival import assess_at
    from cardiofed.serving.survival import cox_risk_model
    from cardiofed.simulation.survival import fit_federated_cox
    from cardiofed.survival.report import write_survival_page

    if bool(csv) != bool(mapping) or (features and not csv):
        raise fail("--csv and --mapping go together (one mapping per export); --features "
                   "goes with them.")
    try:
        if csv:
            catalogue = catalogue_from_file(features)
            data = federation_from_csv(csv, mapping or [], seed=seed, catalogue=catalogue,
                                       name="exports")
        else:
            data = synthetic_federation(n_sites=sites, seed=seed, survival=True)
        if label_check and len(data.sites) < 3:
            raise fail(f"The label check compares each site with the others: it needs 3 "
                       f"sites or more, and there are {len(data.sites)}. Add "
                       f"--no-label-check.")
        model = fit_federated_cox(data, form=form, stratified=stratified,
                                  label_quality=label_check)
        judged: dict[str, Any] = {}
        for s in data.sites:
            unscored = stratified and s.name in model.excluded  # it has no baseline
            if s.time_test is None or not s.y_test.size or unscored:
                continue
            risk = model.risk(s.x_test, horizon, s.name if stratified else None)
            judged[s.name] = assess_at(s.time_test, s.y_test, risk, horizon)
        served = ({None: cox_risk_model(model, data, study=data.name, horizon=horizon)}
                  if not stratified else
                  {site: cox_risk_model(model, data, study=data.name, horizon=horizon,
                                        site=site) for site in model.baselines})
    except CardioFedError as exc:
        raise fail(exc) from None
    out.mkdir(parents=True, exist_ok=True)
    report = {"horizon_years": horizon, "stratified": stratified, "form": form,
              "coefficients": dict(zip(model.term_names, model.fit.beta.tolist(), strict=True)),
              "standard_errors": dict(zip(model.term_names, model.fit.se.tolist(),
                                          strict=True)),
              "newton_steps": model.fit.iterations, "excluded": model.excluded,
              "sites": judged}
    (out / "survival.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    page = write_survival_page(json.loads((out / "survival.json").read_text()), out,
                               title=f"CardioFed survival: {data.name}, risk by {horizon:g} "
                                     f"years")
    short = {"acceptable": "ok", "insufficient evidence": "?", "not acceptable": "no"}
    answer = Table(title=f"Risk by {horizon:g} years on each site's test split")
    detail = Table(title="Calibration at the horizon (95% intervals)")
    for table, columns in ((answer, ("Uno's C (95% CI)", "observed", "predicted",
                                     "verdict")),
                           (detail, ("n/events", "slope", "in the large"))):
        table.add_column("site", no_wrap=True)
        for column in columns:
            table.add_column(column, no_wrap=True)
    for name, j in judged.items():
        answer.add_row(escape(name),
                       f"{j['uno_c']:.3f} ({j['uno_c_ci'][0]:.2f}-{j['uno_c_ci'][1]:.2f})",
                       f"{j['observed']:.3f}", f"{j['predicted']:.3f}", short[j["verdict"]])
        detail.add_row(escape(name), f"{j['n']}/{j['events']}",
                       f"{j['slope']:.2f} ({j['slope_ci'][0]:.2f} to {j['slope_ci'][1]:.2f})",
                       f"{j['citl']:+.2f} ({j['citl_ci'][0]:+.2f} to {j['citl_ci'][1]:+.2f})")
    console.print(answer)
    console.print("verdict: ok, ? (insufficient evidence) or no, each judged on its 95% "
                  "interval: Uno's C >= 0.7, slope in [0.8, 1.2], |in the large| <= 0.1.")
    console.print(detail)
    for name, why in model.excluded.items():
        console.print(f"{escape(name)} took no part: {escape(why)}")
    for site, served_model in served.items():
        name = "cox.safetensors" if site is None else f"cox-{site}.safetensors"
        path, _ = served_model.save(out / name)
        if site is None:
            console.print(f"Model file: {path} (cardiofed predict --model {path}).")
    if stratified:
        console.print(f"Model files: one per site, {out}/cox-<site>.safetensors, each on "
                      f"its own baseline hazard.")
    console.print(f"Report: {page} and {out / 'survival.json'}")


def survival_attribution(csv: list[Path], mapping: list[Path], *, features: Path | None,
                         treatment: str, covariates: list[str], horizon: float,
                         estimand: str, methods: list[str], seed: int, out: Path) -> None:
    """``cardiofed attribution --csv ... --horizon H``: the effect of `treatment` on the
    risk of the event by `horizon` years, and the marginal hazard ratio
    (:mod:`cardiofed.causal.survival`), on the researcher's survival exports."""
    from rich.table import Table

    from cardiofed.causal import sources
    from cardiofed.causal.survival import survival_effect
    from cardiofed.data.study_features import catalogue_from_file

    chosen = methods or ["iptw"]
    if len(chosen) != 1 or chosen[0] not in ("iptw", "overlap") or estimand not in (
            "ATE", "ATT"):
        raise fail(f"A time-to-event analysis takes one --method, iptw or overlap, and "
                   f"--estimand ATE or ATT; got {chosen} and {estimand!r}.")
    try:
        catalogue = catalogue_from_file(features)
        sites, _ = sources.export_sites(csv, mapping, treatment=treatment,
                                        covariates=covariates,
                                        build=sources.export_survival_site,
                                        catalogue=catalogue)
        effect = survival_effect(sites, horizon=horizon,
                                 estimand="ATT" if estimand == "ATT" else "ATE",
                                 method="overlap" if chosen[0] == "overlap" else "iptw",
                                 seed=seed)
    except CardioFedError as exc:
        raise fail(exc) from None
    out.mkdir(parents=True, exist_ok=True)
    report = {**effect.__dict__, "treatment": treatment, "covariates": covariates,
              "sites": [s.name for s in sites]}
    (out / "attribution_survival.json").write_text(json.dumps(report, indent=2,
                                                              default=float) + "\n")
    table = Table(title=f"Effect of {escape(treatment)} on the risk by {horizon:g} years "
                        f"({estimand}, {chosen[0]})")
    table.add_column("measure", no_wrap=True)
    table.add_column("estimate (95% CI)", no_wrap=True)
    low, high = effect.difference_interval
    hr_low, hr_high = effect.hazard_ratio_interval
    table.add_row("risk, treated", f"{effect.risk_treated:.4f}")
    table.add_row("risk, untreated", f"{effect.risk_control:.4f}")
    table.add_row("risk difference", f"{effect.difference:+.4f} ({low:+.4f} to {high:+.4f})")
    table.add_row("hazard ratio", f"{effect.hazard_ratio:.3f} ({hr_low:.3f} to {hr_high:.3f})")
    console.print(table)
    console.print(f"Intervals: {effect.resamples} bootstrap resamples, each site resampling "
                  f"its own rows. Your exports: the effect is causal only if the covariates "
                  f"hold every common cause of the treatment and the outcome. Report: "
                  f"{out / 'attribution_survival.json'}")
