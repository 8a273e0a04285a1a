"""Federated preprocessing of a simulated federation: statistics, never rows, are merged."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from cardiofed.aggregation.covariate_shift import covariate_weights
from cardiofed.aggregation.robust_statistics import (
    Moments,
    consistent,
    gate_factors,
    robust_site_statistics,
    scaled,
    site_moments,
)
from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.data.model_form import ModelForm
from cardiofed.data.preprocessing import (
    PRIVATE_BINS,
    Preprocessor,
    SiteStatistics,
    add_statistics,
    bin_edges,
    histogram_median,
    local_preprocessor,
    merge_statistics,
    site_statistics,
)
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.privacy.release_gate import bounded_rows, floored_scales
from cardiofed.wire import decode_arrays, encode_arrays

if TYPE_CHECKING:
    from cardiofed.privacy.site_privacy import SitePrivacy

Standardisation = Literal["global", "per-site"]


@dataclass(frozen=True, kw_only=True)
class PreparedSite:
    """A site's rows after imputation and standardisation, ready for training."""

    name: str
    site_type: str
    x_train: np.ndarray  # float32
    y_train: np.ndarray  # float32 0/1
    x_test: np.ndarray
    y_test: np.ndarray   # int64 0/1
    preprocessor: Preprocessor
    # Per-row loss weights toward the federation's feature distribution (or None).
    sample_weight: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return len(self.y_train)


def _prepared(site: SiteData, pre: Preprocessor,
              ranges: list[tuple[float, float]]) -> PreparedSite:
    """The site's rows as a node bounds them (:mod:`cardiofed.privacy.release_gate`):
    clipped into the declared ranges, scales floored, standardised values clipped."""
    pre = floored_scales(pre, ranges)
    return PreparedSite(name=site.name, site_type=site.site_type,
                        x_train=bounded_rows(pre, site.x_train, ranges),
                        y_train=site.y_train.astype(np.float32),
                        x_test=bounded_rows(pre, site.x_test, ranges), y_test=site.y_test,
                        preprocessor=pre)


