"""Federated vs local-only vs pooled, evaluated at every site: the honest comparison.

Federated evaluation: each site scores a model on its own test split and only the
metrics leave it. The pooled-test row (all test splits together) is a simulation-only
view used for reports and benchmarks. With personalisation, each site first holds out
a calibration split of its training rows: the federation trains on the rest, and the
site updates the global model on the held-out rows (recalibration along the updating
hierarchy, proximal fine-tuning), so nothing is judged on rows it was fitted on. Where
the data set knows each test patient's true risk (synthetic cohorts), the true risks are
scored as one more "model": the yardstick of what is achievable at the site.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from cardiofed.aggregation.intercept_step import (
    InterceptStep,
    intercept_step,
    intercept_sums,
    shift_intercept,
)
from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.data.sites import split_indices
from cardiofed.evaluation.label_quality import (
    LabelQuality,
    cross_site_auc_matrix,
    detect_label_disagreement,
)
from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.evaluation.private_metrics import metrics_with_uncertainty, score_bin_edges
from cardiofed.evaluation.recalibration import Recalibration, fit_update
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import Weights, score
from cardiofed.names import safe_name
from cardiofed.privacy.budget import (
    RELEASE_KINDS,
    PrivacyLedger,
    SiteBudget,
    open_site_ledger,
)
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.alone import train_alone
from cardiofed.simulation.async_runner import run_async
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite, prepare_federation, prepare_local_only
from cardiofed.simulation.runner import (
    FederatedRun,
    Outbox,
    derive_seed,
    run_federated,
    train_centralised,
)
from cardiofed.training.estimator import RiskEstimator
from cardiofed.training.personalise import Personalisation, finetune
from cardiofed.wire import encode_arrays, encode_metrics

FEDERATED, LOCAL, POOLED = "federated", "local-only", "pooled"
RECALIBRATED = "federated+recalibrated"
FINETUNED = "federated+fine-tuned"
TRUE_RISK = "true risk"
POOLED_TEST = "pooled test"


@dataclass
class ExperimentResult:
    """Metrics per site and model, the pooled-test view, and the raw test predictions."""

    dataset: str
    config: SimulationConfig
    federated: FederatedRun
    site_types: dict[str, str]
    site_sizes: dict[str, int]
    # site (or POOLED_TEST) -> model label -> metric name -> value
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # site -> model label -> (y_true, y_prob) on that site's test split
    predictions: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    preprocessors: dict[str, Preprocessor] = field(default_factory=dict)
    # site -> what DP spent there (empty without DP)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    label_quality: LabelQuality | None = None
    sites: list[PreparedSite] = field(default_factory=list)  # as the federation prepared them
    recalibrations: dict[str, Recalibration] = field(default_factory=dict)
    # site -> metrics of the federated model as its DP evaluation release gives them
    # (point estimates and 95% intervals); what a model card may publish under DP.
    released_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # site -> its proximal fine-tuning (personal weights and the strength chosen)
    personalisations: dict[str, Personalisation] = field(default_factory=dict)
    # site -> training rows the site held out to personalise the model
    calibration_sizes: dict[str, int] = field(default_factory=dict)
    # site -> summed log-loss of the federated model on the site's calibration split:
    # validation data, on which settings (e.g. the model form) may be chosen
    calibration_loss: dict[str, float] = field(default_factory=dict)
    # The intercept step that ended training (config.intercept_step; by default under DP)
    intercept_step: InterceptStep | None = None

    @property
    def headline_model(self) -> str:
        """The model each site would use: personalised when the experiment personalised."""
        if self.config.recalibrate:
            return RECALIBRATED
        return FINETUNED if self.config.finetune else FEDERATED

    def estimator(self, site: str) -> RiskEstimator:
        """The federated model as an estimator, with the preprocessing `site` used."""
        if site not in self.preprocessors:
            raise KeyError(f"No site {site!r}; sites are {sorted(self.preprocessors)}.")
        return RiskEstimator.from_weights(self.federated.weights, self.preprocessors[site],
                                          model=self.config.model)

    def summary_rows(self, metric_names: tuple[str, ...] = ("auc", "calibration_slope",
                                                            "calibration_intercept")
                     ) -> list[dict[str, object]]:
        """One row per site (and the pooled test): each model's discrimination and
        calibration, point estimates (accuracy at a 0.5 threshold says little at a low
        prevalence, and is in ``metrics``)."""
        rows: list[dict[str, object]] = []
        for site, by_model in self.metrics.items():
            row: dict[str, object] = {"site": site, "type": self.site_types.get(site, ""),
                                      "n_train": self.site_sizes.get(site, "")}
            for label, values in by_model.items():
                for m in metric_names:
                    row[f"{label} {m}"] = values.get(m, float("nan"))
            rows.append(row)
        return rows


def _record(result: ExperimentResult, label: str, site_probs: dict[str, np.ndarray],
            sites: list[PreparedSite], outbox: Outbox | None = None) -> None:
    for s in sites:
        p = site_probs[s.name]
        metrics = binary_metrics(s.y_test, p)
        if outbox is not None:  # federated evaluation: only the metrics leave the site
            outbox(s.name, "metrics", encode_metrics({"model": label, **metrics}))
        result.metrics.setdefault(s.name, {})[label] = metrics
        result.predictions.setdefault(s.name, {})[label] = (s.y_test, p)
    y_all = np.concatenate([s.y_test for s in sites])
    p_all = np.concatenate([site_probs[s.name] for s in sites])
    result.metrics.setdefault(POOLED_TEST, {})[label] = binary_metrics(y_all, p_all)


PRIVACY_DISCLOSURE = (
    "Every release of a site is charged to its ledger: the preprocessing statistics "
    "(Gaussian noise on histograms and the record count), every DP-SGD step, the sums of "
    "the intercept step that ends training (with the training share), and the "
    "evaluation of the final model (noisy score histograms per label); epsilon is "
    "reported per kind of release and composed in total. Noise comes from a secret source "
    "at each site.")


def site_privacy(dataset: FederatedDataset, config: SimulationConfig,
                 ledger_dir: Path | None = None) -> dict[str, SitePrivacy]:
    """Each site's DP wrapper and ledger: in memory, or each site's one sealed ledger in
    ``ledger_dir/<site>`` (:func:`~cardiofed.privacy.budget.open_site_ledger`), which
    later simulations of the same sites keep charging."""
    if config.dp_epsilon is None:
        return {}
    budget = SiteBudget(epsilon_max=config.dp_epsilon, delta=config.dp_delta,
                        accountant=config.dp_accountant)
    study = f"simulation-{dataset.name}-{secrets.token_hex(4)}"
    privacy = {}
    for s in dataset.sites:
        if ledger_dir is None:
            ledger = PrivacyLedger(site=s.name, budget=budget, n_records=s.n_train)
        else:
            ledger = open_site_ledger(site=s.name, budget=budget,
                                      ledger_dir=Path(ledger_dir) / safe_name(s.name))
            ledger.check_records(s.n_train)
        privacy[s.name] = SitePrivacy(ledger=ledger, local=config.local_config(),
                                      rounds=config.rounds,
                                      max_grad_norm=config.dp_max_grad_norm, study=study,
                                      intercept_step=config.intercept_step)
    return privacy


def _intercept_step(run: FederatedRun, config: SimulationConfig,
                    privacy: dict[str, SitePrivacy], sites: list[PreparedSite],
                    outbox: Outbox | None) -> InterceptStep | None:
    """Each site's intercept sums on its training rows with the trained model (private
    through its ledger, or exact without DP), and the step the coordinator takes from
    them (None when no site had budget left)."""
    sums, noise, counts = {}, {}, {}
    for s in sites:
        probs = score(config.model, run.weights, s.x_train)
        if not privacy:
            (d, i), std, n = intercept_sums(s.y_train, probs), 0.0, s.n_train
        else:
            try:
                n = privacy[s.name].public_n()
                d, i, std = privacy[s.name].release_intercept_sums(s.y_train, probs)
            except PrivacyBudgetExceeded:
                continue  # the site has no budget left: it releases nothing
        if outbox is not None:
            outbox(s.name, "intercept", encode_metrics({"score": d, "information": i,
                                                        "noise_std": std}))
        sums[s.name], noise[s.name], counts[s.name] = (d, i), std, float(n)
    return intercept_step(sums, noise, counts) if sums else None


def _released_evaluation(result: ExperimentResult, privacy: dict[str, SitePrivacy],
                         sites: list[PreparedSite], outbox: Outbox | None,
                         groups: list[list[str]] | None) -> None:
    """Each site's DP evaluation release of the federated model, and the metrics (with
    their uncertainty) computed from it, as the coordinator would. A secure study
    releases one secure sum instead (one per group of `groups`, through the statistics
    gate): the pooled test's metrics only (:mod:`~cardiofed.simulation.secure_evaluation`)."""
    edges = score_bin_edges()
    rng = np.random.default_rng(derive_seed(result.config.seed, 40_000))  # bootstrap only
    if result.config.secure_aggregation:
        from cardiofed.simulation.secure_evaluation import POOLED_SECURE, secure_evaluation

        pooled = secure_evaluation(
            [(s.name, s.y_test, score(result.config.model, result.federated.weights,
                                      s.x_test)) for s in sites],
            privacy, result.config.secure_dropout, rng, groups=groups)
        if pooled is not None:
            result.released_metrics[POOLED_SECURE] = pooled
        return
    for s in sites:
        probs = score(result.config.model, result.federated.weights, s.x_test)
        try:
            neg, pos, noise = privacy[s.name].release_evaluation(s.y_test, probs, edges)
        except PrivacyBudgetExceeded:
            continue  # the site has no budget left: it publishes no metrics
        if outbox is not None:
            outbox(s.name, "metrics", encode_arrays({"negatives": neg, "positives": pos},
                                                    {"noise_std": repr(noise)}))
        result.released_metrics[s.name] = metrics_with_uncertainty(neg, pos, edges,
                                                                   noise_std=noise, rng=rng)


