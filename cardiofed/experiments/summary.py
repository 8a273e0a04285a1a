"""Present an :class:`ExperimentResult`: a console table and a report folder."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table

from cardiofed.data.mapping import LoadReport
from cardiofed.evaluation.recalibration import describe
from cardiofed.experiments.clinical_value import ClinicalValue
from cardiofed.simulation.experiment import (
    FEDERATED,
    LOCAL,
    POOLED,
    PRIVACY_DISCLOSURE,
    ExperimentResult,
)

_MODELS = (LOCAL, FEDERATED, POOLED)


def _fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


_PRIVACY_COLUMNS = (("n_records", "n"), ("delta", "delta"), ("epsilon_max", "eps max"),
                    ("epsilon_statistics", "eps statistics"), ("epsilon_train", "eps train"),
                    ("epsilon_evaluate", "eps evaluate"), ("epsilon_spent", "eps total"),
                    ("noise_multiplier", "DP-SGD sigma"), ("max_grad_norm", "clip"),
                    ("rounds_trained", "rounds"))
_SAID_ONCE = ("delta", "epsilon_max", "max_grad_norm")


def privacy_table(result: ExperimentResult) -> Table:
    """Per site: the epsilon its ledger has spent, by kind of release and in total, and
    the DP-SGD settings, within 80 columns; a setting every site shares (delta,
    epsilon_max, the clipping norm) is said once in the title."""
    shared = [(key, heading) for key, heading in _PRIVACY_COLUMNS
              if key in _SAID_ONCE and len({v[key] for v in result.privacy.values()}) == 1]
    first = next(iter(result.privacy.values()), {})
    said = ", ".join(f"{heading} {first[key]:.3g}" for key, heading in shared)
    table = Table(title=escape(f"Differential privacy per site "
                               f"({result.config.dp_accountant.upper()} accounting of every "
                               f"release{'; ' + said if said else ''})"),
                  caption=escape(PRIVACY_DISCLOSURE), box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    columns = [c for c in _PRIVACY_COLUMNS if c not in shared]
    table.add_column("site", overflow="fold")
    for _, heading in columns:
        table.add_column(heading.replace("eps ", "eps\n").replace("DP-SGD ", "DP-SGD\n"),
                         justify="right", no_wrap=True)
    for site, values in result.privacy.items():
        table.add_row(escape(site), *[f"{values[key]:,}" if isinstance(values[key], int)
                                      else f"{values[key]:.3g}" for key, _ in columns])
    return table


def _privacy_section(result: ExperimentResult) -> str:
    head = "".join(f"<th>{h}</th>" for _, h in _PRIVACY_COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(site)}</td>"
        + "".join(f"<td>{values[key]:.4g}</td>" for key, _ in _PRIVACY_COLUMNS) + "</tr>"
        for site, values in result.privacy.items())
    refusals = "".join(f"<li>round {rnd}: {html.escape(reason)}</li>"
                       for rnd, _, reason in result.federated.refusals)
    step = intercept_summary(result)
    return (f"<table><tr><th>site</th>{head}</tr>{rows}</table>"
            f"<p>{html.escape(PRIVACY_DISCLOSURE)}</p>"
            + (f"<p>{html.escape(step)}.</p>" if step else "")
            + (f"<p>Refused rounds:</p><ul>{refusals}</ul>" if refusals else ""))


_VERDICT = ("site", "n", "alone", "federated (95% CI)", "vs alone", "ok?", "eff. data")
_DETAIL = ("site", "slope", "CITL", "pooled", "true")


def clinical_tables(value: ClinicalValue) -> list[Table]:
    """The clinical value of the federation per site (console), as two tables that fit
    80 columns: first the answer (AUC alone and with the federation, the signed
    difference and whether it is significant, the calibration verdict, effective data),
    then the calibration figures and the reference AUCs (pooled, true risks)."""
    rows = value.compact_rows()
    index = {h: j for j, h in enumerate(value.compact_header)}
    out = []
    for columns, title, caption in (
            (_VERDICT, f"Each site's answer: AUC on its own test patients, alone and "
                       f"with the federation ({value.headline})",
             "vs alone: the difference, 'better'/'worse' only when significant (DeLong), "
             "else 'n.s.'; ok?: AUC, slope and CITL judged on 95% intervals (ok, no, ? "
             "insufficient evidence); eff. data: own patients the site would need alone "
             "for the same AUC, as a multiple of its own ('> N': beyond what was "
             "measured)"),
            (_DETAIL, "Calibration, and the AUC of the pooled model and of the true risks",
             "slope and CITL of the model above; pooled: one model on every site's rows "
             "(simulation only); true: the risks the outcomes were drawn from")):
        table = Table(title=escape(title), caption=escape(caption), box=box.SIMPLE_HEAD,
                      collapse_padding=True, pad_edge=False)
        for h in columns:
            j = index[h]
            width = max(len(h), *(len(r[j]) for r in rows))
            if j == 0:  # a long site name folds onto a second line; it is never dropped
                table.add_column(h, overflow="fold", min_width=min(width, 14))
            else:  # numbers never wrap
                table.add_column(h, justify="right", no_wrap=True, min_width=width)
        for row in rows:
            table.add_row(*(escape(row[index[h]]) for h in columns))
        out.append(table)
    return out


def _load_section(reports: Mapping[str, LoadReport]) -> str:
    rows = [(site, row) for site, report in reports.items() for row in report.columns()]
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("site", *rows[0][1]))
    body = "".join(f"<tr><td>{html.escape(site)}</td>" + "".join(
        f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
        for site, row in rows)
    return (f"<table><tr>{head}</tr>{body}</table><p>Nothing is dropped: a value that is "
            f"missing, not a number, outside the feature's plausible range or an unknown code "
            f"is missing in training, and counted here.</p>")


def write_experiment_report(result: ExperimentResult, out_dir: str | Path, *, title: str,
                            notes: list[str] | None = None,
                            extra_sections: list[tuple[str, str]] | None = None,
                            value: ClinicalValue | None = None,
                            load_reports: Mapping[str, LoadReport] | None = None) -> Path:
    """HTML page, PNG figures and summary.json for an experiment (with `value`, the
    clinical value per site and its effective-data figure)."""
    from cardiofed.evaluation.report import LearningCurve, write_report  # loads matplotlib

    cfg = result.config
    settings = ", ".join(f"{k}={v}" for k, v in cfg.model_dump().items() if v is not None)
    run = result.federated
    participation = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{n}</td>"
        f"<td>{run.update_share.get(site, 0.0):.1%}</td>"
        f"<td>{run.weight_share.get(site, 0.0):.1%}</td></tr>"
        for site, n in run.participation.items())
    stale = "".join(f"<li>{t / 3600:.2f} h (simulated): {html.escape(site)}: "
                    f"{html.escape(reason)}</li>" for t, site, reason in run.rejected)
    sections = [("Training settings", f"<p>{html.escape(training_summary(result))}</p>"
                                      f"<p>{html.escape(settings)}</p>"),
                ("Each site's part in training",
                 "<table><tr><th>site</th><th>updates trained</th>"
                 "<th>share of the updates in the final model</th>"
                 f"<th>share of the aggregation weight</th></tr>{participation}"
                 "</table>" + (f"<p>Updates refused as stale:</p><ul>{stale}</ul>"
                               if stale else ""))]
    sections[:0] = extra_sections or []
    if result.label_quality is not None and result.label_quality.reasons:
        sections.insert(0, ("Data quality", "<ul>" + "".join(
            f"<li>{html.escape(site)}: {html.escape(reason)}; its updates were trained but "
            f"given no aggregation weight (0% in the table of each site's part)</li>"
            for site, reason in result.label_quality.reasons.items()) + "</ul>"))
    if result.recalibrations:
        form = next(iter(result.preprocessors.values())).form
        columns = form.names if form is not None else None
        sections.append(("Each site's update on its held-out calibration rows", "<ul>" + "".join(
            f"<li>{html.escape(site)} ({result.calibration_sizes.get(site, 0)} rows): "
            f"{html.escape(describe(update, columns))}; {html.escape(update.reason)}</li>"
            for site, update in result.recalibrations.items()) + "</ul>"))
    if run.robust_actions:
        sections.append(("Robust aggregation", "<p>" + html.escape(
            robust_summary(result)) + "</p>"))
    if result.privacy:
        sections.insert(0, ("Differential privacy: epsilon spent per site",
                            _privacy_section(result)))
    curves = {} if value is None else {
        site: LearningCurve(sizes=[p.size for p in e.curve], aucs=[p.mean_auc for p in e.curve],
                            target=e.target_auc, own_size=e.own_size,
                            n_equivalent=e.n_equivalent)
        for site, e in value.effective.items() if e.curve}
    first = ([] if value is None else
             [("What each site gets from the federation", value.to_html())])
    loading = _load_section(load_reports or {})
    if loading:
        sections.append(("What loading each site's export did", loading))
    return write_report(out_dir, title=title, summary_rows=result.summary_rows(),
                        round_history=result.federated.history,
                        site_predictions=result.predictions, sections=sections, first=first,
                        notes=notes or [], learning_curves=curves,
                        details={"load_reports": {site: r.as_dict() for site, r in
                                                  (load_reports or {}).items()},
                                 **({"clinical_value": value.to_dict()} if value else {})})


def training_summary(result: ExperimentResult) -> str:
    """How many rounds ran, and why training stopped there."""
    cfg, run = result.config, result.federated
    if cfg.secure_aggregation:
        how = ("DP-FedSGD over secure sums: each round one server step on the sites' summed "
               "clipped gradients, the noise split over the sites")
        if run.rounds < cfg.rounds:
            return (f"{how}; stopped after round {run.rounds} of {cfg.rounds}: fewer sites "
                    f"took part than the noise is split over.")
        return f"{how}; ran all {cfg.rounds} planned rounds."
    if cfg.aggregation == "async":
        return f"{cfg.rounds} model versions published (every one: asynchronous training)."
    if run.stopped_at is not None:
        return (f"Converged: stopped after round {run.stopped_at} of at most {cfg.rounds}, "
                f"once the global model's loss at the sites (their median) had not improved "
                f"by {cfg.stop_tolerance:.1%} for {cfg.stop_patience} rounds.")
    if cfg.stopping_rule() is None:
        why = ("the sites release no loss under differential privacy"
               if cfg.dp_epsilon is not None else "stop_patience is unset")
        return f"Ran all {cfg.rounds} planned rounds ({why})."
    return (f"Ran all {cfg.rounds} planned rounds and had not converged: the sites' loss was "
            f"still improving; more rounds may change the model.")


def robust_summary(result: ExperimentResult) -> str:
    """Per site, how many of its updates robust aggregation clipped or rejected."""
    counts: dict[str, dict[str, int]] = {}
    for _, site, action in result.federated.robust_actions:
        counts.setdefault(site, {"clipped": 0, "rejected": 0})[action] += 1
    return "; ".join(f"{site}: {c['clipped']} clipped, {c['rejected']} rejected"
                     for site, c in counts.items()) or "no update clipped or rejected"


def intercept_summary(result: ExperimentResult) -> str | None:
    """The private intercept step that ended training, and the sites it left out (None
    when the study took none)."""
    step = result.intercept_step
    if step is None:
        return None
    text = (f"Intercept step: {step.step:+.3f} on the log-odds scale, from the private sums "
            f"of {len(step.kept)} of {len(step.z)} sites")
    left = [f"{site} (z {step.z[site]:+.1f}: "
            f"{'more' if step.z[site] > 0 else 'fewer'} events than the model predicts; "
            f"check its outcome coding)" for site in step.left_out]
    return text + (f"; left out: {'; '.join(left)}" if left else "")
