"""Hierarchical federation: a regional study relayed into a national one.

Sites -> region -> nation. A province runs its own coordinator; its sites enrol there,
in a *relay* study whose plan is the national plan. The region's node (a node config
with a ``[region]`` table, :mod:`cardiofed.node.relay`) is one site of the national
study: for each national task it hands the national model (and preprocessor) to its
regional study, which opens a round of the same number for its sites, and once that
round closes it sends the round's aggregate upward. What crosses the boundary is the
regional aggregate only: summed statistics, one aggregated update with the region's
summed sample count, one evaluation summary.

With ``robust_rule = "mean"`` (and no weight cap or norm bound) at both levels, a
region's update is the sample-weighted mean of its sites' updates, weighted upward by
their summed sample count: the national model is FedAvg over every site, exactly as a
flat federation of the same updates (tested). The default weighted median at either
level is robust aggregation over that level's members, a different estimator.

Pure functions here; :mod:`cardiofed.coordinator.rounds` and
:mod:`cardiofed.coordinator.regional` store and serve them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from cardiofed.data.preprocessing import SiteStatistics, add_statistics, rebin
from cardiofed.models.kinds import Weights
from cardiofed.wire import encode_arrays

# Plan fields the regional study may set for itself: how its coordinator aggregates its
# own sites. Every other field (model, local training, seed, rounds, features) must be
# the national plan's, since the region's sites train for the national study.
REGIONAL_FIELDS = ("robust_rule", "robust_norm_bound", "robust_max_weight_share",
                   "robust_trim_fraction", "robust_byzantine", "aggregation", "buffer_size",
                   "buffer_timeout_s", "staleness", "staleness_exponent", "staleness_hinge",
                   "max_staleness", "async_window")


def plan_differences(national: dict[str, Any], regional: dict[str, Any]) -> list[str]:
    """The plan fields, besides :data:`REGIONAL_FIELDS`, in which two plans differ."""
    keys = (set(national) | set(regional)) - set(REGIONAL_FIELDS)
    return sorted(k for k in keys if national.get(k) != regional.get(k))


def statistics_result(stats: list[SiteStatistics]) -> bytes:
    """The region's statistics: its sites' sums (re-binned to the coarsest bin count
    when exact and private releases mix, which makes the sum a private-style release)."""
    bins = min(s.histogram.shape[1] for s in stats)
    total: SiteStatistics | None = None
    for s in stats:
        if s.histogram.shape[1] != bins:
            s = SiteStatistics(count=s.count, total=s.total, total_sq=s.total_sq,
                               n_missing=s.n_missing, histogram=rebin(s.histogram, bins))
        total = s if total is None else add_statistics(total, s)
    assert total is not None  # a round closes with at least one report
    return encode_arrays(total.to_arrays())


def update_result(delta: Weights, sizes: list[int], losses: list[float],
                  global_loss: float = math.nan) -> bytes:
    """The region's update: its sites' aggregate delta (the regional plan's rule, sample
    size weights) with their summed sample count, mean training loss and the round's
    loss of the global model at its sites (:func:`~cardiofed.algorithms.stopping.round_loss`)."""
    finite = [(x, n) for x, n in zip(losses, sizes, strict=True) if math.isfinite(x)]
    manifest = {"num_samples": str(sum(sizes)), "sites": str(len(sizes))}
    if finite:
        manifest["train_loss"] = repr(sum(x * n for x, n in finite) / max(1, sum(
            n for _, n in finite)))
    if math.isfinite(global_loss):
        manifest["global_loss"] = repr(global_loss)
    return encode_arrays({k: np.asarray(v, np.float32) for k, v in delta.items()}, manifest)


def intercept_result(sums: list[tuple[float, float, float, int]]) -> bytes:
    """The region's intercept sums: its sites' (D, I, noise SD, records) summed, the noise
    SDs in quadrature, so that the study above takes the region as one site."""
    score, information = sum(d for d, _, _, _ in sums), sum(i for _, i, _, _ in sums)
    noise = math.sqrt(sum(s * s for _, _, s, _ in sums))
    return encode_arrays({"sums": np.array([score, information]),
                          "noise_std": np.array([noise])},
                         {"num_samples": str(sum(n for _, _, _, n in sums)),
                          "sites": str(len(sums))})


# A site's weight in a region's summary is its reported n, capped at this many times the
# median n of the sites that published: a self-declared n cannot make one site the summary.
SUMMARY_WEIGHT_CAP = 3.0


def metrics_result(metrics: dict[str, dict[str, Any]]) -> bytes:
    """The region's evaluation summary: the weighted mean of each metric over the sites
    that published one (within-site discrimination and calibration, not the pooled
    metric), each weighted by its reported ``n`` capped at :data:`SUMMARY_WEIGHT_CAP`
    times the median; their total ``n`` and count; the largest epsilon a site reports
    spending. Intervals are not combined. Each site's own figures stay on the regional
    coordinator."""
    published = {site: m for site, m in metrics.items() if m}
    if not published:
        return b"{}"
    reported = {site: float(m.get("n") or 0.0) for site, m in published.items()}
    cap = SUMMARY_WEIGHT_CAP * float(np.median(list(reported.values())))
    size = {site: min(n, cap) for site, n in reported.items()}
    out: dict[str, float] = {"n": sum(reported.values()), "sites": float(len(published))}
    keys = sorted({k for m in published.values() for k, v in m.items() if v is not None
                   and "_ci_" not in k and not k.startswith("epsilon_") and k != "n"})
    for key in keys:
        values = [(float(m[key]), size[s]) for s, m in published.items()
                  if m.get(key) is not None]
        weight = sum(w for _, w in values)
        out[key] = (sum(v * w for v, w in values) / weight if weight > 0
                    else sum(v for v, _ in values) / len(values))
    for key in ("epsilon_spent", "epsilon_delta"):
        spent = [float(m[key]) for m in published.values() if m.get(key) is not None]
        if spent:
            out[key] = max(spent)
    return json.dumps(out, sort_keys=True).encode()
