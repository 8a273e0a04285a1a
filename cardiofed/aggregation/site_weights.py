"""Per-site aggregation weights that correct FedAvg's bias toward large hospitals.

Plain FedAvg weights each site by its number of training rows
(:func:`~cardiofed.aggregation.weighted_mean.sample_size_weights`), so two tier-3
hospitals can outweigh a dozen community clinics. The pure functions here each return
one non-negative weight per site, in site order; :func:`combine` multiplies rules
together and renormalises, e.g.::

    w = combine(type_balanced_weights(types, n), quality_weights(flags, downweight=0.2))

* :func:`type_balanced_weights`: a fixed share of influence per site type.
* :func:`qffl_weights`: q-FFL, more weight on sites where the global model does badly
  (Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning",
  ICLR 2020).
* :func:`agnostic_weights`: the mixture update of agnostic federated learning (Mohri,
  Sivek, Suresh, "Agnostic Federated Learning", ICML 2019), using
  :func:`project_to_simplex` (Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient
  Projections onto the l1-Ball for Learning in High Dimensions", ICML 2008).
* :func:`quality_weights`: lower the weight of sites flagged by a data-quality check
  (e.g. :func:`cardiofed.evaluation.label_quality.detect_label_disagreement`).

Invalid settings raise :class:`~cardiofed.exceptions.ConfigurationError`; invalid data
(lengths, negative counts, non-finite losses) raise :class:`ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cardiofed.exceptions import ConfigurationError

__all__ = [
    "agnostic_weights",
    "combine",
    "project_to_simplex",
    "qffl_weights",
    "quality_weights",
    "type_balanced_weights",
]

_SIMPLEX_TOL = 1e-6


def _counts(num_samples: Sequence[int]) -> np.ndarray:
    values = list(num_samples)
    if not values:
        raise ValueError("num_samples must hold one count per site; got an empty sequence.")
    for n in values:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"num_samples must be integers >= 0; got {values}.")
    return np.asarray(values, dtype=np.float64)


def _finite(name: str, values: Sequence[float] | np.ndarray, *,
            non_negative: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {arr.tolist()}.")
    if non_negative and np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0; got {arr.tolist()}.")
    return arr


def _same_length(**named: Sequence[object] | np.ndarray) -> None:
    lengths = {name: len(v) for name, v in named.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"Expected one value per site in each input; got lengths {shown}.")


def _normalised(weights: np.ndarray, what: str) -> list[float]:
    total = float(weights.sum())
    if not total > 0:
        raise ValueError(f"{what}: every site's weight is 0, so they cannot be normalised.")
    return (weights / total).tolist()


def type_balanced_weights(site_types: Sequence[str], num_samples: Sequence[int],
                          shares: Mapping[str, float] | None = None) -> list[float]:
    """Give each site type a set share of the total influence, split by sample size.

    Site k of type t gets ``share_t * n_k / N_t``, where ``N_t`` is the total sample
    count of type t. ``shares`` are relative (renormalised over the types present, so
    an entry for a type absent this round is ignored); by default every type present
    gets an equal share. A type whose sites hold no samples counts as absent. The
    weights sum to 1.
    """
    counts = _counts(num_samples)
    types = list(site_types)
    _same_length(site_types=types, num_samples=counts)
    for t in types:
        if not isinstance(t, str) or not t:
            raise ValueError(f"site_types must be non-empty strings; got {t!r}.")
    present = list(dict.fromkeys(types))
    if shares is None:
        share = dict.fromkeys(present, 1.0)
    else:
        missing = [t for t in present if t not in shares]
        if missing:
            raise ConfigurationError(f"The 'shares' parameter must give a share for every site "
                                     f"type present {present}; got none for {missing}.")
        share = {t: float(shares[t]) for t in present}
        bad = {t: v for t, v in share.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ConfigurationError(f"The 'shares' parameter must be finite and >= 0; "
                                     f"got {bad}.")
    per_type = {t: float(sum(n for n, s in zip(counts, types, strict=True) if s == t))
                for t in present}
    weights = np.array([share[t] * n / per_type[t] if per_type[t] > 0 else 0.0
                        for t, n in zip(types, counts, strict=True)])
    return _normalised(weights, "type_balanced_weights")


def qffl_weights(losses: Sequence[float], num_samples: Sequence[int], q: float) -> list[float]:
    """q-FFL reweighting: ``w_k ∝ n_k * L_k ** q``, normalised to sum 1.

    Li et al. (ICLR 2020) minimise ``f_q(w) = sum_k p_k F_k(w) ** (q + 1) / (q + 1)``
    with ``p_k = n_k / n``; its gradient ``sum_k p_k F_k ** q * grad F_k`` averages the
    sites' gradients with these weights, where ``L_k = F_k`` is the current global
    model's loss on site k's data. ``q = 0`` is FedAvg (sample-size weights); larger q
    moves toward minimising the worst site's loss. (q-FedAvg's Lipschitz step-size
    estimate is not part of this; only the direction is.) Computed in log space, so a
    large q does not overflow.
    """
    if isinstance(q, bool) or not isinstance(q, int | float) or not (math.isfinite(q) and q >= 0):
        raise ConfigurationError(f"The 'q' parameter must be a finite number >= 0; got {q!r}.")
    loss = _finite("losses", losses, non_negative=True)
    counts = _counts(num_samples)
    _same_length(losses=loss, num_samples=counts)
    with np.errstate(divide="ignore"):
        log_w = np.log(counts) + (q * np.log(loss) if q > 0 else 0.0)
    if not np.any(np.isfinite(log_w)):
        raise ValueError(f"qffl_weights: every site's weight is 0 (losses {loss.tolist()}, "
                         f"num_samples {counts.astype(int).tolist()}).")
    return _normalised(np.exp(log_w - log_w[np.isfinite(log_w)].max()), "qffl_weights")


def project_to_simplex(v: Sequence[float] | np.ndarray) -> list[float]:
    """Euclidean projection of ``v`` onto the probability simplex.

    ``argmin_w ||w - v||_2`` subject to ``w >= 0, sum(w) = 1``, by the O(n log n)
    sort-based algorithm of Duchi et al. (ICML 2008, Figure 1): with ``u`` sorted in
    decreasing order, ``rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0}`` and
    ``theta = (sum_{i<=rho} u_i - 1) / rho``, the projection is ``max(v - theta, 0)``.
    """
    arr = _finite("v", v)
    u = np.sort(arr)[::-1]
    css = np.cumsum(u) - 1.0
    ranks = np.arange(1, arr.size + 1)
    rho = int(np.flatnonzero(u - css / ranks > 0)[-1]) + 1
    theta = css[rho - 1] / rho
    w = np.maximum(arr - theta, 0.0)
    return (w / w.sum()).tolist()  # the division only removes rounding error


def agnostic_weights(losses: Sequence[float], previous: Sequence[float] | None, *,
                     step: float) -> list[float]:
    """One projected gradient-ascent step on the AFL mixture weights.

    Mohri et al. (ICML 2019) train ``min_w max_lambda sum_k lambda_k L_k(w)`` over the
    simplex; the ascent step on the mixture is ``lambda <- Pi(lambda + step * L)`` with
    ``L`` the current model's per-site losses and ``Pi`` :func:`project_to_simplex`.
    ``previous=None`` starts from the uniform mixture. Iterated, the weights move toward
    the sites with the highest loss (ultimately, the single worst one).
    """
    if (isinstance(step, bool) or not isinstance(step, int | float)
            or not (math.isfinite(step) and step > 0)):
        raise ConfigurationError(f"The 'step' parameter must be a finite number > 0; "
                                 f"got {step!r}.")
    loss = _finite("losses", losses)
    if previous is None:
        lam = np.full(loss.size, 1.0 / loss.size)
    else:
        lam = _finite("previous", previous, non_negative=True)
        _same_length(losses=loss, previous=lam)
        if abs(lam.sum() - 1.0) > _SIMPLEX_TOL:
            raise ValueError(f"previous must be mixture weights summing to 1; "
                             f"got sum {lam.sum()!r}.")
    return project_to_simplex(lam + step * loss)


def combine(*weight_lists: Sequence[float]) -> list[float]:
    """Element-wise product of several weight lists, renormalised to sum 1."""
    if not weight_lists:
        raise ValueError("combine needs at least one weight list; got none.")
    arrays = [_finite(f"weight list {i}", w, non_negative=True)
              for i, w in enumerate(weight_lists)]
    _same_length(**{f"list_{i}": a for i, a in enumerate(arrays)})
    return _normalised(np.prod(arrays, axis=0), "combine")


def quality_weights(flags: Sequence[bool | np.bool_], *, downweight: float = 0.0) -> list[float]:
    """1 for each good site, ``downweight`` (in [0, 1]) for each flagged one.

    Not normalised: pass the result to :func:`combine` with another rule.
    """
    if (isinstance(downweight, bool) or not isinstance(downweight, int | float)
            or not 0.0 <= downweight <= 1.0):
        raise ConfigurationError(f"The 'downweight' parameter must be in [0, 1]; "
                                 f"got {downweight!r}.")
    values = list(flags)
    if not values:
        raise ValueError("flags must hold one flag per site; got an empty sequence.")
    if not all(isinstance(f, bool | np.bool_) for f in values):
        raise ValueError(f"flags must be booleans; got {values}.")
    return [float(downweight) if f else 1.0 for f in values]