def run_experiment(dataset: FederatedDataset, config: SimulationConfig, *,
                   baselines: bool = True, progress: bool = False,
                   ledger_dir: Path | None = None, outbox: Outbox | None = None
                   ) -> ExperimentResult:
    """Train federated (and, with ``baselines``, local-only and pooled) and evaluate all.

    With ``config.dp_epsilon`` every site releases its statistics, training updates and
    evaluation under its own ledger (persisted in `ledger_dir` when given); ``metrics``
    keep the simulation-only exact view for researchers, ``released_metrics`` what the
    sites' DP evaluation releases give. The baselines stay non-private references.
    `outbox` sees every payload the sites send (statistics, updates, metrics).
    Under DP training ends with the intercept step (``config.intercept_step``,
    :mod:`cardiofed.aggregation.intercept_step`), in ``intercept_step`` of the result.
    Bias corrections: ``label_quality`` cross-evaluates the sites' local models (only
    AUCs cross sites) and gives a site whose labels disagree with the others' no weight.
    Local-only models are what each site would build alone
    (:func:`~cardiofed.simulation.alone.train_alone`: a cross-validated ridge logistic
    regression). Personalisation (``recalibrate``, ``finetune``): each site holds out
    ``calibration_fraction`` of its training rows from the federation and updates the
    global model on them, reported as ``federated+recalibrated`` and
    ``federated+fine-tuned``. Local-only models train on all of a site's training rows;
    the pooled model on the rows the federation trained on.
    """
    if config.label_quality and len(dataset.sites) < 3:
        raise ConfigurationError(f"label_quality compares each site's labels with the other "
                                 f"sites' models: it needs at least 3 sites; this federation "
                                 f"has {len(dataset.sites)}.")
    if config.secure_aggregation and config.dp_epsilon is None:
        raise ConfigurationError("secure_aggregation in simulation: dp_epsilon must be set "
                                 "(each site's budget, which the secure sums' distributed "
                                 "noise covers)")
    privacy = site_privacy(dataset, config, ledger_dir)
    form = config.model_form(dataset.feature_names)
    federation, held_out = _hold_out_calibration(dataset, config)
    groups = None  # the secure training's groups, whose statistics sums are gated too
    if config.secure_aggregation and config.secure_group_size is not None:
        from cardiofed.simulation.secure_runner import secure_groups  # loads cryptography

        groups = secure_groups([s.name for s in federation.sites], config.secure_group_size,
                               config.seed)
    sites = prepare_federation(federation, config.standardisation, outbox,
                               covariate_shift=config.covariate_shift, privacy=privacy or None,
                               form=form, robust=config.robust_rule is not None,
                               secure_dropout=config.secure_dropout
                               if config.secure_aggregation else None,
                               secure_groups=groups)
    local_sites: list[PreparedSite] = []
    local_weights: list[Weights] = []
    if baselines or config.label_quality:
        local_sites = [prepare_local_only(s, dataset.feature_ranges, form)
                       for s in dataset.sites]
        local_weights = [train_alone(s.x_train, s.y_train, config,
                                     seed=derive_seed(config.seed, 10_000, k))
                         for k, s in enumerate(local_sites)]
    quality = _label_quality(dataset, config, local_sites, local_weights) \
        if config.label_quality else None
    multipliers = dict.fromkeys(quality.flagged, 0.0) if quality else None
    if config.secure_aggregation:
        from cardiofed.simulation.secure_runner import run_secure_sgd  # loads cryptography

        run = run_secure_sgd(sites, config, privacy=privacy)
    elif config.aggregation == "async":
        run = run_async(sites, config, privacy=privacy or None, outbox=outbox,
                        site_multipliers=multipliers)
    else:
        run = run_federated(sites, config, progress=progress, privacy=privacy or None,
                            outbox=outbox, site_multipliers=multipliers)
    stepped = _intercept_step(run, config, privacy, sites, outbox) \
        if config.intercept_step else None
    if stepped is not None:
        run = replace(run, weights=shift_intercept(run.weights, stepped.step, config.model))
    result = ExperimentResult(dataset=dataset.name, config=config, federated=run,
                              site_types={s.name: s.site_type for s in sites},
                              site_sizes={s.name: s.n_train for s in dataset.sites},
                              preprocessors={s.name: s.preprocessor for s in sites},
                              label_quality=quality, sites=sites, intercept_step=stepped,
                              calibration_sizes={k: len(v[1]) for k, v in held_out.items()})
    if privacy:
        _released_evaluation(result, privacy, sites, outbox, groups)
    for name, p in privacy.items():
        by_kind = p.ledger.spent_by_kind()
        result.privacy[name] = {
            "epsilon_spent": by_kind["total"], "epsilon_max": p.ledger.budget.epsilon_max,
            **{f"epsilon_{kind}": by_kind[kind] for kind in RELEASE_KINDS},
            "delta": p.ledger.delta,
            "noise_multiplier": (p.dp.noise_multiplier if p.dp else
                                 p.charged_secure_noise() or float("nan")),
            "max_grad_norm": p.max_grad_norm, "n_records": float(result.site_sizes[name]),
            "rounds_trained": float(run.participation[name])}
    if baselines:
        _record(result, LOCAL, {s.name: score(config.model, w, s.x_test)
                                for s, w in zip(local_sites, local_weights, strict=True)},
                local_sites)
    _record(result, FEDERATED, {s.name: score(config.model, run.weights, s.x_test)
                                for s in sites}, sites, None if privacy else outbox)
    _personalise(result, sites, held_out,
                 form.names if form is not None else dataset.feature_names)
    if baselines:
        x_pool = np.concatenate([s.x_train for s in sites])
        y_pool = np.concatenate([s.y_train for s in sites])
        pooled = train_centralised(x_pool, y_pool, config, seed=derive_seed(config.seed, 20_000),
                                   rounds=run.rounds)
        _record(result, POOLED, {s.name: score(config.model, pooled, s.x_test) for s in sites},
                sites)
    truth = {s.name: s.true_risk_test for s in dataset.sites if s.true_risk_test is not None}
    if len(truth) == len(sites):
        _record(result, TRUE_RISK, truth, sites)
    return result


