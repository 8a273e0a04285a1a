"""A data-quality signal: cross-site evaluation finds a site whose labels disagree.

Each site trains a local model; every local model is scored (AUC, only the metric
crosses sites) on every other site's data, giving ``auc[i, j]`` = AUC of site i's model
on site j's data. If site j's labels are wrong (miscoded outcome, wrong follow-up
window, a data-entry error flipping a share of labels), *every other site's* model ranks
j's patients badly: column j of the matrix is low, whatever the case mix. The score of
site j is therefore the mean over ``i != j`` of ``auc[i, j]``.

Why not also the other direction (site j's model on the others' data, row j)? On the
demo federation (:func:`cardiofed.data.synthetic.synthetic_federation`) it dilutes the
signal: a model fitted to randomly flipped labels still ranks other sites' patients
fairly well (the flips shrink its coefficients rather than reverse them: AUC 0.67 on the
others' data, against 0.66-0.72 for clean sites), while a small community clinic with a
dozen events trains a weak model whatever its label quality. Row means are reported
(``transfer``) but not used to flag. On that federation (seed 0), the simpler
statistic (mean of row and column, test splits, MAD scale only) also flagged a clean
community clinic (z -3.1); the column statistic below on all rows, with sampling error,
flags only the noisy-label site (z -3.8; next lowest -0.8), and did so for seeds 0-7.

Sites are compared with a robust z-score, ``(score - median) / scale``, with
``scale = max(1.4826 * MAD, min_scale)`` the between-site spread. AUCs of small sites are
noisy (a community clinic's test split has 6 to 11 events), so when ``class_counts`` is
given each site's sampling error is added, as in a funnel plot with overdispersion
(Spiegelhalter, "Funnel plots for comparing institutional performance", Stat Med 2005):
``z = (score - median) / sqrt(scale ** 2 + se ** 2)``, with ``se`` the Hanley-McNeil
standard error (Radiology 1982) of an AUC equal to the median on that site's numbers of
positives and negatives. Evaluate on *all* of site j's rows (train and test): the other
sites' models never saw them, and more rows mean a smaller ``se``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cardiofed.evaluation.metrics import auc_score
from cardiofed.exceptions import ConfigurationError

__all__ = [
    "LabelQuality",
    "cross_site_auc_matrix",
    "detect_label_disagreement",
    "hanley_mcneil_se",
]

MAD_TO_SD = 1.4826  # 1 / Phi^-1(3/4): the MAD of a normal sample estimates 0.6745 sd


@dataclass(frozen=True)
class LabelQuality:
    """Per-site label-agreement scores, in site order, and reasons for each flagged site.

    ``scores[j]``: mean AUC of the other sites' models on site j's data.
    ``transfer[j]``: mean AUC of site j's model on the other sites' data (not used to flag).
    ``z[j]``: robust z-score of ``scores[j]``; NaN when the site could not be scored.
    ``reasons``: site name -> why it was flagged (flagged sites only).
    """

    site_names: list[str]
    scores: np.ndarray
    transfer: np.ndarray
    z: np.ndarray
    flags: list[bool]
    reasons: dict[str, str]
    median: float
    scale: float

    @property
    def flagged(self) -> list[str]:
        return [name for name, f in zip(self.site_names, self.flags, strict=True) if f]


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC from its numbers of positives and negatives.

    Hanley and McNeil, "The meaning and use of the area under a receiver operating
    characteristic (ROC) curve", Radiology 1982;143:29-36, eq. 2 with
    ``Q1 = A / (2 - A)`` and ``Q2 = 2 A^2 / (1 + A)``.
    """
    if n_pos < 1 or n_neg < 1:
        return math.inf
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc**2 / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2)
           + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def cross_site_auc_matrix(models_predict: Sequence[Callable[[np.ndarray], np.ndarray]],
                          test_sets: Sequence[tuple[np.ndarray, np.ndarray]], *,
                          skip_diagonal: bool = True) -> np.ndarray:
    """``auc[i, j]`` = AUC of ``models_predict[i]`` on ``test_sets[j] = (x, y)``.

    Each callable maps site j's features to risks (it applies model i's own
    preprocessing). NaN where site j's labels hold one class, and on the diagonal when
    ``skip_diagonal`` (model i on its own site, which may be in-sample).
    """
    if not models_predict or not test_sets:
        raise ValueError(f"Need at least one model and one data set; got "
                         f"{len(models_predict)} and {len(test_sets)}.")
    auc = np.full((len(models_predict), len(test_sets)), np.nan)
    for j, (x, y) in enumerate(test_sets):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"test_sets[{j}] must be (x, y) with one label per row; "
                             f"got {len(x)} rows and labels of shape {y.shape}.")
        if np.unique(y).size < 2:
            continue
        for i, predict in enumerate(models_predict):
            if skip_diagonal and i == j:
                continue
            p = np.asarray(predict(x), dtype=np.float64).reshape(-1)
            if p.shape != y.shape or not np.all(np.isfinite(p)):
                raise ValueError(f"Model {i} must return one finite risk per row of "
                                 f"test_sets[{j}]; got shape {p.shape}.")
            auc[i, j] = auc_score(y, p)
    return auc


