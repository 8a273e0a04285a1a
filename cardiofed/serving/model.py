"""A trained risk model ready to score patients, with its model card.

:class:`RiskModel` holds the global weights, the federation's preprocessor (fill values,
means, standard deviations from federated statistics) and a :class:`ModelCard` with the
provenance. It validates one patient's canonical features (converting stated units as a
site mapping does), scores them, and explains the score:

* logistic regression: exact contributions. With ``z`` the standardised inputs, the
  log-odds are ``b + sum_j w_j z_j``; a feature's contribution is the sum of ``w_j z_j``
  over its model columns (one, or the one-hot columns of a categorical feature), i.e.
  relative to the federation's average patient (``z = 0``). ``baseline + sum of
  contributions`` equals the log-odds exactly.
* MLP: integrated gradients (Sundararajan et al., ICML 2017) from the same baseline
  ``z = 0`` with a 64-step midpoint rule; contributions sum to ``logit(x) - logit(0)``
  up to the discretisation error (reported as ``attribution_error``).
* Cox model (``cox``, a survival model at the card's horizon): the same linear predictor
  with the complementary log-log link, ``risk = 1 - exp(-exp(b + sum_j w_j z_j))``, where
  ``b`` is the log of the baseline cumulative hazard at the horizon; contributions are
  exact on that log cumulative hazard scale.

The standalone file is one safetensors file (weights, preprocessor, and the card as
JSON in its metadata): it scores without the coordinator (:meth:`RiskModel.load`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from cardiofed.data.model_form import model_form
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.data.study_features import StudyFeatures, catalogue_of
from cardiofed.evaluation.recalibration import Recalibration
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.models.kinds import MODEL_KINDS, Weights
from cardiofed.schema import (
    SCHEMA_VERSION,
    Catalogue,
    Feature,
    canonical_features,
)
from cardiofed.serving.patient_input import patient_row
from cardiofed.serving.population import population_of, population_text
from cardiofed.wire import decode_arrays, encode_arrays

if TYPE_CHECKING:  # PyTorch is loaded only for a network (an MLP)
    import torch

IG_STEPS = 64
TERM = "term:"  # prefix of a revised model column in a card's recalibration
# 10-year risk bands of the 2019 ACC/AHA primary-prevention guideline (Arnett et al.,
# Circulation 2019;140:e596-e646); configurable in the API's settings.
RISK_THRESHOLDS = (0.05, 0.075, 0.20)
RISK_CATEGORIES = ("low", "borderline", "intermediate", "high")
CATEGORY_HORIZON_YEARS = 10.0  # the horizon those bands were defined for
IG_BLOCK_ROWS = 4096
# The kinds a card may name: the trained networks, and a Cox model at its horizon.
SERVED_KINDS = (*MODEL_KINDS, "cox")
Link = Literal["logit", "cloglog"]
LINKS: dict[str, Link] = {"logistic": "logit", "mlp": "logit", "cox": "cloglog"}


class ModelCard(BaseModel):
    """Provenance and performance of one registered model version."""

    model_config = ConfigDict(extra="forbid")

    version: str = ""  # set by the registry
    study: str
    source: str  # "simulation" or "network"
    model: str
    algorithm: str
    settings: dict[str, Any]
    rounds: int
    sites: list[str]
    features: list[str]  # canonical features, in input order
    # The model's columns built from the features (cardiofed.data.model_form).
    feature_transform: str = "raw"
    # The study's own features and outcome, where it declared any: the API validates
    # requests against them (cardiofed.data.study_features).
    study_features: StudyFeatures | None = None
    outcome: str
    outcome_description: str
    horizon_years: float | None
    # How the linear predictor becomes a risk: logit, or cloglog (a Cox model's risk by
    # horizon_years, 1 - exp(-exp(eta))).
    link: Link = "logit"
    schema_version: str = SCHEMA_VERSION
    metrics: dict[str, dict[str, float | None]] = {}  # per site
    privacy: dict[str, dict[str, float]] = {}  # per site: epsilon spent, delta
    # per site: intercept, slope and "term:<model column>" corrections of its update
    recalibration: dict[str, dict[str, float]] = {}
    content_sha256: str = ""
    created_at: str = ""
    notes: list[str] = []
    # Who the model learnt from (population_of): "sites", "site_types" (type -> sites,
    # where known), "records" (where exact counts may be published) and "medians" (each
    # continuous feature's pooled median, from the sites' statistics release).
    population: dict[str, Any] = {}


@dataclass(frozen=True)
class Explanation:
    """Scores of a batch: risks, log-odds, and per-feature log-odds contributions."""

    risk: np.ndarray
    logit: np.ndarray
    baseline: float
    contributions: np.ndarray  # (n, n_features), canonical feature order
    attribution_error: np.ndarray | None = None


@dataclass(frozen=True)
class RiskModel:
    """Weights + preprocessor + card: everything needed to score a patient."""

    card: ModelCard
    weights: Weights
    preprocessor: Preprocessor
    _inputs: list[list[int]] = field(init=False, repr=False, compare=False)
    _groups: list[list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.card.model not in SERVED_KINDS:
            raise ConfigurationError(f"Model card names model {self.card.model!r}; expected "
                                     f"one of {list(SERVED_KINDS)}.")
        if self.card.link != LINKS[self.card.model]:
            raise ConfigurationError(f"A {self.card.model} model's link is "
                                     f"{LINKS[self.card.model]!r}; the card says "
                                     f"{self.card.link!r}.")
        if self.card.model == "cox" and self.card.horizon_years is None:
            raise ConfigurationError("A Cox model gives the risk by a horizon: the card needs "
                                     "horizon_years.")
        inputs, start = [], 0
        for name in self.card.features:
            width = len(self.catalogue.feature(name).encoded_names())
            inputs.append(list(range(start, start + width)))
            start += width
        if start != len(self.preprocessor.fill):
            raise ConfigurationError(f"The card's features encode to {start} columns; the "
                                     f"preprocessor has {len(self.preprocessor.fill)}.")
        form = self.preprocessor.form
        if (form.kind if form else "raw") != self.card.feature_transform:
            raise ConfigurationError(f"The card's feature_transform is "
                                     f"{self.card.feature_transform!r}; the preprocessor's "
                                     f"form is {form.kind if form else 'raw'!r}.")
        groups = inputs if form is None else form.feature_groups(self.card.features)
        self._check_weights()
        object.__setattr__(self, "_inputs", inputs)
        object.__setattr__(self, "_groups", groups)

    # ------------------------------------------------------------------ building
    @property
    def n_inputs(self) -> int:
        """Encoded input columns (one per continuous or binary feature, one-hot otherwise)."""
        return len(self.preprocessor.fill)

    @property
    def n_columns(self) -> int:
        """Model columns (the form's terms)."""
        return self.preprocessor.n_columns

    def arrays(self) -> dict[str, np.ndarray]:
        return ({f"weights/{k}": v for k, v in self.weights.items()}
                | {f"preprocessor/{k}": v for k, v in self.preprocessor.to_arrays().items()})

    def content_hash(self) -> str:
        """SHA-256 of the weights and preprocessor (what scores), not of the card."""
        return hashlib.sha256(encode_arrays(self.arrays())).hexdigest()

    @property
    def catalogue(self) -> Catalogue:
        """The features the model takes: built in, and the study's own."""
        return catalogue_of(self.card.study_features)

    @property
    def column_names(self) -> list[str]:
        """Names of the model columns (the form's terms, or the encoded features)."""
        form = self.preprocessor.form
        return (form.names if form is not None
                else self.catalogue.encoded_names(self.card.features))

    @property
    def categorised(self) -> bool:
        """Whether risk categories apply: the outcome's horizon is the one the categories
        were defined for (:data:`CATEGORY_HORIZON_YEARS`). A model of prevalent disease
        (no horizon) or of another horizon gets a risk, never a category."""
        return self.card.horizon_years == CATEGORY_HORIZON_YEARS

    @property
    def risk_of(self) -> str:
        """What the risk is the probability of, in words."""
        horizon = ("no time horizon" if self.card.horizon_years is None
                   else f"{self.card.horizon_years:g}-year horizon")
        return f"{self.card.outcome_description} ({horizon})"

    @property
    def learnt_from(self) -> str:
        """Who the model learnt from, in words (the card's population)."""
        return population_text(self.card.population, self.catalogue)

    def site_recalibration(self, site: str) -> Recalibration | None:
        """The card's update for `site` (intercept, slope, revised terms), or None."""
        fit = self.card.recalibration.get(site)
        if fit is None:
            return None
        index = {name: j for j, name in enumerate(self.column_names)}
        terms = {index[k.removeprefix(TERM)]: v for k, v in fit.items() if k.startswith(TERM)}
        return Recalibration(intercept=fit["intercept"], slope=fit["slope"],
                             coefficients=terms, level="terms" if terms else "slope")

    def with_card(self, **changes: Any) -> RiskModel:
        return RiskModel(card=self.card.model_copy(update=changes), weights=self.weights,
                         preprocessor=self.preprocessor)

    def to_bytes(self) -> bytes:
        """The standalone file: safetensors with the card as JSON metadata."""
        return encode_arrays(self.arrays(), {"format": "cardiofed-risk-model/1",
                                             "card": self.card.model_dump_json()})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<model>") -> RiskModel:
        arrays, meta = decode_arrays(data)
        if meta.get("format") != "cardiofed-risk-model/1" or "card" not in meta:
            raise DataValidationError(f"{source} is not a CardioFed risk model file.")
        card = ModelCard.model_validate_json(meta["card"])
        weights = {k.removeprefix("weights/"): v for k, v in arrays.items()
                   if k.startswith("weights/")}
        catalogue = catalogue_of(card.study_features)
        form = model_form(card.feature_transform, catalogue.encoded_names(card.features),
                          catalogue)
        pre = Preprocessor.from_arrays(arrays, form, prefix="preprocessor/")
        model = cls(card=card, weights=weights, preprocessor=pre)
        if card.content_sha256 and model.content_hash() != card.content_sha256:
            raise DataValidationError(f"{source}: weights do not match the card's content "
                                      f"hash {card.content_sha256[:12]}...")
        return model

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (.safetensors) and the card beside it (.json)."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        card_path = path.with_suffix(".json")
        card_path.write_text(self.card.model_dump_json(indent=2) + "\n")
        return path, card_path

    @classmethod
    def load(cls, path: str | Path) -> RiskModel:
        path = Path(path)
        if not path.is_file():
            raise DataValidationError(f"Model file {path} does not exist.")
        return cls.from_bytes(path.read_bytes(), source=str(path))

    # ------------------------------------------------------------------ input
    def encode_patient(self, features: Mapping[str, Any], units: Mapping[str, str] | None = None,
                       *, impute_missing: bool = False, where: str = ""
                       ) -> tuple[np.ndarray, list[str]]:
        """One patient's canonical features -> model columns (NaN where imputed).

        Every problem is collected and raised together as :class:`PatientErrors`, each
        naming the field and, for numbers, the allowed range in the unit used.
        """
        row, imputed = self.encode_row(features, units, impute_missing=impute_missing,
                                       where=where)
        return np.array(row, dtype=np.float64), imputed

    def encode_row(self, features: Mapping[str, Any], units: Mapping[str, str] | None = None,
                   *, impute_missing: bool = False, where: str = ""
                   ) -> tuple[list[float], list[str]]:
        """:meth:`encode_patient` as a list of floats (what :meth:`explain_row` takes)."""
        return patient_row(self._encoders, self.n_inputs, features, units or {},
                           impute_missing=impute_missing, where=where)

    @cached_property
    def _encoders(self) -> dict[str, tuple[Feature, list[int]]]:
        """Each input feature (in the card's order) with its encoded columns."""
        catalogue = self.catalogue
        return {name: (catalogue.feature(name), cols)
                for name, cols in zip(self.card.features, self._inputs, strict=True)}

    # ------------------------------------------------------------------ scoring
    @property
    def linear(self) -> bool:
        """Whether the model is linear in its columns (logistic or Cox): explaining a
        score then costs no more than computing it."""
        return self._linear is not None

    @cached_property
    def _linear(self) -> tuple[np.ndarray, float] | None:
        if self.card.model not in ("logistic", "cox"):
            return None
        return (self.weights["linear.weight"].astype(np.float64).ravel(),
                float(self.weights["linear.bias"].ravel()[0]))

    def _check_weights(self) -> None:
        """The weights fit the card's model: checked with NumPy for a logistic regression
        (scoring it needs no PyTorch), by loading them into the network otherwise."""
        if self.card.model in ("logistic", "cox"):
            expected = {"linear.weight": (1, self.n_columns), "linear.bias": (1,)}
            got = {k: tuple(np.shape(v)) for k, v in self.weights.items()}
            if got != expected:
                raise ConfigurationError(f"A {self.card.model} model of {self.n_columns} "
                                         f"columns has weights {expected}; got {got}.")
        else:
            _ = self._torch_model

    @cached_property
    def _torch_model(self) -> torch.nn.Module:
        from cardiofed.models.networks import make_model, set_weights

        model = make_model(self.card.model, self.n_columns, seed=0)
        set_weights(model, self.weights)
        model.eval()
        return model

    @cached_property
    def _grouping(self) -> np.ndarray:
        """(columns x features) 0/1 matrix: column contributions -> feature contributions."""
        g = np.zeros((self.n_columns, len(self._groups)))
        for j, cols in enumerate(self._groups):
            g[cols, j] = 1.0
        return g

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Log-odds of encoded rows (NaN = missing, filled by the preprocessor)."""
        z = self.preprocessor.standardise(x)
        if self._linear is not None:
            w, b = self._linear
            return z @ w + b
        import torch

        with torch.no_grad():
            return self._torch_model(torch.from_numpy(z.astype(np.float32))).numpy().astype(
                np.float64)

    def risk(self, x: np.ndarray) -> np.ndarray:
        return self.inverse_link(self.logits(x))

    def inverse_link(self, eta: np.ndarray) -> np.ndarray:
        """Risks from the linear predictor: the logistic function, or a Cox model's
        ``1 - exp(-exp(eta))`` (the card's link)."""
        if self.card.link == "cloglog":
            out: np.ndarray = -np.expm1(-np.exp(np.minimum(eta, 700.0)))
            return out
        return sigmoid(eta)

    def explain(self, x: np.ndarray) -> Explanation:
        """Risks and per-feature contributions (see the module docstring)."""
        z = self.preprocessor.standardise(x)
        if self._linear is not None:
            w, b = self._linear
            per_column = z * w
            logit = per_column.sum(axis=1) + b
            return Explanation(risk=self.inverse_link(logit), logit=logit, baseline=b,
                               contributions=self._by_feature(per_column))
        per_column, logit, baseline = self._integrated_gradients(z)
        error = logit - baseline - per_column.sum(axis=1)
        return Explanation(risk=sigmoid(logit), logit=logit, baseline=baseline,
                           contributions=self._by_feature(per_column), attribution_error=error)

    def explain_row(self, row: Sequence[float]) -> tuple[float, float, float, list[float]]:
        """One encoded row's risk, log-odds, baseline and per-feature contributions, as
        :meth:`explain` gives them, in plain floats. A linear model without a form is
        scored without NumPy (an online request's one patient: NumPy's per-call cost is
        most of the work); other models go through :meth:`explain`."""
        scalar = self._scalar
        if scalar is None:
            e = self.explain(np.asarray(row, dtype=np.float64)[None, :])
            return (float(e.risk[0]), float(e.logit[0]), e.baseline,
                    e.contributions[0].tolist())
        fill, mean, scale, w, b = scalar
        parts = []
        for cols in self._groups:
            part = 0.0
            for j in cols:
                x = row[j]
                part += ((fill[j] if x != x else x) - mean[j]) / scale[j] * w[j]  # NaN: fill
            parts.append(part)
        logit = b + sum(parts)
        return _inverse_link(logit, self.card.link), logit, b, parts

    @cached_property
    def _scalar(self) -> tuple[list[float], list[float], list[float], list[float], float] | None:
        """Fill, means, scales and weights as lists, for :meth:`explain_row`."""
        if self._linear is None or self.preprocessor.form is not None:
            return None
        pre, (w, b) = self.preprocessor, self._linear
        return pre.fill.tolist(), pre.mean.tolist(), pre._scale.tolist(), w.tolist(), b

    def _by_feature(self, per_column: np.ndarray) -> np.ndarray:
        by_feature: np.ndarray = per_column @ self._grouping
        return by_feature

    def _integrated_gradients(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        import torch

        model = self._torch_model
        alphas = (torch.arange(IG_STEPS, dtype=torch.float32) + 0.5) / IG_STEPS
        parts = []
        for start in range(0, len(z), IG_BLOCK_ROWS):  # bounded memory for big files
            zt = torch.from_numpy(z[start:start + IG_BLOCK_ROWS].astype(np.float32))
            path = (alphas[:, None, None] * zt[None]).reshape(-1, z.shape[1])
            path.requires_grad_(True)
            (grads,) = torch.autograd.grad(model(path).sum(), path)  # leaves params alone
            parts.append((zt * grads.reshape(IG_STEPS, *zt.shape).mean(dim=0)).double().numpy())
        with torch.no_grad():
            logit = model(torch.from_numpy(z.astype(np.float32))).double().numpy()
            baseline = float(model(torch.zeros(1, z.shape[1])).item())
        return np.concatenate(parts), logit, baseline


def risk_categories(risk: np.ndarray,
                    thresholds: Sequence[float] | np.ndarray = RISK_THRESHOLDS,
                    categories: Sequence[str] | np.ndarray = RISK_CATEGORIES) -> np.ndarray:
    """The category of each risk: ``categories[i]`` for ``thresholds[i-1] <= risk <
    thresholds[i]``."""
    names = np.asarray(categories, dtype=object)
    out: np.ndarray = names[np.searchsorted(np.asarray(thresholds), risk, side="right")]
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(-np.logaddexp(0.0, -z))
    return out


def _inverse_link(eta: float, link: str) -> float:
    """:meth:`RiskModel.inverse_link` of one float: the logistic function as
    :func:`sigmoid` computes it (NumPy's ``logaddexp``), or the complementary log-log."""
    if link == "cloglog":
        return -math.expm1(-math.exp(min(eta, 700.0)))
    t = -eta  # logaddexp(0, t), as NumPy computes it
    softplus = math.log(2.0) if t == 0 else (t + math.log1p(math.exp(-t)) if t > 0
                                              else math.log1p(math.exp(t)))
    return math.exp(-softplus)


def build_model(*, study: str, source: str, model: str, algorithm: str,
                settings: dict[str, Any], rounds: int, sites: list[str],
                encoded_names: Sequence[str], outcome: str | None, weights: Weights,
                preprocessor: Preprocessor, metrics: dict[str, dict[str, float | None]] | None
                = None, privacy: dict[str, dict[str, float]] | None = None,
                recalibration: dict[str, dict[str, float]] | None = None,
                notes: list[str] | None = None,
                study_features: StudyFeatures | None = None,
                site_types: Mapping[str, str] | None = None,
                records: int | None = None,
                horizon_years: float | None = None) -> RiskModel:
    """A :class:`RiskModel` with its card filled in (content hash, time, outcome, the
    population: `site_types` and `records` where known). A Cox `model` scores the risk by
    `horizon_years` (default: the outcome's)."""
    catalogue = catalogue_of(study_features)
    features = canonical_features(encoded_names)
    if catalogue.encoded_names(features) != list(encoded_names):
        raise ConfigurationError(f"Model columns {list(encoded_names)} are not the encoding of "
                                 f"canonical features {features}.")
    described = catalogue.outcomes.get(outcome or "")
    form = preprocessor.form
    card = ModelCard(study=study, source=source, model=model, algorithm=algorithm,
                     settings=settings, rounds=rounds, sites=sites, features=features,
                     feature_transform=form.kind if form else "raw",
                     outcome=outcome or "unspecified",
                     outcome_description=described.description if described
                     else "not stated when the study was created",
                     horizon_years=horizon_years if horizon_years is not None
                     else described.horizon_years if described else None,
                     link=LINKS.get(model, "logit"),
                     metrics=metrics or {}, privacy=privacy or {},
                     recalibration=recalibration or {}, notes=notes or [],
                     study_features=study_features,
                     population=population_of(preprocessor, encoded_names, catalogue,
                                              sites=sites, site_types=site_types,
                                              records=records),
                     created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    risk_model = RiskModel(card=card, weights=weights, preprocessor=preprocessor)
    return risk_model.with_card(content_sha256=risk_model.content_hash())
