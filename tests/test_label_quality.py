"""Cross-site evaluation flags a site whose labels disagree with the federation's."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cardiofed.aggregation.site_weights import combine, quality_weights, type_balanced_weights
from cardiofed.data.dataset import SiteData
from cardiofed.data.synthetic import default_profiles, generate_exports, synthetic_federation
from cardiofed.evaluation.label_quality import (
    cross_site_auc_matrix,
    detect_label_disagreement,
    hanley_mcneil_se,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.simulation.prepare import prepare_local_only

NAMES = ["a", "b", "c", "d", "e", "f"]


def _constructed() -> np.ndarray:
    """Five agreeing sites (AUC ~0.75 on each other's data); site d's column is ~0.55."""
    auc = np.array([
        [np.nan, 0.76, 0.74, 0.55, 0.75, 0.77],
        [0.75, np.nan, 0.73, 0.56, 0.76, 0.74],
        [0.74, 0.75, np.nan, 0.54, 0.77, 0.75],
        [0.70, 0.71, 0.69, np.nan, 0.70, 0.72],
        [0.76, 0.74, 0.75, 0.55, np.nan, 0.73],
        [0.75, 0.76, 0.74, 0.56, 0.75, np.nan],
    ])
    return auc


def test_constructed_matrix_flags_exactly_the_disagreeing_site() -> None:
    lq = detect_label_disagreement(_constructed(), NAMES)

    # Column means (others' models on each site's data):
    # a: (.75+.74+.70+.76+.75)/5 = .740   b: (.76+.75+.71+.74+.76)/5 = .744
    # c: (.74+.73+.69+.75+.74)/5 = .730   d: (.55+.56+.54+.55+.56)/5 = .552
    # e: (.75+.76+.77+.70+.75)/5 = .746   f: (.77+.74+.75+.72+.73)/5 = .742
    np.testing.assert_allclose(lq.scores, [0.740, 0.744, 0.730, 0.552, 0.746, 0.742])
    # Sorted: .552 .730 .740 .742 .744 .746 -> median .741;
    # |dev| = .001 .003 .011 .189 .005 .001 -> sorted .001 .001 .003 .005 .011 .189
    # -> MAD .004 -> 1.4826 * .004 = .0059 < floor .02 -> scale .02;
    # z_d = (.552 - .741)/.02 = -9.45
    assert lq.median == pytest.approx(0.741)
    assert lq.scale == pytest.approx(0.02)
    assert lq.z[3] == pytest.approx(-9.45)
    assert lq.flags == [False, False, False, True, False, False]
    assert lq.flagged == ["d"]
    assert set(lq.reasons) == {"d"}
    assert lq.reasons["d"] == ("labels disagree with the federation: others' models reach "
                               "AUC 0.55 on its data vs median 0.74 (robust z -9.4)")
    # Row means (d's model on the others' data, .704) are reported, not used to flag.
    assert lq.transfer[3] == pytest.approx(0.704)


def test_flag_lowers_the_site_weight() -> None:
    lq = detect_label_disagreement(_constructed(), NAMES)
    w = combine(type_balanced_weights(["x"] * 6, [100] * 6),
                quality_weights(lq.flags, downweight=0.5))
    # (1, 1, 1, .5, 1, 1)/5.5
    np.testing.assert_allclose(w, np.array([1, 1, 1, 0.5, 1, 1]) / 5.5)


def test_class_counts_add_sampling_error_to_the_scale() -> None:
    auc = _constructed()
    # d has only 5 positives: its AUC is very uncertain, so it is no longer flagged.
    small = [(100, 300)] * 3 + [(5, 30)] + [(100, 300)] * 2
    lq = detect_label_disagreement(auc, NAMES, class_counts=small)
    se_d = hanley_mcneil_se(0.741, 5, 30)
    assert lq.z[3] == pytest.approx((0.552 - 0.741) / math.sqrt(0.02**2 + se_d**2))
    assert se_d > 0.08 and not lq.flags[3]
    # With many positives it stays flagged.
    big = [(100, 300)] * 6
    assert detect_label_disagreement(auc, NAMES, class_counts=big).flagged == ["d"]


def test_hanley_mcneil_by_hand() -> None:
    # A = 0.5: Q1 = .5/1.5 = 1/3, Q2 = 2 * .25 / 1.5 = 1/3; A^2 = .25;
    # var = (.25 + 9 * (1/12) + 9 * (1/12)) / 100 = (.25 + 1.5)/100 = .0175
    assert hanley_mcneil_se(0.5, 10, 10) == pytest.approx(math.sqrt(0.0175))
    assert hanley_mcneil_se(0.7, 0, 10) == math.inf


def test_sites_without_scores_are_not_flagged() -> None:
    auc = _constructed()
    auc[:, 5] = np.nan  # site f's data holds one class: nobody could score it
    lq = detect_label_disagreement(auc, NAMES)
    assert math.isnan(lq.scores[5]) and math.isnan(lq.z[5])
    assert lq.flagged == ["d"]


@pytest.mark.parametrize(
    ("auc", "names", "kwargs", "error", "match"),
    [
        (np.full((3, 4), 0.7), NAMES[:3], {}, ValueError, "square"),
        (np.full((3, 3), 0.7), NAMES[:2], {}, ValueError, "site_names must name each"),
        (np.full((2, 2), 0.7), NAMES[:2], {}, ValueError, "at least 3"),
        (np.full((3, 3), 0.7), ["a", "a", "b"], {}, ValueError, "distinct"),
        (np.full((3, 3), 1.7), NAMES[:3], {}, ValueError, r"\[0, 1\]"),
        (np.full((3, 3), 0.7), NAMES[:3], {"z_threshold": 1.0}, ConfigurationError,
         "'z_threshold' parameter must be a finite number < 0; got 1.0"),
        (np.full((3, 3), 0.7), NAMES[:3], {"min_scale": 0.0}, ConfigurationError,
         "'min_scale'"),
        (np.full((3, 3), 0.7), NAMES[:3], {"class_counts": [(1, 1)]}, ValueError,
         "class_counts"),
    ],
)
def test_detect_validation(auc: np.ndarray, names: list[str], kwargs: dict[str, object],
                           error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        detect_label_disagreement(auc, names, **kwargs)  # type: ignore[arg-type]


def test_cross_site_auc_matrix_by_hand() -> None:
    x0, y0 = np.array([[0.1], [0.2], [0.3], [0.4]]), np.array([0, 0, 1, 1])
    x1, y1 = np.array([[0.1], [0.2], [0.3]]), np.array([1, 0, 0])
    x2, y2 = np.array([[0.5], [0.6]]), np.array([1, 1])
    models: list[Callable[[np.ndarray], np.ndarray]] = [
        lambda x: x[:, 0],          # risk increases with x
        lambda x: 1.0 - x[:, 0],    # risk decreases with x
    ]
    auc = cross_site_auc_matrix(models, [(x0, y0), (x1, y1), (x2, y2)])

    # Model 0 on set 1: the positive (0.1) ranks below both negatives -> AUC 0.
    # Model 1 on set 0: reversed perfect ranking -> AUC 0. Set 2 has one class -> NaN.
    # Diagonal skipped -> NaN.
    np.testing.assert_array_equal(auc, [[np.nan, 0.0, np.nan], [0.0, np.nan, np.nan]])
    full = cross_site_auc_matrix(models, [(x0, y0), (x1, y1)], skip_diagonal=False)
    np.testing.assert_array_equal(full, [[1.0, 0.0], [0.0, 1.0]])


def test_cross_site_auc_matrix_validation() -> None:
    with pytest.raises(ValueError, match="one finite risk per row"):
        cross_site_auc_matrix([lambda x: np.zeros(1)], [(np.zeros((3, 1)), np.array([0, 1, 1]))],
                              skip_diagonal=False)
    with pytest.raises(ValueError, match="at least one model"):
        cross_site_auc_matrix([], [])


def test_synthetic_federation_flags_only_the_noisy_label_site() -> None:
    """Local logistic models of the 12 demo sites, scored on every other site's rows.

    All of site j's rows (train and test) are used: the other sites' models never saw
    them, while the test split alone leaves community clinics with 6 to 11 events.
    """
    fed = synthetic_federation(seed=0)
    exports = generate_exports(default_profiles(12), seed=0)
    noisy = {e.mapping.site for e in exports if e.noisy_labels}
    assert len(noisy) == 1

    def local_model(site: SiteData) -> Callable[[np.ndarray], np.ndarray]:
        prepared = prepare_local_only(site, fed.feature_ranges)
        model = LogisticRegression(max_iter=1000).fit(prepared.x_train, prepared.y_train)
        return lambda x: model.predict_proba(prepared.preprocessor.transform(x))[:, 1]

    predictors = [local_model(site) for site in fed.sites]
    data = [(np.vstack([s.x_train, s.x_test]), np.concatenate([s.y_train, s.y_test]))
            for s in fed.sites]
    counts = [(int(y.sum()), int(len(y) - y.sum())) for _, y in data]

    auc = cross_site_auc_matrix(predictors, data)
    lq = detect_label_disagreement(auc, [s.name for s in fed.sites], class_counts=counts)

    assert lq.flagged == sorted(noisy) == ["tier2_04"]
    assert "AUC 0.56 on its data vs median 0.71" in lq.reasons["tier2_04"]
    others = np.delete(lq.z, lq.site_names.index("tier2_04"))
    assert lq.z[lq.site_names.index("tier2_04")] < -3.5
    assert others.min() > -1.5  # a clear margin, not a threshold artefact
