"""Effective data per site: how many of its own patients a hospital would need.

The question a clinic asks of a federation is "how many of *my own* patients would I
need to build this model alone?". For each site, local models are trained as the
local-only baseline is (:func:`~cardiofed.simulation.alone.train_alone` on the site's own
preprocessing) on training sets of growing size and scored on the site's own test
split, giving the site's learning curve; the site's *effective data* is the size at
which that curve reaches the AUC the site gets from the federation (its personalised
model when the study personalises), and the *multiple* is that size over the site's own
training size.

* With a sampler (synthetic cohorts), the training sets are fresh patients of the site's
  own profile, from half its size doubling upwards until the curve passes the target:
  the crossing is bracketed and read off by interpolation on log size, never
  extrapolated.
* Without one (real data), the training sets are stratified subsamples of the site's own
  training rows, up to all of them; the inverse power law AUC(n) = a - b n^-c is fitted
  to the curve and solved for the target, and a size beyond the site's own rows is
  flagged as an extrapolation. When the federated AUC is at or above the fitted
  asymptote the site could not reach it alone under this curve, and the result says so.

Simulation only: the local models need every candidate training set in one place.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt
from scipy.optimize import OptimizeWarning, curve_fit

from cardiofed.evaluation.metrics import auc_score
from cardiofed.exceptions import ConfigurationError

if TYPE_CHECKING:  # the simulation pulls in torch; importing this module should not
    from cardiofed.data.dataset import FederatedDataset, SiteData, SiteSampler
    from cardiofed.simulation.experiment import ExperimentResult

__all__ = [
    "LearningCurveFit",
    "LearningCurvePoint",
    "SiteEffectiveData",
    "fit_learning_curve",
    "site_effective_data",
    "stratified_subsample",
]

FloatArray = npt.NDArray[np.float64]

A_BOUNDS = (0.5, 1.0)
C_BOUNDS = (1e-6, 2.0)  # c in (0, 2]
MIN_SUBSAMPLE = 20
MAX_MULTIPLE = 32  # fresh draws: stop at 32 x the site's own size
MAX_DRAWN = 20_000  # ... or at this many patients (at least the site's own size)


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


# --------------------------------------------------------------------------- per site


@dataclass(frozen=True)
class SiteEffectiveData:
    """One site's learning curve and the size at which it reaches the federated AUC.

    ``n_equivalent`` is inf when the site could not reach the target alone (above the
    curve's asymptote, or beyond the largest fresh draw: then ``lower_bound`` is True and
    the multiple is at least the one shown), nan when not estimable (no AUC at the site).
    """

    site: str
    site_type: str
    own_size: int
    target_auc: float
    method: str  # "fresh draws" or "own subsamples"
    curve: tuple[LearningCurvePoint, ...]
    n_equivalent: float
    extrapolated: bool = False
    lower_bound: bool = False  # not reached by the largest draw: at least the multiple shown
    upper_bound: bool = False  # reached by the smallest draw: at most the multiple shown
    fit: LearningCurveFit | None = None
    explanation: str = ""

    @property
    def status(self) -> str:
        """"estimated", "at least" / "at most" (a bound from the sizes tried), "not
        reachable alone" (above the curve's asymptote) or "not estimable"."""
        if self.lower_bound:
            return "at least"
        if self.upper_bound:
            return "at most"
        if math.isnan(self.n_equivalent):
            return "not estimable"
        return "estimated" if math.isfinite(self.n_equivalent) else "not reachable alone"

    @property
    def multiple(self) -> float:
        if self.lower_bound:
            return self.curve[-1].size / self.own_size
        return self.n_equivalent / self.own_size

    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None
        return {"site": self.site, "site_type": self.site_type, "own_size": self.own_size,
                "target_auc": num(self.target_auc), "method": self.method,
                "status": self.status,
                "n_equivalent": num(self.n_equivalent), "multiple": num(self.multiple),
                "extrapolated": self.extrapolated, "lower_bound": self.lower_bound,
                "upper_bound": self.upper_bound,
                "curve": [[p.size, list(p.aucs)] for p in self.curve],
                "fit": self.fit.to_dict() if self.fit else None,
                "explanation": self.explanation}


@dataclass
class _Curve:
    """One site's learning curve: trains its local models and scores them on its test
    split; ``seed`` and ``index`` (the site's) seed every draw and every training run."""

    site: SiteData
    result: ExperimentResult
    feature_ranges: list[tuple[float, float]]
    feature_names: list[str]
    target: float
    repeats: int
    seed: int
    index: int
    points: list[LearningCurvePoint] = field(default_factory=list)

    def add(self, size: int, draws: Sequence[tuple[np.ndarray, np.ndarray]]) -> LearningCurvePoint:
        from dataclasses import replace

        from cardiofed.models.networks import score
        from cardiofed.simulation.alone import train_alone
        from cardiofed.simulation.prepare import prepare_local_only
        from cardiofed.simulation.runner import derive_seed

        config = self.result.config
        form = config.model_form(self.feature_names)
        aucs = []
        for r, (x, y) in enumerate(draws):
            local = prepare_local_only(replace(self.site, x_train=x, y_train=y),
                                       self.feature_ranges, form)
            weights = train_alone(local.x_train, local.y_train, config,
                                  seed=derive_seed(self.seed, 72_000, self.index, r))
            aucs.append(auc_score(local.y_test, score(config.model, weights, local.x_test)))
        point = LearningCurvePoint(size=size, aucs=tuple(aucs))
        self.points.append(point)
        return point

    def outcome(self, method: str, n_equivalent: float, explanation: str,
                **flags: Any) -> SiteEffectiveData:
        return SiteEffectiveData(site=self.site.name, site_type=self.site.site_type,
                                 own_size=self.site.n_train, target_auc=self.target,
                                 method=method, curve=tuple(self.points),
                                 n_equivalent=n_equivalent, explanation=explanation, **flags)


