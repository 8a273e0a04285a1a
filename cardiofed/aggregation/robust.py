"""Robust aggregation: one site cannot buy or break the global model.

Pure functions on the round's model deltas. :class:`RobustAggregation` applies, in order:

1. **a cap on any one site's share of the aggregation weight** (``max_weight_share``):
   shares above the cap are cut to it and the rest re-spread by water-filling, so a
   declared ``num_samples`` of 2**62 buys at most the cap;
2. **norm bounding** (``norm_bound``): an update whose L2 norm exceeds ``norm_bound`` x
   the round's median norm is scaled down to that bound (a x1e6 update becomes one
   ordinary-sized update);
3. **a rule**: ``mean`` (weighted mean), ``trimmed-mean`` and ``median``
   (coordinate-wise, Yin et al. 2018), ``weighted-median`` (coordinate-wise, each site
   weighted by its sample count up to the median site's, no share above
   ``1 / (2f + 1)``: a 70-patient clinic does not get the vote of a 1,000-patient
   hospital, and no hospital more than the median site's), ``multi-krum`` (Blanchard
   et al. 2017: keep the ``n - f`` updates closest to their neighbours), or
   ``centered-clip`` (Karimireddy et al. 2021: iteratively clipped steps around a
   robust centre).

Every step reports, per site, what it did (:class:`SiteAggregation`), so the status and
reports can show which updates were clipped or rejected. Under differential privacy all
of this is post-processing of the sites' releases: it costs no privacy and changes no
site's guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import Weights

RobustRule = Literal["mean", "trimmed-mean", "median", "weighted-median", "multi-krum",
                     "centered-clip"]
ROBUST_RULES: tuple[str, ...] = ("mean", "trimmed-mean", "median", "weighted-median",
                                 "multi-krum", "centered-clip")


@dataclass(frozen=True)
class SiteAggregation:
    """What robust aggregation did with one site's update."""

    site: str
    norm: float            # L2 norm of the update as received
    clipped: bool          # scaled down to the round's norm bound
    rejected: bool         # left out by the rule (multi-krum)
    weight_share: float    # share of the aggregation weight after the cap (0 if rejected)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class RobustAggregation:
    """Settings of robust aggregation; :meth:`aggregate` is the pure server step."""

    rule: RobustRule = "mean"
    norm_bound: float | None = 3.0
    max_weight_share: float | None = 0.5
    trim_fraction: float = 0.2
    byzantine: int = 1
    centered_clip_iterations: int = 3

    def __post_init__(self) -> None:
        if self.rule not in ROBUST_RULES:
            raise ConfigurationError(f"The 'robust_rule' parameter must be one of "
                                     f"{list(ROBUST_RULES)}; got {self.rule!r}.")
        if self.norm_bound is not None and not (
                math.isfinite(self.norm_bound) and self.norm_bound >= 1):
            raise ConfigurationError(f"The 'robust_norm_bound' parameter must be finite and "
                                     f">= 1 (times the median norm); got {self.norm_bound!r}.")
        if self.max_weight_share is not None and not 0 < self.max_weight_share <= 1:
            raise ConfigurationError(f"The 'robust_max_weight_share' parameter must be in "
                                     f"(0, 1]; got {self.max_weight_share!r}.")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigurationError(f"The 'robust_trim_fraction' parameter must be in "
                                     f"[0, 0.5); got {self.trim_fraction!r}.")
        if self.byzantine < 0:
            raise ConfigurationError(f"The 'robust_byzantine' parameter must be >= 0; "
                                     f"got {self.byzantine!r}.")
        if self.centered_clip_iterations < 1:
            raise ConfigurationError(f"The 'centered_clip_iterations' parameter must be >= 1; "
                                     f"got {self.centered_clip_iterations!r}.")

    def aggregate(self, deltas: Sequence[Weights], weights: Sequence[float],
                  sites: Sequence[str]) -> tuple[Weights, list[SiteAggregation]]:
        """The round's aggregate delta and what happened to each site's update."""
        if not deltas or not len(deltas) == len(weights) == len(sites):
            raise ValueError(f"aggregate needs one weight and one site per update; got "
                             f"{len(deltas)} updates, {len(weights)} weights, "
                             f"{len(sites)} sites.")
        names = sorted(deltas[0])
        shapes = {k: np.shape(deltas[0][k]) for k in names}
        for d in deltas:
            if sorted(d) != names or any(np.shape(d[k]) != shapes[k] for k in names):
                raise ValueError(f"Update tensors {sorted(d)} do not match {names}.")
        x = np.stack([np.concatenate([np.asarray(d[k], np.float64).ravel() for k in names])
                      for d in deltas])
        if not np.isfinite(x).all():
            raise ValueError("Updates must be finite.")
        shares = cap_shares(weights, self.max_weight_share)
        norms = np.linalg.norm(x, axis=1)
        scale = np.ones(len(x))
        if self.norm_bound is not None:
            scale = clip_scales(norms, self.norm_bound)
        x = x * scale[:, None]
        kept = np.ones(len(x), dtype=bool)
        if self.rule == "mean":
            out = shares @ x
        elif self.rule == "trimmed-mean":
            out = trimmed_mean(x, self.trim_fraction)
        elif self.rule == "median":
            out = np.median(x, axis=0)
        elif self.rule == "weighted-median":
            sizes = np.asarray(weights, dtype=np.float64)
            shares = cap_shares(np.minimum(sizes, np.median(sizes)).tolist(),
                                min(self.max_weight_share or 1.0, 1.0 / (2 * self.byzantine + 1)))
            out = weighted_median(x, shares)
        elif self.rule == "multi-krum":
            kept = krum_selection(x, self.byzantine)
            shares = np.where(kept, shares, 0.0)
            shares = shares / shares.sum() if shares.sum() > 0 else kept / kept.sum()
            out = shares @ x
        else:
            out = centered_clip(x, shares, self.centered_clip_iterations)
        if self.rule in ("trimmed-mean", "median"):
            shares = np.full(len(x), 1.0 / len(x))  # coordinate-wise rules ignore weights
        report = [SiteAggregation(site=s, norm=float(n), clipped=bool(c < 1.0),
                                  rejected=not bool(k), weight_share=float(w))
                  for s, n, c, k, w in zip(sites, norms, scale, kept, shares, strict=True)]
        result: Weights = {}
        offset = 0
        for k in names:
            size = int(np.prod(shapes[k]))
            result[k] = out[offset:offset + size].reshape(shapes[k]).astype(np.float32)
            offset += size
        return result, report