def detect_label_disagreement(auc_matrix: np.ndarray, site_names: Sequence[str], *,
                              z_threshold: float = -2.5,
                              class_counts: Sequence[tuple[int, int]] | None = None,
                              min_scale: float = 0.02) -> LabelQuality:
    """Flag the sites whose labels the other sites' models cannot predict.

    Args:
        auc_matrix: (n, n), ``auc[i, j]`` = AUC of site i's model on site j's data;
            the diagonal is ignored and NaN marks a pair that could not be scored.
        site_names: n names, in matrix order.
        z_threshold: flag sites with a robust z-score below this (< 0).
        class_counts: optional (positives, negatives) of each site's evaluation data;
            adds each site's sampling error to the scale (see the module docstring).
        min_scale: floor on the between-site scale, so that near-identical sites do not
            turn tiny differences into large z-scores.
    """
    auc = np.asarray(auc_matrix, dtype=np.float64)
    names = list(site_names)
    n = len(names)
    if auc.ndim != 2 or auc.shape[0] != auc.shape[1]:
        raise ValueError(f"auc_matrix must be square (n, n); got shape {auc.shape}.")
    if auc.shape[0] != n:
        raise ValueError(f"site_names must name each of the {auc.shape[0]} sites of "
                         f"auc_matrix; got {n} names.")
    if n < 3:
        raise ValueError(f"Comparing sites needs at least 3; got {n}.")
    if len(set(names)) != n:
        raise ValueError(f"site_names must be distinct; got {names}.")
    finite = auc[np.isfinite(auc)]
    if np.any((finite < 0) | (finite > 1)):
        raise ValueError("auc_matrix entries must be in [0, 1] (or NaN).")
    if not (math.isfinite(z_threshold) and z_threshold < 0):
        raise ConfigurationError(f"The 'z_threshold' parameter must be a finite number < 0; "
                                 f"got {z_threshold!r}.")
    if not (math.isfinite(min_scale) and min_scale > 0):
        raise ConfigurationError(f"The 'min_scale' parameter must be a finite number > 0; "
                                 f"got {min_scale!r}.")
    counts: list[tuple[int, int]] | None = None
    if class_counts is not None:
        counts = [(int(a), int(b)) for a, b in class_counts]
        if len(counts) != n or any(a < 0 or b < 0 for a, b in counts):
            raise ValueError(f"class_counts must be one (positives, negatives) pair >= 0 per "
                             f"site; got {class_counts!r}.")

    off = auc.copy()
    np.fill_diagonal(off, np.nan)
    observed = np.isfinite(off)

    def means(a: np.ndarray, axis: int) -> np.ndarray:
        k = observed.sum(axis=axis)
        return np.where(k > 0, np.nansum(a, axis=axis) / np.maximum(k, 1), np.nan)

    scores = means(off, 0)      # column j: the others' models on site j's data
    transfer = means(off, 1)    # row j: site j's model on the others' data
    valid = np.isfinite(scores)
    z = np.full(n, np.nan)
    median, scale = math.nan, math.nan
    if valid.sum() >= 3:
        median = float(np.median(scores[valid]))
        scale = max(MAD_TO_SD * float(np.median(np.abs(scores[valid] - median))), min_scale)
        se = np.zeros(n)
        if counts is not None:
            se = np.array([hanley_mcneil_se(median, a, b) for a, b in counts])
        z[valid] = (scores[valid] - median) / np.sqrt(scale**2 + se[valid] ** 2)
    flags = [bool(v < z_threshold) for v in z]  # NaN compares False: never flagged
    reasons = {
        names[j]: (f"labels disagree with the federation: others' models reach AUC "
                   f"{scores[j]:.2f} on its data vs median {median:.2f} (robust z {z[j]:.1f})")
        for j in range(n) if flags[j]
    }
    return LabelQuality(site_names=names, scores=scores, transfer=transfer, z=z, flags=flags,
                        reasons=reasons, median=median, scale=scale)
