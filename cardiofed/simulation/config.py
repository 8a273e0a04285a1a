"""Validated settings of a simulated federation (also read from a TOML config file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cardiofed._pydantic import read_toml
from cardiofed.aggregation.robust import RobustAggregation
from cardiofed.algorithms import FederatedAlgorithm, make_algorithm
from cardiofed.algorithms.staleness import StalenessRule
from cardiofed.algorithms.stopping import StoppingRule
from cardiofed.algorithms.weighting import WeightingRule
from cardiofed.causal.study import AttributionPlan
from cardiofed.data.model_form import ModelForm, model_form
from cardiofed.data.study_features import StudyFeatures, catalogue_of
from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import Catalogue
from cardiofed.survival.study import SurvivalPlan
from cardiofed.training.config import LocalTrainingConfig

# The most rounds a plan runs unless it says: training stops earlier once converged
# (stop_patience). Where it cannot stop early, it runs FIXED_ROUNDS: under DP the sites
# release no loss to stop on (and DP-SGD spreads the budget over every planned round:
# fewer rounds, less noise in each); asynchronous versions are all published.
DEFAULT_ROUNDS = 100
FIXED_ROUNDS = 20


class SimulationConfig(BaseModel):
    """Model, algorithm and training schedule of a simulated federation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal["logistic", "mlp"] = "logistic"
    # The model's columns (cardiofed.data.model_form): the encoded features, their log
    # terms with treated/untreated blood pressure, or those with sex interactions.
    feature_transform: Literal["raw", "log", "clinical"] = "raw"
    # The study's own features and outcome beside the built-in catalogue
    # (cardiofed.data.study_features); they travel with the plan.
    study_features: StudyFeatures | None = None
    # A causal attribution study instead of a model (cardiofed.causal.study): networked
    # studies take it from the plan; in simulation `cardiofed attribution` runs one.
    attribution: AttributionPlan | None = None
    # A federated Cox model instead (cardiofed.survival.study): networked studies only.
    survival: SurvivalPlan | None = None
    algorithm: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "scaffold"] = "fedavg"
    # The most rounds (default DEFAULT_ROUNDS, or FIXED_ROUNDS where training cannot
    # stop early). Synchronous training stops earlier once the global model's loss on
    # the sites' rows has not improved by stop_tolerance for stop_patience rounds
    # (cardiofed.algorithms.stopping); None runs every round. Private sites release no
    # loss, so under DP every round runs.
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, le=100_000)
    stop_patience: int | None = Field(5, ge=1, le=100_000)
    # The model a synchronous run ends with is the mean of its last `average_last` rounds'
    # global models (tail averaging): post-processing of models the coordinator holds
    # anyway, so it costs no privacy, and it averages away part of DP-SGD's noise.
    average_last: int = Field(1, ge=1, le=100_000)
    stop_tolerance: float = Field(1e-3, ge=0, lt=1, allow_inf_nan=False)
    local_epochs: int = Field(1, ge=1, le=10_000)
    local_steps: int | None = Field(None, ge=1, le=10_000_000)
    batch_size: int = Field(32, ge=1, le=10_000_000)
    lr: float = Field(0.05, gt=0, le=1e3, allow_inf_nan=False)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    proximal_mu: float = Field(0.01, gt=0, allow_inf_nan=False)
    server_lr: float | None = Field(None, gt=0, le=1e3, allow_inf_nan=False)
    standardisation: Literal["global", "per-site"] = "global"
    fraction_fit: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    eval_every: int = Field(1, ge=0, le=100_000,
                            description="0 evaluates only after the last round")
    # How the simulator trains a round's sites: "vectorised" all at once
    # (cardiofed.training.batched), "loop" one after another; "auto" vectorises whenever
    # it can (plain SGD, no DP, no SCAFFOLD) and gives the same models either way.
    backend: Literal["auto", "loop", "vectorised"] = "auto"
    # Differential privacy (record-level DP-SGD at every site); off when dp_epsilon is None.
    dp_epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    dp_delta: float | None = Field(None, gt=0, lt=1)
    # DP-SGD's clipping bound of each record's weight gradient; its output-bias part has
    # a bound of its own, 1 (cardiofed.privacy.dp_sgd.DPConfig). 2 clips only the largest
    # gradients of a standardised model (bench/privacy_utility.py).
    dp_max_grad_norm: float = Field(2.0, gt=0, allow_inf_nan=False)
    dp_accountant: Literal["rdp", "prv"] = "rdp"
    # Training ends with each site's intercept sums (private at a private site, paid from
    # its training share) and one Newton step of the intercept over the sites that agree
    # (cardiofed.aggregation.intercept_step). None: on wherever sites release privately
    # on their own (dp_epsilon in simulation; a networked study's nodes are private by
    # default), off over secure sums.
    dp_intercept_step: bool | None = None
    # Secure aggregation with distributed DP (cardiofed.secure): each round every site
    # sends a secure sum's share, its clipped per-record gradient sum plus its share of
    # the noise, and the server steps on the unmasked sum (DP-FedSGD with the algorithm's
    # server optimiser). The noise is split over the sites a sum may not lose
    # (1 - secure_dropout of them). Each site's budget sets its noise (dp_epsilon in
    # simulation, the node's [privacy] on a network); logistic regression for now.
    secure_aggregation: bool = False
    secure_dropout: float = Field(0.2, ge=0, lt=1)
    # Robust across groups: sites are shuffled into groups of at least this many (by
    # the plan's seed in simulation; each round, from the sites' keys, on a network),
    # each group's gradient is a secure sum of its own (with the whole noise: the
    # coordinator sees each), and robust_rule runs across the groups' means.
    secure_group_size: int | None = Field(None, ge=2, le=1_000_000)
    # Bias correction (see cardiofed.algorithms.weighting and cardiofed.simulation.experiment).
    weighting: Literal["sample-size", "type-balanced", "qffl", "agnostic"] = "sample-size"
    qffl_q: float = Field(1.0, ge=0, allow_inf_nan=False)
    afl_step: float = Field(0.5, gt=0, allow_inf_nan=False)
    covariate_shift: bool = False
    label_quality: bool = False
    # Personalisation (cardiofed.evaluation.recalibration, cardiofed.training.personalise):
    # each site holds out `calibration_fraction` of its training rows from federated
    # training, updates the global model on them along the updating hierarchy
    # (`recalibrate`) and/or fine-tunes it with a proximal term chosen on them (`finetune`).
    recalibrate: bool = False
    finetune: bool = False
    calibration_fraction: float = Field(0.25, gt=0, lt=1)
    # Asynchronous aggregation (cardiofed.algorithms.staleness): with "async", `rounds`
    # is the number of global model versions published.
    aggregation: Literal["sync", "async"] = "sync"
    buffer_size: int = Field(3, ge=1, le=1_000_000,
                             description="K: updates per new global model")
    buffer_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                           description="publish after T s with >= 1 update")
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_exponent: float = Field(0.5, ge=0, allow_inf_nan=False)
    staleness_hinge: int = Field(4, ge=0, le=1_000_000)
    max_staleness: int = Field(50, ge=0, le=1_000_000)
    # Under a robust rule a version aggregates a window: the buffer's updates and every
    # other site's latest (discounted by its staleness, within max_staleness), so f
    # malicious fast sites are f of the window, not f of the buffer
    # (cardiofed.algorithms.staleness.window). None: on under a robust rule.
    async_window: bool | None = None
    # Robust aggregation (cardiofed.aggregation.robust). None: off in simulation; a
    # networked study turns it on by default (the weighted median after the norm bound,
    # cardiofed.coordinator.studies.network_plan; bench/robustness.py).
    robust_rule: Literal["mean", "trimmed-mean", "median", "weighted-median", "multi-krum",
                         "centered-clip"] | None = None
    robust_norm_bound: float | None = Field(3.0, ge=1, allow_inf_nan=False)
    robust_max_weight_share: float | None = Field(0.5, gt=0, le=1)
    robust_trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    robust_byzantine: int = Field(1, ge=0, le=1_000_000)

    @model_validator(mode="before")
    @classmethod
    def _default_rounds(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("rounds") is None:
            stops = (data.get("dp_epsilon") is None and data.get("aggregation") != "async"
                     and data.get("stop_patience", 5) is not None)
            data = {k: v for k, v in data.items() if k != "rounds"}
            return data if stops else {**data, "rounds": FIXED_ROUNDS}
        return data

    @model_validator(mode="after")
    def _dp_compatible(self) -> SimulationConfig:
        if self.dp_epsilon is not None and self.algorithm == "fedprox":
            raise ValueError("differential privacy does not support fedprox's proximal term; "
                             "use fedavg, fedadam or fedyogi")
        if self.algorithm == "scaffold" and (self.optimizer != "sgd" or self.momentum):
            raise ValueError("scaffold's control variates assume plain local SGD; set "
                             "optimizer = 'sgd' and momentum = 0")
        if self.dp_epsilon is not None and self.algorithm == "scaffold":
            raise ValueError("differential privacy does not cover scaffold's control "
                             "variates; use fedavg, fedadam or fedyogi")
        if self.dp_epsilon is not None and self.weighting in ("qffl", "agnostic"):
            raise ValueError(f"weighting {self.weighting!r} needs each site's loss, a release "
                             "differential privacy does not cover; use sample-size or "
                             "type-balanced weighting with DP")
        if self.aggregation == "async" and self.algorithm == "scaffold":
            raise ValueError("scaffold's control variates need synchronous rounds; use "
                             "aggregation = 'sync' or another algorithm")
        if self.aggregation == "async" and self.fraction_fit < 1:
            raise ValueError("fraction_fit samples sites for synchronous rounds; with "
                             "aggregation = 'async' every site trains at its own pace, so "
                             "leave fraction_fit at 1")
        if self.average_last > self.rounds:
            raise ValueError(f"average_last ({self.average_last}) averages the last rounds' "
                             f"models; it cannot exceed rounds ({self.rounds})")
        if self.average_last > 1 and self.aggregation == "async":
            raise ValueError("average_last averages synchronous rounds' models; with "
                             "aggregation = 'async' leave it at 1")
        if self.attribution is not None and self.survival is not None:
            raise ValueError("a study is an attribution study or a survival study, not "
                             "both; give one of [attribution] and [survival]")
        if self.dp_epsilon is not None and self.label_quality:
            raise ValueError("label_quality cross-evaluates each site's non-private local "
                             "model at the other sites, a release differential privacy does "
                             "not cover; switch label_quality off with dp_epsilon")
        if self.dp_epsilon is not None and self.recalibrate:
            raise ValueError("recalibrate fits each site's intercept and slope on its own rows "
                             "without noise (one patient moves the intercept), a release "
                             "differential privacy does not cover; switch recalibrate off "
                             "with dp_epsilon")
        if self.dp_epsilon is not None and self.finetune:
            raise ValueError("finetune trains each site's personal model without noise and "
                             "publishes its metrics, a release differential privacy does not "
                             "cover; switch finetune off with dp_epsilon")
        if self.dp_intercept_step and (self.secure_aggregation or self.analysis is not None):
            raise ValueError("dp_intercept_step ends a model's training rounds with each "
                             "site's own intercept sums: switch it off under "
                             "secure_aggregation (its secure sums are not built yet) and in "
                             "attribution and survival studies")
        if self.dp_epsilon is not None and self.standardisation == "per-site":
            raise ValueError("standardisation 'per-site' uses each site's exact mean and SD, "
                             "which differential privacy does not cover; use 'global' "
                             "(from the sites' noisy statistics) with dp_epsilon")
        if self.backend == "vectorised" and self.vectorised_refusal() is not None:
            raise ValueError(f"backend 'vectorised' cannot run this plan: "
                             f"{self.vectorised_refusal()}; use backend 'auto' or 'loop'")
        if self.secure_aggregation:
            self._check_secure()
        elif self.secure_group_size is not None:
            raise ValueError("secure_group_size groups the sites' secure sums; set "
                             "secure_aggregation = true, or leave it unset")
        if self.dp_epsilon is not None and self.covariate_shift:
            raise ValueError("covariate_shift reweights samples, which DP-SGD here does not "
                             "support; switch one of them off")
        return self

    def _check_secure(self) -> None:
        """What secure aggregation supports so far (DP-FedSGD of a logistic regression, or
        a private attribution), each refusal naming the setting."""
        wrong = [(self.model != "logistic", "model must be 'logistic'"),
                 (self.aggregation != "sync", "aggregation must be 'sync'"),
                 (self.algorithm not in ("fedavg", "fedadam", "fedyogi"),
                  "algorithm must be fedavg, fedadam or fedyogi (the server optimiser)"),
                 (self.robust_rule is not None and self.secure_group_size is None,
                  "robust_rule needs secure_group_size (a robust rule runs across groups' "
                  "secure sums, never on one site's release)"),
                 (self.weighting != "sample-size", "weighting must be 'sample-size' (a sum "
                  "weights every record alike)"),
                 (self.fraction_fit < 1, "fraction_fit must be 1"),
                 (self.survival is not None, "a survival study's sums are not secure sums "
                  "yet; remove secure_aggregation"),
                 (self.attribution is not None and not self.attribution.private,
                  "an attribution over secure sums must be private (attribution.private = "
                  "true): each site adds its share of the noise")]
        problems = [why for bad, why in wrong if bad]
        if problems:
            raise ValueError("secure_aggregation: " + "; ".join(problems))

    def weighting_rule(self, site_multipliers: dict[str, float] | None = None) -> WeightingRule:
        return WeightingRule(kind=self.weighting, q=self.qffl_q, step=self.afl_step,
                             site_multipliers=site_multipliers or {})

    def stopping_rule(self) -> StoppingRule | None:
        """When training stops before ``rounds`` (None: every round runs)."""
        if self.stop_patience is None or self.dp_epsilon is not None \
                or self.aggregation == "async":
            return None
        return StoppingRule(patience=self.stop_patience, tolerance=self.stop_tolerance)

    @property
    def reports_global_loss(self) -> bool:
        """Whether a site reports the global model's loss on its rows with its update: the
        weighting needs it (q-FFL, agnostic) or the stopping rule does. A private site
        computes it and declares none (:meth:`SitePrivacy.declare`)."""
        return self.weighting_rule().needs_loss or self.stopping_rule() is not None

    def staleness_rule(self) -> StalenessRule:
        return StalenessRule(kind=self.staleness, exponent=self.staleness_exponent,
                             hinge=self.staleness_hinge, max_staleness=self.max_staleness)

    @property
    def windowed(self) -> bool:
        """Whether asynchronous versions aggregate a window (see ``async_window``)."""
        return self.robust_rule is not None if self.async_window is None else self.async_window

    def min_buffer(self) -> int:
        """The fewest distinct sites an asynchronous version is built from: 2f + 1 under
        a robust rule tolerating f malicious sites (a median of fewer is theirs), else 1."""
        return 2 * self.robust_byzantine + 1 if self.robust_rule is not None else 1

    def check_buffer_size(self, n_sites: int) -> None:
        """Each site contributes at most one update per model version, so a buffer larger
        than the federation would never fill; under a robust rule a buffer holds at least
        :meth:`min_buffer` sites."""
        if self.aggregation != "async":
            return
        if self.buffer_size > n_sites:
            raise ConfigurationError(f"The 'buffer_size' parameter must be at most the number "
                                     f"of sites ({n_sites}); got {self.buffer_size}.")
        if self.buffer_size < self.min_buffer():
            raise ConfigurationError(
                f"The 'buffer_size' parameter must be at least 2 x robust_byzantine + 1 = "
                f"{self.min_buffer()} under robust_rule {self.robust_rule!r} (a version built "
                f"from fewer sites is the malicious ones'); got {self.buffer_size}.")

    @classmethod
    def create(cls, **settings: object) -> SimulationConfig:
        """Validate `settings`, raising :class:`ConfigurationError` that names each bad one."""
        try:
            return cls.model_validate(settings)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: object) -> SimulationConfig:
        path = Path(path)
        raw = read_toml(path, "Config file", ConfigurationError)
        return cls.create(**{**raw, **overrides})

    def vectorised_refusal(self) -> str | None:
        """Why this plan's rounds need the per-site loop, or None."""
        from cardiofed.training.batched import batchable

        if self.dp_epsilon is not None:
            return ("DP-SGD clips and noises each site's per-sample gradients through its own "
                    "ledger; it runs site by site")
        if self.algorithm == "scaffold":
            return "SCAFFOLD's control variates correct each site's steps; it runs site by site"
        return batchable(self.local_config())

    def intercept_step_for(self, private: bool) -> bool:
        """Whether training ends with the intercept step, where sites release privately on
        their own (`private`) or not: ``dp_intercept_step``, by default on exactly where
        they do (never over secure sums, nor in an analysis study)."""
        if self.dp_intercept_step is not None:
            return self.dp_intercept_step
        return private and not self.secure_aggregation and self.analysis is None

    @property
    def intercept_step(self) -> bool:
        """Whether a simulation ends training with the intercept step (by default under
        per-site DP)."""
        return self.intercept_step_for(self.dp_epsilon is not None)

    @property
    def personalised(self) -> bool:
        """Sites hold out a calibration split for a personal update of the global model."""
        return self.recalibrate or self.finetune

    def catalogue(self) -> Catalogue:
        """The features and outcomes the study may use."""
        return catalogue_of(self.study_features)

    @property
    def analysis(self) -> AttributionPlan | SurvivalPlan | None:
        """The study's analysis when it is not a model trained in rounds: an attribution
        or a survival plan (their rounds only exchange sums)."""
        return self.attribution if self.attribution is not None else self.survival

    def model_form(self, encoded_names: list[str]) -> ModelForm | None:
        """The plan's model form over a study's encoded columns (None: raw)."""
        return model_form(self.feature_transform, encoded_names, self.catalogue())

    def local_config(self) -> LocalTrainingConfig:
        return LocalTrainingConfig(lr=self.lr, batch_size=self.batch_size,
                                   local_epochs=self.local_epochs, local_steps=self.local_steps,
                                   optimizer=self.optimizer, momentum=self.momentum,
                                   weight_decay=self.weight_decay)

    def robust_aggregation(self) -> RobustAggregation | None:
        if self.robust_rule is None:
            return None
        return RobustAggregation(rule=self.robust_rule, norm_bound=self.robust_norm_bound,
                                 max_weight_share=self.robust_max_weight_share,
                                 trim_fraction=self.robust_trim_fraction,
                                 byzantine=self.robust_byzantine)

    def make_algorithm(self) -> FederatedAlgorithm:
        return make_algorithm(self.algorithm, self.local_config(), server_lr=self.server_lr,
                              proximal_mu=self.proximal_mu, robust=self.robust_aggregation())


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "config"
        if not err["loc"]:
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name!r}")
        elif err["type"] == "value_error":  # a check of a nested setting, e.g. attribution
            parts.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].replace("Input should be", "must be")
            parts.append(f"the {name!r} parameter {msg}; got {err['input']!r}")
    return "Invalid simulation config: " + "; ".join(parts) + "."