def update_norm(delta: Weights) -> float:
    """An update's L2 norm, as :meth:`RobustAggregation.aggregate` measures it."""
    return float(np.linalg.norm(np.concatenate(
        [np.asarray(delta[k], np.float64).ravel() for k in sorted(delta)])))


def streamed_mean(robust: RobustAggregation | None, sites: Sequence[str],
                  weights: Sequence[float], norms: Sequence[float],
                  batches: Iterable[Sequence[Weights]]) -> tuple[Weights, list[SiteAggregation]]:
    """The (robust) weighted mean of updates read a batch at a time, keeping one running
    sum: :meth:`RobustAggregation.aggregate` with rule ``mean`` (``robust`` None: the
    plain weighted mean, no report), given each update's weight and
    :func:`update_norm` up front, in the order `batches` yields the updates."""
    if robust is not None and robust.rule != "mean":
        raise ValueError(f"Only the mean streams; rule {robust.rule!r} needs every update.")
    shares = cap_shares(weights, None if robust is None else robust.max_weight_share)
    norm = np.asarray(norms, dtype=np.float64)
    scale = np.ones(len(norm))
    if robust is not None and robust.norm_bound is not None:
        scale = clip_scales(norm, robust.norm_bound)
    total: dict[str, np.ndarray] = {}
    seen = 0
    for batch in batches:
        for delta in batch:
            if not all(np.isfinite(v).all() for v in delta.values()):
                raise ValueError("Updates must be finite.")
            factor = shares[seen] * scale[seen]
            for k, v in delta.items():
                part = factor * np.asarray(v, np.float64)
                total[k] = part if k not in total else total[k] + part
            seen += 1
    if seen != len(shares) or not len(shares) == len(sites) == len(norm):
        raise ValueError(f"streamed_mean got {seen} updates for {len(shares)} weights, "
                         f"{len(norm)} norms and {len(sites)} sites.")
    report = [] if robust is None else [
        SiteAggregation(site=s, norm=float(n), clipped=bool(c < 1.0), rejected=False,
                        weight_share=float(w))
        for s, n, c, w in zip(sites, norm, scale, shares, strict=True)]
    return {k: v.astype(np.float32) for k, v in total.items()}, report


