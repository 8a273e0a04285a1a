"""What a secure round's unmasked sums give, through the statistics gate where the round
is grouped (each group's sum one release, :mod:`cardiofed.aggregation.robust_statistics`),
and the report of what the gate cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cardiofed.aggregation.robust_statistics import StatisticsGate, robust_site_statistics
from cardiofed.coordinator.payloads import release_metrics
from cardiofed.coordinator.secure_sums import Unmasked
from cardiofed.data.preprocessing import PRIVATE_BINS, SiteStatistics, bin_edges
from cardiofed.simulation.secure_evaluation import POOLED_SECURE, gated_evaluation
from cardiofed.simulation.secure_statistics import statistics_from_sum
from cardiofed.store import Round, Study


def secure_statistics(study: Study, rnd: Round, totals: Sequence[np.ndarray],
                      edges: np.ndarray) -> list[SiteStatistics]:
    """The statistics of a secure round's unmasked sums: one sum's as they are; each
    group's of a grouped round through the statistics gate (`edges`: its bins) as one
    release, what it cut recorded by group as a training round's rule is."""
    private = bin_edges([(lo, hi) for lo, hi in study.feature_ranges], PRIVATE_BINS)
    stats = [statistics_from_sum(t, private) for t in totals]
    if len(stats) == 1:
        return stats
    gated, gate = robust_site_statistics(stats, edges)
    gate_report(rnd, [f"group {g}" for g in range(len(stats))], gate, study.feature_names)
    return gated


def secure_evaluation(rnd: Round, unmasked: Unmasked) -> dict[str, Any]:
    """The pooled metrics of a secure evaluation's sums, a grouped round's through the
    gate (:func:`~cardiofed.simulation.secure_evaluation.gated_evaluation`), what it cut
    recorded by group."""
    neg, pos, noise, gate = gated_evaluation(unmasked.totals, unmasked.noise_sds)
    if gate is not None:
        gate_report(rnd, [f"group {g}" for g in range(len(unmasked.totals))], gate,
                    ["negatives", "positives"])
    return {POOLED_SECURE: release_metrics(neg, pos, noise)}


def gate_report(rnd: Round, names: Sequence[str], gate: StatisticsGate,
                columns: Sequence[str]) -> None:
    """The round's aggregation report: each release (a site's or a group's) whose
    columns the statistics gate cut, and which."""
    rnd.aggregation = [{"site": name, "clipped": True,
                        "statistics_down_weighted": [columns[j] for j in cols]}
                       for name, cols in zip(names, gate.down_weighted(), strict=True)
                       if cols]