def prepare_federation(dataset: FederatedDataset, standardisation: Standardisation = "global",
                       outbox: Callable[[str, str, bytes], None] | None = None, *,
                       covariate_shift: bool = False,
                       privacy: Mapping[str, SitePrivacy] | None = None,
                       form: ModelForm | None = None, robust: bool = False,
                       secure_dropout: float | None = None,
                       secure_groups: Sequence[Sequence[str]] | None = None
                       ) -> list[PreparedSite]:
    """Impute and standardise every site with federated statistics.

    ``global``: one preprocessor from merged site statistics (equal to pooled ones);
    `robust` passes them through the coordinator's statistics gate first
    (:mod:`cardiofed.aggregation.robust_statistics`, what a networked study does).
    ``per-site``: missing values filled with the federated median, then each site
    standardises with its own training mean and standard deviation (FLamby's choice).
    With `outbox`, each site's statistics pass through it as wire payloads. With
    `covariate_shift`, each site weights its rows toward the federation's feature
    distribution, from its own and the merged histograms (no rows move).
    A site in `privacy` releases its statistics through its DP wrapper (charged to its
    ledger, :data:`PRIVATE_BINS` bins); a site whose budget refuses the release
    contributes nothing and still receives the merged preprocessor. `form` builds the
    model's columns from the encoded ones (:mod:`cardiofed.data.model_form`). With
    `secure_dropout` (a secure study's) the private sites' statistics are one secure sum
    with distributed noise (:mod:`cardiofed.simulation.secure_statistics`), or one per
    group of `secure_groups`, which `robust` passes through the gate (each group's sum
    one release), as a grouped networked study does.
    """
    if standardisation not in ("global", "per-site"):
        raise ConfigurationError(f"The 'standardisation' parameter must be 'global' or "
                                 f"'per-site'; got {standardisation!r}.")
    if privacy and (standardisation != "global" or covariate_shift):
        raise ConfigurationError("Private statistics support global standardisation only, "
                                 "without covariate_shift.")
    edges = bin_edges(dataset.feature_ranges)
    private_edges = bin_edges(dataset.feature_ranges, PRIVATE_BINS)
    released: list[SiteStatistics] = []
    moments: list[Moments] = []
    # Exact releases are summed as they come (what merging needs), so memory does not
    # grow with the federation; behind the gate they are computed again once its
    # factors are known. Covariate shift needs each site's histogram.
    streaming = privacy is None and not covariate_shift
    secure = bool(privacy) and secure_dropout is not None
    if secure:
        if outbox is not None or (robust and secure_groups is None):
            raise ConfigurationError("Secure statistics are summed before the coordinator "
                                     "sees them: no per-site payloads, and a statistics "
                                     "gate only across groups' sums (secure_group_size).")
        from cardiofed.simulation.secure_statistics import secure_statistics

        assert privacy is not None and secure_dropout is not None
        released = secure_statistics(dataset.sites, private_edges, privacy, secure_dropout,
                                     groups=secure_groups)
    for s in ([] if released else dataset.sites):
        if privacy is None or s.name not in privacy:
            stats = site_statistics(s.x_train, edges)
        else:
            try:
                stats = privacy[s.name].release_statistics(s.x_train, private_edges)
            except PrivacyBudgetExceeded:
                continue  # the site releases nothing; its training is refused likewise
        stats = stats if outbox is None else _via_wire(s.name, stats, outbox)
        if robust:
            moments.append(site_moments(stats, edges))
        if streaming and released and not robust:
            released[0] = add_statistics(released[0], stats)
        elif not (streaming and robust):
            released.append(stats)
    if not (moments or released):
        raise PrivacyBudgetExceeded("No site has privacy budget left for its statistics "
                                    "release; the federation cannot start.")
    gated = released
    if secure and robust:  # each group's sum is one release to the gate
        gated = robust_site_statistics(released, edges)[0]
    elif robust:
        factors = gate_factors(moments, edges[:, 0], edges[:, -1])
        if streaming:  # every release exact: one running total of the recomputed ones
            gated = [functools.reduce(add_statistics, (
                scaled(consistent(site_statistics(s.x_train, edges), edges), f)
                for s, f in zip(dataset.sites, factors, strict=True)))]
        else:  # exact and private releases may mix: merging re-bins them
            gated = [scaled(consistent(st, edges), f)
                     for st, f in zip(released, factors, strict=True)]
    merged = merge_statistics(gated, edges, dataset.feature_names, form)
    prepared = [_prepared(s, merged if standardisation == "global"
                          else local_preprocessor(s.x_train, merged.fill, form),
                          dataset.feature_ranges)
                for s in dataset.sites]
    if not covariate_shift:
        return prepared
    overall = np.sum([stats.histogram for stats in released], axis=0)
    return [replace(p, sample_weight=covariate_weights(s.x_train, stats.histogram, overall, edges))
            for p, s, stats in zip(prepared, dataset.sites, released, strict=True)]


def _via_wire(site: str, stats: SiteStatistics,
              outbox: Callable[[str, str, bytes], None]) -> SiteStatistics:
    payload = encode_arrays(stats.to_arrays(), {"site": site})
    outbox(site, "statistics", payload)
    return SiteStatistics(**decode_arrays(payload)[0])


def prepare_local_only(site: SiteData, feature_ranges: list[tuple[float, float]],
                       form: ModelForm | None = None) -> PreparedSite:
    """A site on its own: its own median fill and its own standardisation."""
    edges = bin_edges(feature_ranges)
    own = site_statistics(site.x_train, edges)
    # A column the site never records is filled with the range's low end: constant, so
    # it standardises to 0 and carries no signal.
    fill = np.where(own.count > 0, histogram_median(own.histogram, edges), edges[:, 0])
    return _prepared(site, local_preprocessor(site.x_train, fill, form), feature_ranges)