def _hold_out_calibration(dataset: FederatedDataset, config: SimulationConfig
                          ) -> tuple[FederatedDataset, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Without personalisation, the data set as it is. With it, each site's training rows
    minus a seeded, stratified calibration split, and those splits (encoded rows, labels)."""
    if not config.personalised:
        return dataset, {}
    sites, held_out = [], {}
    for k, s in enumerate(dataset.sites):
        fit, cal = split_indices(s.y_train, config.calibration_fraction,
                                 derive_seed(config.seed, 50_000, k))
        sites.append(replace(s, x_train=s.x_train[fit], y_train=s.y_train[fit]))
        held_out[s.name] = (s.x_train[cal], s.y_train[cal])
    return replace(dataset, sites=sites), held_out


def _personalise(result: ExperimentResult, sites: list[PreparedSite],
                 held_out: dict[str, tuple[np.ndarray, np.ndarray]],
                 column_names: list[str]) -> None:
    """Each site's update of the global model on its calibration split."""
    if not held_out:
        return
    config, weights = result.config, result.federated.weights
    for s in sites:
        x_cal, y_cal = held_out[s.name]
        p = np.clip(score(config.model, weights, s.preprocessor.transform(x_cal)), 1e-7,
                    1 - 1e-7)
        result.calibration_loss[s.name] = float(-np.sum(y_cal * np.log(p)
                                                        + (1 - y_cal) * np.log1p(-p)))
    if config.recalibrate:
        updated = {}
        for s in sites:
            x_cal, y_cal = held_out[s.name]
            z_cal = s.preprocessor.standardise(x_cal)
            fit = (fit_update(y_cal, score(config.model, weights, z_cal), z_cal,
                              term_names=column_names) if len(y_cal)
                   else Recalibration.identity("no calibration rows"))
            result.recalibrations[s.name] = fit
            updated[s.name] = fit.apply(score(config.model, weights, s.x_test),
                                        s.x_test.astype(np.float64))
        _record(result, RECALIBRATED, updated, sites)
    if config.finetune:
        personal = {}
        for k, s in enumerate(sites):
            x_cal, y_cal = held_out[s.name]
            chosen = finetune(config.model, weights, s.x_train, s.y_train,
                              s.preprocessor.transform(x_cal), y_cal,
                              config=config.local_config(),
                              epochs=result.federated.rounds * config.local_epochs,
                              seed=derive_seed(config.seed, 60_000, k))
            result.personalisations[s.name] = chosen
            personal[s.name] = score(config.model, chosen.weights, s.x_test)
        _record(result, FINETUNED, personal, sites)


def _label_quality(dataset: FederatedDataset, config: SimulationConfig,
                   local_sites: list[PreparedSite], local_weights: list[Weights]) -> LabelQuality:
    """Cross-site evaluation: site i's local model scores all of site j's rows at site j
    (with site i's preprocessing, which is aggregate statistics); only AUCs and class
    counts are shared. A site whose labels the others' models cannot predict is flagged."""
    predictors = [partial(_score_raw, config.model, w, s.preprocessor)
                  for s, w in zip(local_sites, local_weights, strict=True)]
    evaluation_sets = [dataset.own_records(s) for s in dataset.sites]
    matrix = cross_site_auc_matrix(predictors, evaluation_sets)
    counts = [(int(y.sum()), int(len(y) - y.sum())) for _, y in evaluation_sets]
    return detect_label_disagreement(matrix, [s.name for s in dataset.sites],
                                     class_counts=counts)


def _score_raw(model_kind: str, weights: Weights, pre: Preprocessor, x: np.ndarray) -> np.ndarray:
    return score(model_kind, weights, pre.transform(x))