def _interpolate(below: LearningCurvePoint, above: LearningCurvePoint, target: float) -> float:
    """Size where the mean curve crosses `target`, linear in log size between two points."""
    if above.mean_auc == below.mean_auc:
        return float(above.size)
    t = (target - below.mean_auc) / (above.mean_auc - below.mean_auc)
    return float(np.exp(np.log(below.size) + t * (np.log(above.size) - np.log(below.size))))


def site_effective_data(dataset: FederatedDataset, result: ExperimentResult, *,
                        repeats: int = 3, seed: int = 0,
                        model: str | None = None) -> dict[str, SiteEffectiveData]:
    """Each site's effective data (see the module docstring) for `model` (default: the
    experiment's headline model, personalised when it personalised)."""
    repeats = _check_int("repeats", repeats, 1)
    seed = _check_int("seed", seed, 0)
    label = model or result.headline_model
    out: dict[str, SiteEffectiveData] = {}
    for k, site in enumerate(dataset.sites):
        curve = _Curve(site, result, dataset.feature_ranges, dataset.feature_names,
                       target=result.metrics[site.name][label]["auc"], repeats=repeats,
                       seed=seed, index=k)
        if not math.isfinite(curve.target):
            out[site.name] = curve.outcome("", math.nan, "no AUC at this site's test split")
        elif dataset.sampler is not None:
            out[site.name] = _by_fresh_draws(curve, dataset.sampler)
        else:
            out[site.name] = _by_subsamples(curve)
    return out


def _by_fresh_draws(curve: _Curve, sampler: SiteSampler) -> SiteEffectiveData:
    from cardiofed.simulation.runner import derive_seed

    own, target, method = curve.site.n_train, curve.target, "fresh draws"
    limit = min(MAX_MULTIPLE * own, max(MAX_DRAWN, own))
    size = max(MIN_SUBSAMPLE, own // 2)
    previous: LearningCurvePoint | None = None
    while True:
        point = curve.add(size, [sampler.draw(curve.site.name, size, derive_seed(
            curve.seed, 71_000, curve.index, r, size)) for r in range(curve.repeats)])
        if point.mean_auc >= target:
            if previous is None:
                return curve.outcome(method, float(size), (
                    f"{size:,} of its own patients, the fewest tried, already match the "
                    f"federated AUC {target:.3f}: at most {size / own:.1f}x its {own:,}."),
                    upper_bound=True)
            n_eq = _interpolate(previous, point, target)
            return curve.outcome(method, n_eq, (
                f"about {n_eq:,.0f} of its own patients would match the federated AUC "
                f"{target:.3f}: {n_eq / own:.1f}x its {own:,}."))
        if size >= limit:
            return curve.outcome(method, math.inf, (
                f"even {size:,} of its own patients ({size / own:.0f}x its {own:,}) reach "
                f"only AUC {point.mean_auc:.3f} < the federated {target:.3f}: the effective "
                f"data is more than that."), lower_bound=True)
        previous, size = point, min(2 * size, limit)


def _by_subsamples(curve: _Curve) -> SiteEffectiveData:
    own, target, method = curve.site.n_train, curve.target, "own subsamples"
    y = curve.site.y_train
    rng = np.random.default_rng([curve.seed, 73_000, curve.index])
    low = min(own, max(MIN_SUBSAMPLE, own // 8))
    for size in sorted({int(v) for v in np.round(np.geomspace(low, own, num=5))}):
        idx = [stratified_subsample(y, size, rng) for _ in range(curve.repeats)]
        curve.add(size, [(curve.site.x_train[i], y[i]) for i in idx])
    if len(curve.points) < 3:
        return curve.outcome(method, math.nan, f"{own} training rows are too few for a curve")
    fit = fit_learning_curve([(p.size, p.mean_auc) for p in curve.points])
    n_eq = fit.size_for(target)
    if not math.isfinite(n_eq):
        return curve.outcome(method, n_eq, (
            f"the federated AUC {target:.3f} is at or above the asymptote {fit.a:.3f} of its "
            f"own learning curve: not reachable alone under this curve."), fit=fit)
    extrapolated = n_eq > own
    return curve.outcome(method, n_eq, (
        f"about {n_eq:,.0f} of its own patients would match the federated AUC {target:.3f}: "
        f"{n_eq / own:.1f}x its {own:,}"
        + (" (extrapolated beyond its own rows; indicative)." if extrapolated else ".")),
        fit=fit, extrapolated=extrapolated)
