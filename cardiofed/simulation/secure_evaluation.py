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
needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cardiofed.evaluation.private_metrics import (
    as_probabilities,
    metrics_with_uncertainty,
    score_bin_edges,
    score_histograms,
)
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum
from cardiofed.simulation.secure_statistics import budgeted, count_codec_and_noise

__all__ = ["CARD_NOTE", "EVALUATION_LENGTH", "POOLED_SECURE", "evaluation_codec_and_noise",
           "evaluation_from_sum", "evaluation_vector", "secure_evaluation"]

if TYPE_CHECKING:  # the coordinator imports this module for its sums, without PyTorch
    from cardiofed.privacy.site_privacy import SitePrivacy

POOLED_SECURE = "all sites (secure sum)"
"""The key of a secure study's one set of metrics: its sites' pooled test sets."""
EVALUATION_LENGTH = 2 * (len(score_bin_edges()) - 1)  # negatives' and positives' bins
CARD_NOTE = ("Metrics are computed from one secure sum of the sites' score histograms "
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


def evaluation_from_sum(total: np.ndarray, share_sd: float, n_inputs: int
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """The pooled test's noisy (negatives, positives) histograms from the unmasked sum of
    `n_inputs` sites' vectors, each with a noise share of SD `share_sd` counts, and the
    SD of their noise."""
    neg, pos = np.split(np.asarray(total, dtype=np.float64), 2)
    return neg, pos, share_sd * math.sqrt(n_inputs)


def secure_evaluation(outcomes: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      privacy: Mapping[str, SitePrivacy], dropout: float,
                      rng: np.random.Generator) -> dict[str, float] | None:
    """The pooled metrics of one secure sum over the sites' ``(name, labels, risks)`` on
    their test splits (see the module docstring); None when fewer sites have budget
    than the noise is split over (nothing is released then). `rng` draws the bootstrap
    of the intervals only."""
    needed, multiplier, min_sites = budgeted([name for name, _, _ in outcomes], privacy,
                                             "evaluate", dropout)
    if len(needed) < min_sites:
        return None
    codec, noise = evaluation_codec_and_noise(len(outcomes), multiplier, dropout)
    vectors, rngs = {}, {}
    for name, y, p in outcomes:
        if name in needed:
            privacy[name].charge_secure_sum("evaluate", multiplier)
            vectors[name], rngs[name] = evaluation_vector(y, p), secure_numpy_rng()
    neg, pos, noise_std = evaluation_from_sum(ring_sum(codec, vectors, rngs, noise),
                                              noise.site_sigma / codec.scale, len(vectors))
    return metrics_with_uncertainty(neg, pos, score_bin_edges(len(neg)),
                                    noise_std=noise_std, rng=rng)
