"""What a node computes for each task, with the simulator's own code; no transport here.

Statistics: :func:`cardiofed.data.preprocessing.site_statistics`. Training:
``FederatedAlgorithm.client_update`` with the seed the simulator derives for the same
round and site index, through the site's DP wrapper when it has a budget. Evaluation:
:func:`cardiofed.evaluation.metrics.binary_metrics` on the site's own test split.
Attribution: :func:`cardiofed.causal.study.site_step` on every row of the site.
Each function returns the exact bytes to upload. Everything the coordinator sent passes
the release gate first (:mod:`cardiofed.privacy.release_gate`): the preprocessor and
weights are checked against the site's own ranges, and the rows are bounded before any
model sees them.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Literal

import numpy as np

from cardiofed.aggregation.intercept_step import intercept_sums
from cardiofed.algorithms.base import LocalTrainer
from cardiofed.causal.sources import export_site
from cardiofed.causal.study import AttributionPlan, SiteArrays
from cardiofed.data.catalog import load_dataset, study_columns
from cardiofed.data.dataset import SiteData, feature_ranges_for
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    PRIVATE_BINS,
    Preprocessor,
    bin_edges,
    local_preprocessor,
    site_statistics,
)
from cardiofed.data.sites import load_site_rows, site_from_export
from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.evaluation.private_metrics import score_bin_edges
from cardiofed.exceptions import DataValidationError, TaskRefused
from cardiofed.models.networks import Weights, get_weights, make_model, score
from cardiofed.node.config import DataSource
from cardiofed.privacy.release_gate import (
    bounded_rows,
    check_preprocessor,
    check_weights,
    floored_scales,
)
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.schema import Catalogue, canonical_features
from cardiofed.serving.provenance import OUTCOME_OF_DATASET
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.runner import derive_seed, update_manifest
from cardiofed.training.local import train_local
from cardiofed.wire import decode_arrays, encode_arrays, encode_metrics

log = logging.getLogger("cardiofed.node")


def load_site_data(source: DataSource, feature_names: list[str],
                   catalogue: Catalogue | None = None, outcome: str | None = None) -> SiteData:
    """The site's own rows, encoded to the study's feature columns (`catalogue`: the
    study's features besides the built-in ones); refused when `outcome` is given and the
    site's mapping labels another."""
    if source.csv is not None and source.mapping is not None:
        raw, mapping, excluded = load_site_rows(source.csv, source.mapping, catalogue)
        if outcome is not None and mapping.outcome != outcome:
            raise TaskRefused(f"The study's outcome is {outcome!r}; this site's mapping "
                              f"labels {mapping.outcome!r}.")
        for reason, count in excluded.items():  # counts only: never a row
            log.warning("%s: %d left out: %s", source.csv, count, reason)
        site, _ = site_from_export(raw, mapping,
                                   canonical_features(feature_names),
                                   test_fraction=source.test_fraction, seed=source.seed,
                                   source=str(source.csv))
    else:
        assert source.dataset is not None and source.site is not None  # by DataSource
        site = load_dataset(source.dataset, seed=source.seed,
                            data_dir=source.data_dir).site(source.site)
    if site.x_train.shape[1] != len(feature_names):
        raise DataValidationError(f"The site's data has {site.x_train.shape[1]} feature columns; "
                                  f"the study expects {len(feature_names)}: {feature_names}.")
    return site


def own_feature_ranges(source: DataSource, feature_names: list[str],
                       catalogue: Catalogue | None = None) -> list[tuple[float, float]]:
    """The plausible ranges of the study's columns as the site knows them (the reference
    data set's, or the schema's): they set the statistics' bin edges, not the task."""
    if source.dataset is not None:
        names, ranges = study_columns(dataset=source.dataset)
        if names == feature_names:
            return ranges
    try:
        return feature_ranges_for(feature_names, catalogue)
    except (KeyError, ValueError) as exc:
        raise TaskRefused(f"The study's feature columns are not all in the schema ({exc}); "
                          f"this site cannot set their bin edges.") from None


def statistics_payload(site: SiteData, feature_ranges: list[tuple[float, float]],
                       manifest: dict[str, str], privacy: SitePrivacy | None = None) -> bytes:
    """The site's preprocessing statistics: exact, or through its DP wrapper (charged)."""
    if privacy is None:
        stats = site_statistics(site.x_train, bin_edges(feature_ranges, DEFAULT_BINS))
    else:
        stats = privacy.release_statistics(site.x_train,
                                           bin_edges(feature_ranges, PRIVATE_BINS))
    return encode_arrays(stats.to_arrays(), manifest)


def attribution_site(source: DataSource, plan: AttributionPlan, columns: list[str],
                     outcome: str | None, catalogue: Catalogue | None = None) -> SiteArrays:
    """The site's rows for an attribution study: covariates (`columns`, the schema's
    encoding), treatment and outcome, every row that has all of them (no test split).
    Refused, naming why, when the site's data does not hold what the plan names."""
    if source.dataset is not None:
        return _reference_attribution_site(source, plan, columns, outcome)
    assert source.csv is not None and source.mapping is not None  # by DataSource
    raw, mapping, _ = load_site_rows(source.csv, source.mapping, catalogue)
    if outcome is not None and mapping.outcome != outcome:
        raise TaskRefused(f"The study's outcome is {outcome!r}; this site's mapping labels "
                          f"{mapping.outcome!r}.")
    missing = [f for f in [*plan.covariates, plan.treatment] if f not in mapping.columns]
    if missing:
        raise TaskRefused(f"This site's mapping does not map {missing}, which the attribution "
                          f"plan uses.")
    if mapping.label.kind != plan.outcome:
        raise TaskRefused(f"The attribution plan's outcome is {plan.outcome}; this site's "
                          f"mapping labels a {mapping.label.kind} outcome.")
    site = export_site(raw, mapping, plan.treatment, plan.covariates, str(source.csv))
    log.info("attribution: %d rows have every covariate and the treatment", len(site.outcome))
    return site


def survival_rows(source: DataSource, columns: list[str], outcome: str | None,
                  catalogue: Catalogue | None = None,
                  part: Literal["all", "train", "test"] = "all"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The site's rows for a survival study: follow-up (years), event and covariates
    (`columns`), every row of `part` with all of them (all: both splits; train or test:
    the split a model study uses). The synthetic reference federation exports censored
    follow-up; a site's export needs its mapping's ``[follow_up]``. Refused, naming why,
    otherwise."""
    if source.dataset is not None:
        if source.dataset != "synthetic":
            raise TaskRefused(f"Data set {source.dataset!r} has no follow-up times; a survival "
                              f"study runs on synthetic or on a site's export with "
                              f"[follow_up].")
        from cardiofed.data.synthetic import synthetic_federation

        data = synthetic_federation(seed=source.seed, survival=True)
        missing = [c for c in columns if c not in data.feature_names]
        if missing or source.site not in [s.name for s in data.sites]:
            raise TaskRefused(f"The synthetic federation has no columns {missing} or no site "
                              f"{source.site!r}.")
        site = data.site(str(source.site))
        x_all = np.vstack([site.x_train, site.x_test])[
            :, [data.feature_names.index(c) for c in columns]]
    else:
        assert source.csv is not None and source.mapping is not None  # by DataSource
        site = load_site_data(source, columns, catalogue, outcome)
        x_all = np.vstack([site.x_train, site.x_test])
        if not site.survival:
            raise TaskRefused("This site's mapping declares no [follow_up] (the column and "
                              "unit of each patient's follow-up), which a survival study "
                              "needs.")
    assert site.time_train is not None and site.time_test is not None
    time = np.concatenate([site.time_train, site.time_test])
    event = np.concatenate([site.y_train, site.y_test])
    if part != "all":
        rows = (slice(None, len(site.y_train)) if part == "train"
                else slice(len(site.y_train), None))
        time, event, x_all = time[rows], event[rows], x_all[rows]
    keep = np.isfinite(x_all).all(axis=1)
    log.info("survival: %d of %d rows have every covariate", int(keep.sum()), len(keep))
    return time[keep], event[keep], x_all[keep]


def _reference_attribution_site(source: DataSource, plan: AttributionPlan,
                                columns: list[str], outcome: str | None) -> SiteArrays:
    """A reference federation's site: the synthetic intervention (12 sites drawn with the
    source's seed) or Framingham's hypertensive patients (BPMEDS)."""
    from cardiofed.causal import design, sources

    if source.dataset == "synthetic":
        sites, own, treatment = (*sources.synthetic_sites(12, seed=source.seed),
                                 design.TREATMENT)
    elif source.dataset == "framingham":
        sites, own = sources.framingham_sites(source.data_dir, seed=source.seed)
        treatment = "bp_treated"
    else:
        raise TaskRefused(f"Data set {source.dataset!r} has no treatment to attribute; "
                          f"attribution runs on synthetic, framingham or a site's export.")
    expected = (treatment, own, OUTCOME_OF_DATASET[source.dataset])
    if (plan.treatment, columns, outcome or expected[2]) != expected:
        raise TaskRefused(f"Data set {source.dataset!r} holds treatment {treatment!r}, "
                          f"covariates {own} and outcome {expected[2]!r}; the study asks for "
                          f"{plan.treatment!r}, {columns} and {outcome!r}.")
    by_name = {s.name: s for s in sites}
    if source.site not in by_name:
        raise TaskRefused(f"Data set {source.dataset!r} has no site {source.site!r}; its "
                          f"sites: {', '.join(by_name)}.")
    return by_name[source.site]


def site_preprocessor(blob: bytes, site: SiteData, plan: SimulationConfig,
                      feature_names: list[str],
                      ranges: list[tuple[float, float]]) -> Preprocessor:
    """The study's preprocessor, through the release gate (checked against the site's
    `ranges`, scales floored), or the site's own standardisation with the shared fill."""
    form = plan.model_form(feature_names)
    try:
        shared = Preprocessor.from_arrays(decode_arrays(blob)[0], form)
    except (KeyError, ValueError) as exc:
        raise TaskRefused(f"The study's preprocessor does not fit its plan: {exc}") from None
    shared = check_preprocessor(shared, ranges)
    if plan.standardisation == "per-site":
        return floored_scales(local_preprocessor(site.x_train, shared.fill, form), ranges)
    return shared


def study_weights(plan: SimulationConfig, pre: Preprocessor, blob: bytes) -> Weights:
    """The coordinator's model, through the release gate: the plan's model's names and
    shapes, finite and bounded."""
    try:
        weights = decode_arrays(blob)[0]
    except ValueError as exc:
        raise TaskRefused(f"The study's model is not a valid payload: {exc}") from None
    return check_weights(weights, get_weights(make_model(plan.model, pre.n_columns, seed=0)))


def train_payload(site: SiteData, pre: Preprocessor, plan: SimulationConfig, weights: Weights, *,
                  round_number: int, site_index: int, manifest: dict[str, str],
                  privacy: SitePrivacy | None,
                  ranges: list[tuple[float, float]]) -> bytes:
    """One round of local training from `weights` on the site's bounded rows; the update
    as safetensors bytes."""
    algorithm = plan.make_algorithm()
    model = make_model(plan.model, pre.n_columns, seed=plan.seed)
    trainer: LocalTrainer = train_local
    if privacy is not None:
        trainer = partial(privacy.train, what=f"round {round_number}")
    update = algorithm.client_update(
        model, weights, bounded_rows(pre, site.x_train, ranges),
        site.y_train.astype(np.float32),
        site=manifest["site"], seed=derive_seed(plan.seed, round_number, site_index),
        trainer=trainer, report_global_loss=privacy is None and plan.reports_global_loss)
    if privacy is not None:
        update = privacy.declare(update)
    return encode_arrays(update.delta, {**manifest, **update_manifest(update)})


def intercept_payload(site: SiteData, pre: Preprocessor, plan: SimulationConfig,
                      weights: Weights, privacy: SitePrivacy | None, *,
                      manifest: dict[str, str], ranges: list[tuple[float, float]]) -> bytes:
    """The final trained model's intercept sums on the site's bounded training rows
    (:mod:`cardiofed.aggregation.intercept_step`): through the ledger with a budget (its
    declared records the noisy count of the statistics release), exact without one."""
    with np.errstate(over="ignore"):
        probs = score(plan.model, weights, bounded_rows(pre, site.x_train, ranges))
    if privacy is None:
        (d, i), noise, n = intercept_sums(site.y_train, probs), 0.0, site.n_train
    else:
        n = privacy.public_n()  # refused before any charge without a statistics release
        d, i, noise = privacy.release_intercept_sums(site.y_train, probs)
    return encode_arrays({"sums": np.array([d, i]), "noise_std": np.array([noise])},
                         {**manifest, "num_samples": str(n)})


def risks_on_test_split(site: SiteData, pre: Preprocessor, plan: SimulationConfig,
                        weights: Weights, ranges: list[tuple[float, float]]) -> np.ndarray:
    """The model's risks for the site's own bounded test rows (non-finite where the
    model overflows: each evaluation treats them as it must)."""
    with np.errstate(over="ignore"):
        return score(plan.model, weights, bounded_rows(pre, site.x_test, ranges))


def evaluate_payload(site: SiteData, pre: Preprocessor, plan: SimulationConfig,
                     weights: Weights, privacy: SitePrivacy | None = None, *,
                     ranges: list[tuple[float, float]], publish: bool = True) -> bytes:
    """The final model's evaluation on the site's own bounded test rows. Without a
    budget: exact metrics (JSON). With one: noisy score histograms per label (charged),
    with the epsilon the ledger has spent in their manifest. A site that declines to
    publish sends an empty JSON object and releases nothing."""
    if not publish:
        return encode_metrics({})
    probs = risks_on_test_split(site, pre, plan, weights, ranges)
    if privacy is None:
        return encode_metrics(binary_metrics(site.y_test, probs))
    neg, pos, noise_std = privacy.release_evaluation(site.y_test, probs, score_bin_edges())
    return encode_arrays({"negatives": neg, "positives": pos},
                         {"noise_std": repr(noise_std),
                          "epsilon_spent": repr(privacy.ledger.spent()),
                          "epsilon_delta": repr(privacy.ledger.delta)})
