"""Effective data equivalent of a federation.

Fit the learning curve of a single hospital (test AUC against training-set size, by
training on stratified subsamples of the pooled training rows with the federation's own
training recipe) and read off how many patients one hospital would need to match the
federated model. Divided by the largest site's training size, that is the *effective
data multiple*: "federating was worth as much as making the biggest hospital k times
larger".

The curve is an inverse power law, AUC(n) = a - b * n**(-c), with asymptote ``a``. When
the federated AUC is at or above ``a`` no single hospital reaches it under this curve,
and the result says so instead of returning a meaningless size. Sizes beyond the largest
subsample are extrapolations and are flagged as such.

Simulation only: the learning curve trains on pooled rows, which a real federation never
holds in one place.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt
from scipy.optimize import OptimizeWarning, curve_fit
from sklearn.metrics import roc_auc_score

from cardiofed.exceptions import ConfigurationError

if TYPE_CHECKING:  # the simulation pulls in torch; importing this module should not
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import ExperimentResult
    from cardiofed.simulation.prepare import PreparedSite

__all__ = [
    "LearningCurveFit",
    "LearningCurvePoint",
    "effective_data_equivalent",
    "effective_data_from_experiment",
    "fit_learning_curve",
    "learning_curve",
    "learning_curve_detail",
    "stratified_subsample",
]

FloatArray = npt.NDArray[np.float64]

A_BOUNDS = (0.5, 1.0)
C_BOUNDS = (1e-6, 2.0)  # c in (0, 2]
DEFAULT_MIN_SIZE = 50
DEFAULT_N_SIZES = 8

MIN_STEPS = 1500


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- the curve


def stratified_subsample(y: npt.ArrayLike, size: int, rng: np.random.Generator
                         ) -> npt.NDArray[np.intp]:
    """Indices of `size` rows drawn without replacement, keeping the outcome prevalence.

    The number of events is ``round(size * prevalence)``, kept within what the data holds
    and, when both classes exist and ``size >= 2``, at least one of each.
    """
    labels = np.asarray(y)
    size = _check_int("size", size, 1)
    if size > labels.size:
        raise ConfigurationError(f"size must be at most the {labels.size} rows available; "
                                 f"got {size}")
    pos = np.flatnonzero(labels == 1)
    neg = np.flatnonzero(labels != 1)
    n_pos = round(size * pos.size / labels.size)
    if size >= 2 and pos.size and neg.size:
        n_pos = min(max(n_pos, 1), size - 1)
    n_pos = min(max(n_pos, size - neg.size), pos.size)
    chosen = np.concatenate([rng.choice(pos, size=n_pos, replace=False),
                             rng.choice(neg, size=size - n_pos, replace=False)])
    return np.sort(chosen)


@dataclass(frozen=True)
class LearningCurvePoint:
    """Test AUCs of single-hospital models trained on `size` patients, one per repeat."""

    size: int
    aucs: tuple[float, ...]

    @property
    def mean_auc(self) -> float:
        return float(np.mean(self.aucs))

    @property
    def std_auc(self) -> float:
        return float(np.std(self.aucs, ddof=1)) if len(self.aucs) > 1 else 0.0


def learning_curve_detail(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                          y_test: np.ndarray, *, config: SimulationConfig, sizes: Sequence[int],
                          repeats: int, seed: int) -> list[LearningCurvePoint]:
    """Like :func:`learning_curve`, keeping every repeat's AUC."""
    from cardiofed.models.networks import score
    from cardiofed.simulation.runner import train_centralised

    repeats = _check_int("repeats", repeats, 1)
    seed = _check_int("seed", seed, 0)
    y_tr = np.asarray(y_train)
    y_te = np.asarray(y_test)
    if len(x_train) != y_tr.size or len(x_test) != y_te.size:
        raise ConfigurationError(
            f"x and y must have the same number of rows; got {len(x_train)} and {y_tr.size} "
            f"(train), {len(x_test)} and {y_te.size} (test)")
    if not 0 < int(np.sum(y_te == 1)) < y_te.size:
        raise ConfigurationError("y_test must contain both outcome classes for an AUC; got "
                                 f"{int(np.sum(y_te == 1))} events in {y_te.size} rows")
    checked = [_check_int("sizes", s, 2) for s in sizes]
    if not checked:
        raise ConfigurationError("sizes must hold at least one size; got none")
    too_big = [s for s in checked if s > y_tr.size]
    if too_big:
        raise ConfigurationError(f"sizes must be at most the {y_tr.size} pooled training rows; "
                                 f"got {too_big}")
    rng = np.random.default_rng(seed)
    points: list[LearningCurvePoint] = []
    for size in checked:
        aucs = []
        for _ in range(repeats):
            idx = stratified_subsample(y_tr, size, rng)
            # A small hospital trains to convergence, not for fewer steps: at least
            # MIN_STEPS optimiser steps, so the curve measures data, not effort.
            steps_per_epoch = -(-size // config.batch_size)
            epochs = max(config.rounds * config.local_epochs, -(-MIN_STEPS // steps_per_epoch))
            weights = train_centralised(x_train[idx], y_train[idx], config, epochs=epochs,
                                        seed=int(rng.integers(2**31)))
            aucs.append(float(roc_auc_score(y_te, score(config.model, weights, x_test))))
        points.append(LearningCurvePoint(size=size, aucs=tuple(aucs)))
    return points


def learning_curve(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, *, config: SimulationConfig, sizes: Sequence[int],
                   repeats: int, seed: int) -> list[tuple[int, float]]:
    """Mean test AUC of a single hospital trained on each of `sizes` patients.

    For each size, `repeats` stratified subsamples (without replacement) of the pooled,
    preprocessed training rows are each trained with
    :func:`~cardiofed.simulation.runner.train_centralised` (the federation's recipe, for
    ``rounds x local_epochs`` epochs but at least ``MIN_STEPS`` steps) and scored on the
    whole test set. Deterministic
    given `seed`. Returns ``[(size, mean AUC), ...]`` in the order of `sizes`.
    """
    return [(p.size, p.mean_auc) for p in learning_curve_detail(
        x_train, y_train, x_test, y_test, config=config, sizes=sizes, repeats=repeats,
        seed=seed)]


# --------------------------------------------------------------------------- the fit


def _power_law(n: FloatArray, a: float, b: float, c: float) -> FloatArray:
    return a - b * np.power(n, -c)


@dataclass(frozen=True)
class LearningCurveFit:
    """AUC(n) = a - b * n**(-c), fitted to (size, AUC) points; ``a`` is the asymptote."""

    a: float
    b: float
    c: float
    n_min: int  # smallest and largest size the curve was fitted on
    n_max: int
    rmse: float

    @property
    def asymptote_at_bound(self) -> bool:
        """True when a sits on its upper bound: the points have not levelled off, so the
        asymptote (and anything near it) is not identified by the data."""
        return self.a >= A_BOUNDS[1] - 1e-9

    @property
    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}

    @overload
    def predict(self, n: float) -> float: ...
    @overload
    def predict(self, n: npt.ArrayLike) -> float | FloatArray: ...

    def predict(self, n: npt.ArrayLike) -> float | FloatArray:
        """The curve's AUC at training size(s) `n` (> 0)."""
        arr = np.asarray(n, dtype=np.float64)
        out = _power_law(arr, self.a, self.b, self.c)
        return float(out) if out.ndim == 0 else out

    def size_for(self, auc: float) -> float:
        """Training size at which the curve reaches `auc`; inf when ``auc >= a``.

        When the curve is flat (b == 0) any size below the asymptote is enough: 0.
        """
        if not math.isfinite(auc):
            raise ConfigurationError(f"auc must be finite; got {auc!r}")
        gap = self.a - auc
        if gap <= 0.0:
            return math.inf
        if self.b == 0.0:
            return 0.0
        with np.errstate(over="ignore"):
            return float(np.power(self.b / gap, 1.0 / self.c))

    def to_dict(self) -> dict[str, Any]:
        return {**self.params, "asymptote_at_bound": self.asymptote_at_bound,
                "n_min": self.n_min, "n_max": self.n_max,
                "rmse": self.rmse}


def fit_learning_curve(points: Sequence[tuple[int, float]]) -> LearningCurveFit:
    """Least-squares fit of the inverse power law to (size, AUC) points.

    Bounds: a in [0.5, 1], b >= 0, c in (0, 2]. Several starting values of c are tried
    and the best fit is kept. Needs at least three distinct sizes.
    """
    pts = [(float(n), float(v)) for n, v in points]
    if any(not (math.isfinite(n) and n > 0) for n, _ in pts):
        raise ConfigurationError(f"sizes must be positive and finite; got {[n for n, _ in pts]}")
    if any(not math.isfinite(v) for _, v in pts):
        raise ConfigurationError(f"AUCs must be finite; got {[v for _, v in pts]}")
    if len({n for n, _ in pts}) < 3:
        raise ConfigurationError("points must hold at least 3 distinct sizes to fit 3 "
                                 f"parameters; got {len({n for n, _ in pts})}")
    n = np.array([q[0] for q in pts])
    v = np.array([q[1] for q in pts])
    lower = [A_BOUNDS[0], 0.0, C_BOUNDS[0]]
    upper = [A_BOUNDS[1], np.inf, C_BOUNDS[1]]
    a0 = float(np.clip(v.max() + 0.01, A_BOUNDS[0] + 1e-3, A_BOUNDS[1] - 1e-3))
    best: tuple[float, FloatArray] | None = None
    for c0 in (0.1, 0.5, 1.0, 1.5):
        b0 = max(float(np.max((a0 - v) * n**c0)), 1e-3)
        try:
            with warnings.catch_warnings():  # the covariance is not used
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(_power_law, n, v, p0=[a0, b0, c0], bounds=(lower, upper),
                                      method="trf", ftol=1e-15, xtol=1e-15, gtol=1e-15,
                                      max_nfev=20_000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((_power_law(n, *params) - v) ** 2))
        if best is None or sse < best[0]:
            best = (sse, np.asarray(params, dtype=np.float64))
    if best is None:
        raise RuntimeError(f"the learning curve fit did not converge on {pts}")
    sse, (a, b, c) = best
    return LearningCurveFit(a=float(a), b=float(b), c=float(c), n_min=int(n.min()),
                            n_max=int(n.max()), rmse=math.sqrt(sse / n.size))


# --------------------------------------------------------------------------- the answer


def effective_data_equivalent(fit: LearningCurveFit, federated_auc: float,
                              largest_site_size: int) -> dict[str, Any]:
    """How many patients one hospital would need to match `federated_auc`.

    Returns a dict with ``n_equivalent`` (inf when unreachable), ``multiple``
    (n_equivalent / largest_site_size; inf when unreachable), ``reachable`` (False when
    the federated AUC is at or above the curve's asymptote), ``extrapolated`` (the size
    lies outside the sizes the curve was fitted on), ``asymptote_at_bound`` (see
    :attr:`LearningCurveFit.asymptote_at_bound`), the inputs, the asymptote and a
    one-line ``explanation``.
    """
    if not (isinstance(federated_auc, int | float | np.floating) and math.isfinite(federated_auc)
            and 0.0 <= federated_auc <= 1.0):
        raise ConfigurationError(f"federated_auc must be a finite AUC in [0, 1]; "
                                 f"got {federated_auc!r}")
    largest = _check_int("largest_site_size", largest_site_size, 1)
    auc = float(federated_auc)
    n_eq = fit.size_for(auc)
    reachable = math.isfinite(n_eq)
    multiple = n_eq / largest if reachable else math.inf
    extrapolated = reachable and not fit.n_min <= n_eq <= fit.n_max
    if not reachable:
        explanation = (f"Federated AUC {auc:.3f} is at or above the single-hospital curve's "
                       f"asymptote {fit.a:.3f}: not reachable by a single hospital under "
                       f"this curve.")
    else:
        explanation = (f"A single hospital would need about {n_eq:,.0f} patients to match "
                       f"the federated AUC {auc:.3f}: {multiple:.2f}x the largest site's "
                       f"{largest:,}.")
        if n_eq > fit.n_max:
            explanation += (f" Extrapolated beyond the largest subsample ({fit.n_max:,}); "
                            f"treat as indicative.")
        elif n_eq < fit.n_min:
            explanation += f" Below the smallest subsample ({fit.n_min:,}); extrapolated."
    if fit.asymptote_at_bound:
        explanation += (f" The fitted asymptote sits at its bound {A_BOUNDS[1]:g}: the curve "
                        f"has not levelled off over the sizes tried.")
    return {"federated_auc": auc, "asymptote": fit.a, "n_equivalent": n_eq,
            "largest_site_size": largest, "multiple": multiple, "reachable": reachable,
            "extrapolated": extrapolated, "asymptote_at_bound": fit.asymptote_at_bound,
            "explanation": explanation}


def default_sizes(total: int, *, smallest: int = DEFAULT_MIN_SIZE,
                  count: int = DEFAULT_N_SIZES) -> list[int]:
    """A geometric grid of distinct training sizes from ~`smallest` to `total`."""
    total = _check_int("total", total, 2)
    low = min(smallest, total)
    grid = np.unique(np.round(np.geomspace(low, total, num=count)).astype(int))
    return [int(s) for s in grid if s >= 2]


def effective_data_from_experiment(result: ExperimentResult, sites: list[PreparedSite], *,
                                   repeats: int = 3, seed: int = 0,
                                   sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """The effective data equivalent of an experiment's federated model.

    `sites` are the experiment's prepared sites (:func:`prepare_federation` with the
    experiment's standardisation). The learning curve trains on their pooled training rows
    with ``result.config`` and scores on their pooled test rows; the target is the
    federated pooled-test AUC, the reference the largest site's training size. `sizes`
    default to a geometric grid from ~50 to the pooled training size.

    Returns :func:`effective_data_equivalent`'s dict plus ``fit`` (the parameters),
    ``learning_curve`` ([(size, mean AUC)]) and ``learning_curve_repeats`` (each
    repeat's AUC per size).
    """
    from cardiofed.simulation.experiment import FEDERATED, POOLED_TEST

    if not sites:
        raise ConfigurationError("sites must hold at least one prepared site; got none")
    names = {s.name for s in sites}
    if result.site_sizes and names != set(result.site_sizes):
        raise ConfigurationError(f"sites {sorted(names)} are not the experiment's sites "
                                 f"{sorted(result.site_sizes)}")
    try:
        federated_auc = result.metrics[POOLED_TEST][FEDERATED]["auc"]
    except KeyError:
        raise ConfigurationError("result has no federated pooled-test AUC "
                                 f"(metrics[{POOLED_TEST!r}][{FEDERATED!r}]['auc'])") from None
    x_train = np.concatenate([s.x_train for s in sites])
    y_train = np.concatenate([s.y_train for s in sites])
    x_test = np.concatenate([s.x_test for s in sites])
    y_test = np.concatenate([s.y_test for s in sites])
    grid = list(sizes) if sizes is not None else default_sizes(y_train.size)
    detail = learning_curve_detail(x_train, y_train, x_test, y_test, config=result.config,
                                   sizes=grid, repeats=repeats, seed=seed)
    curve = [(p.size, p.mean_auc) for p in detail]
    fit = fit_learning_curve(curve)
    largest = max(s.n_train for s in sites)
    return {**effective_data_equivalent(fit, federated_auc, largest),
            "fit": fit.to_dict(), "learning_curve": curve,
            "learning_curve_repeats": {p.size: list(p.aucs) for p in detail}}
