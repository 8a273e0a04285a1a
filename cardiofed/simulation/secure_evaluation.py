"""The evaluation of a secure study: one secure sum of every site's exact score
histograms, the distributed noise added once.

Each site bins its final model's risks on its test split on the public, fixed edges of
:func:`~cardiofed.evaluation.private_metrics.score_bin_edges` and counts its negatives
and positives per bin (one patient is one count: sensitivity 1). The coordinator unmasks
the federation's noisy histograms and computes the pooled test's metrics from them, with
intervals that carry the noise (:func:`~cardiofed.evaluation.private_metrics.
metrics_with_uncertainty`): one study's worth of noise on the sum instead of one per
site. No site's own metrics leave it; each site sees its own exactly, at home. Every
site is charged at the study's noise multiplier, the largest any site's evaluation share
needs. With ``secure_group_size`` each group of sites has its own sum, each carrying the
whole noise, merged through the statistics gate (:func:`gated_evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cardiofed.aggregation.robust_statistics import StatisticsGate, robust_site_statistics
from cardiofed.data.preprocessing import SiteStatistics
from cardiofed.evaluation.private_metrics import (
    as_probabilities,
    metrics_with_uncertainty,
    score_bin_edges,
    score_histograms,
)
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.quantise import RingCodec
from cardiofed.simulation.secure_statistics import (
    budgeted,
    charged_sum,
    count_codec_and_noise,
    formable_sums,
)

__all__ = ["CARD_NOTE", "EVALUATION_LENGTH", "POOLED_SECURE", "evaluation_codec_and_noise",
           "evaluation_vector", "gated_evaluation", "secure_evaluation"]

if TYPE_CHECKING:  # the coordinator imports this module for its sums, without PyTorch
    from cardiofed.privacy.site_privacy import SitePrivacy

POOLED_SECURE = "all sites (secure sum)"
"""The key of a secure study's one set of metrics: its sites' pooled test sets."""
EVALUATION_LENGTH = 2 * (len(score_bin_edges()) - 1)  # negatives' and positives' bins
CARD_NOTE = ("Metrics are computed from secure sums of the sites' score histograms "
             "(distributed DP noise): the pooled test of all sites, with 95% intervals; no "
             "site's own metrics left it.")


def evaluation_codec_and_noise(n_sites: int, noise_multiplier: float,
                               dropout: float) -> tuple[RingCodec, DistributedNoise]:
    """The ring and the noise of the secure sum of `n_sites` sites' score histograms."""
    return count_codec_and_noise(n_sites, 1.0, noise_multiplier, dropout)


def evaluation_vector(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """A site's part of the evaluation sum: its exact negatives' and positives' counts per
    score bin (zeros for an empty test split). A risk that is not a probability counts as
    0.5, as in every private evaluation, so the vector is computed whatever the scores
    are."""
    if len(y_true) == 0:
        return np.zeros(EVALUATION_LENGTH)
    neg, pos = score_histograms(y_true, as_probabilities(y_prob), score_bin_edges())
    return np.concatenate([neg, pos])


def gated_evaluation(totals: Sequence[np.ndarray], noise_sds: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray, float, StatisticsGate | None]:
    """The pooled test's noisy (negatives, positives) histograms from the unmasked sums
    (each with its noise's SD, counts), and the SD of their noise: one sum's as they are;
    a grouped round's through the statistics gate, each group's negatives and positives
    one release of two columns on the logit scale of the score bins (equally spaced on
    [-5, 5], the two outer bins as wide), so a group far from the others in its count or
    in where its risks lie loses weight (:mod:`cardiofed.aggregation.robust_statistics`);
    the gate's report, or None."""
    if len(totals) == 1:
        neg, pos = np.split(np.asarray(totals[0], dtype=np.float64), 2)
        return neg, pos, float(noise_sds[0]), None
    n_bins = len(totals[0]) // 2
    width = 10.0 / (n_bins - 2)
    edges = np.tile(np.linspace(-5.0 - width, 5.0 + width, n_bins + 1), (2, 1))
    zeros = np.zeros(2)
    releases = [SiteStatistics(count=h.sum(axis=1), total=zeros, total_sq=zeros,
                               n_missing=zeros, histogram=h)
                for h in (np.asarray(t, dtype=np.float64).reshape(2, n_bins) for t in totals)]
    gated, gate = robust_site_statistics(releases, edges)
    neg, pos = np.sum([g.histogram for g in gated], axis=0)
    noise = math.sqrt(sum((float(f.max()) * sd) ** 2
                          for f, sd in zip(gate.factors, noise_sds, strict=True)))
    return neg, pos, noise, gate


def secure_evaluation(outcomes: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      privacy: Mapping[str, SitePrivacy], dropout: float,
                      rng: np.random.Generator, *,
                      groups: Sequence[Sequence[str]] | None = None,
                      attack: Callable[[str, np.ndarray], np.ndarray] | None = None
                      ) -> dict[str, float] | None:
    """The pooled metrics of one secure sum over the sites' ``(name, labels, risks)`` on
    their test splits (see the module docstring), or of one sum per group of `groups`
    through :func:`gated_evaluation` (a group with fewer sites with budget than its
    noise is split over is left out); None when no sum (or fewer than 3 groups) can be
    formed (nothing is released then). `rng` draws the bootstrap of the intervals only;
    `attack(site, vector)`, for benchmarks and tests, replaces what a site sends."""
    by_name = {name: (y, p) for name, y, p in outcomes}
    needed, multiplier, _ = budgeted(list(by_name), privacy, "evaluate", dropout)
    sums = formable_sums(list(by_name), groups, needed, dropout)
    if len(sums) < (1 if groups is None else 3):
        return None  # nothing charged, nothing released
    totals, noise_sds = [], []
    for group, members in sums:
        codec, noise = evaluation_codec_and_noise(len(group), multiplier, dropout)
        totals.append(charged_sum("evaluate", members, privacy, multiplier, codec, noise,
                                  lambda name: evaluation_vector(*by_name[name]), attack))
        noise_sds.append(noise.sum_sd(len(members), codec.scale))
    neg, pos, noise_std, _ = gated_evaluation(totals, noise_sds)
    return metrics_with_uncertainty(neg, pos, score_bin_edges(len(neg)),
                                    noise_std=noise_std, rng=rng)