def cap_shares(weights: Sequence[float], cap: float | None) -> np.ndarray:
    """Normalised weights with no share above `cap` (water-filling: capped shares are set
    to the cap and the rest re-spread in proportion). Equal shares if n x cap < 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"Aggregation weights must be finite and >= 0; got {list(weights)}.")
    if w.sum() <= 0:
        w = np.ones_like(w)
    shares = w / w.sum()
    if cap is None or cap >= 1:
        return shares
    if cap * len(w) <= 1:
        return np.full(len(w), 1.0 / len(w))
    capped = np.zeros(len(w), dtype=bool)
    while True:
        free = ~capped
        budget = 1.0 - cap * capped.sum()
        shares = np.where(capped, cap, w * budget / max(w[free].sum(), 1e-300))
        over = free & (shares > cap)
        if not over.any():
            return shares
        capped |= over


def clip_scales(norms: np.ndarray, norm_bound: float) -> np.ndarray:
    """Per-update factors that bring every norm within `norm_bound` x the median norm
    (an all-zero round stays as it is; updates above a zero median become zero)."""
    bound = norm_bound * float(np.median(norms))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > bound, np.where(norms > 0, bound / norms, 1.0), 1.0)


def trimmed_mean(x: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``k = floor(trim_fraction n)`` largest and
    smallest values (at least one value is kept)."""
    n = len(x)
    k = min(int(math.floor(trim_fraction * n)), (n - 1) // 2)
    ordered = np.sort(x, axis=0)
    return np.asarray(ordered[k:n - k].mean(axis=0))


def weighted_median(x: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Coordinate-wise weighted median of the rows of `x` (`shares` sum to 1): the
    smallest value whose cumulative share reaches one half, midway to the next value
    where it is exactly one half."""
    order = np.argsort(x, axis=0, kind="stable")
    values = np.take_along_axis(x, order, axis=0)
    cum = np.cumsum(shares[order], axis=0)
    half = 0.5 - 1e-12
    k = np.argmax(cum >= half, axis=0)
    cols = np.arange(x.shape[1])
    out = values[k, cols]
    tie = np.abs(cum[k, cols] - 0.5) <= 1e-12
    nxt = np.minimum(k + 1, len(x) - 1)
    return np.asarray(np.where(tie, (out + values[nxt, cols]) / 2, out))


def krum_selection(x: np.ndarray, byzantine: int) -> np.ndarray:
    """Multi-Krum: each update's score is the sum of squared distances to its
    ``n - f - 2`` nearest others; the ``n - f`` lowest scores are kept. Krum needs
    ``n > 2 f + 2`` updates to guarantee anything; with fewer, all are kept (the weight cap
    and norm bound still apply)."""
    n = len(x)
    f = byzantine
    if f == 0 or n <= 2 * f + 2:
        return np.ones(n, dtype=bool)
    keep = n - f
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    neighbours = n - f - 2
    scores = np.array([np.sort(np.delete(dist[i], i))[:neighbours].sum() for i in range(n)])
    kept = np.zeros(n, dtype=bool)
    kept[np.argsort(scores, kind="stable")[:keep]] = True
    return kept


def centered_clip(x: np.ndarray, shares: np.ndarray, iterations: int) -> np.ndarray:
    """Centred clipping from the coordinate-wise median, with radius the median distance
    of the updates to it: ``v <- v + sum_i w_i clip(x_i - v, tau)``."""
    v = np.median(x, axis=0)
    tau = float(np.median(np.linalg.norm(x - v, axis=1)))
    if tau == 0:
        return np.asarray(v)
    for _ in range(iterations):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        factor = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + shares @ (diff * factor[:, None])
    return np.asarray(v)
