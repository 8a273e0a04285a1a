"""Containers for a federation's data: one :class:`SiteData` per hospital.

A site's arrays never leave it in a real deployment; in simulation the container
simply holds every site side by side. Features are encoded model inputs (one-hot
for categorical variables) with ``NaN`` marking a missing value, to be imputed by
:mod:`cardiofed.data.preprocessing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cardiofed.exceptions import DataValidationError
from cardiofed.schema import CATALOGUE, Catalogue

if TYPE_CHECKING:
    from cardiofed.data.mapping import LoadReport


class SiteTypes:
    """Site types used by the partitioning rules and reports."""

    TIER3 = "tier3"
    TIER2 = "tier2"
    COMMUNITY = "community"
    HOSPITAL = "hospital"  # a site of unspecified type


@dataclass(frozen=True, kw_only=True)
class SiteData:
    """One hospital's train and test split (encoded features, binary labels)."""

    name: str
    site_type: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # The true risk each test label was drawn from (synthetic cohorts only): the yardstick
    # of what any model can achieve at the site.
    true_risk_test: np.ndarray | None = None
    # Follow-up in years (survival exports): the labels then say whether follow-up ended
    # in the event (1) or was censored (0).
    time_train: np.ndarray | None = None
    time_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.true_risk_test is not None and self.true_risk_test.shape != self.y_test.shape:
            raise DataValidationError(
                f"Site {self.name!r}: true_risk_test must have one risk per test row; got "
                f"{self.true_risk_test.shape} for {self.y_test.shape}.")
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
                raise DataValidationError(
                    f"Site {self.name!r}: {split} features must be 2-D with one label per row; "
                    f"got features {x.shape} and labels {y.shape}."
                )
            if len(y) and not np.isin(y, (0, 1)).all():
                raise DataValidationError(f"Site {self.name!r}: {split} labels must be 0 or 1.")
        if (self.time_train is None) != (self.time_test is None):
            raise DataValidationError(f"Site {self.name!r}: follow-up times are needed for "
                                      f"both splits or neither.")
        for split, t, y in (("train", self.time_train, self.y_train),
                            ("test", self.time_test, self.y_test)):
            if t is not None and (t.shape != y.shape or not (np.isfinite(t) & (t > 0)).all()):
                raise DataValidationError(
                    f"Site {self.name!r}: {split} follow-up times must be finite, > 0 and one "
                    f"per row; got shape {t.shape} for {y.shape} labels.")

    @property
    def survival(self) -> bool:
        """The site's labels are events at the end of a follow-up time."""
        return self.time_train is not None

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


class SiteSampler(Protocol):
    """Draws fresh training rows from a site's own population (synthetic cohorts only):
    how the effective data of a site is measured without extrapolation."""

    def draw(self, site: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` new patients of `site`: encoded features (NaN = missing) and 0/1 labels."""
        ...


@dataclass(frozen=True, kw_only=True)
class FederatedDataset:
    """A federation: sites sharing the same encoded feature columns."""

    name: str
    feature_names: list[str]
    feature_ranges: list[tuple[float, float]]
    sites: list[SiteData]
    outcome: str
    description: str = ""
    load_reports: dict[str, LoadReport] = field(default_factory=dict)  # site -> its load
    sampler: SiteSampler | None = None
    # The test splits are simulated evaluation cohorts, not records the sites hold.
    evaluation_cohorts: bool = False

    def own_records(self, site: SiteData) -> tuple[np.ndarray, np.ndarray]:
        """All rows `site` holds: its training rows, and its test rows unless those are
        a simulated evaluation cohort."""
        if self.evaluation_cohorts:
            return site.x_train, site.y_train
        return (np.concatenate([site.x_train, site.x_test]),
                np.concatenate([site.y_train, site.y_test]))

    def __post_init__(self) -> None:
        if not self.sites:
            raise DataValidationError(f"Federated dataset {self.name!r} has no sites.")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise DataValidationError(
                f"Federated dataset {self.name!r}: site names repeat: {names}.")
        if len(self.feature_ranges) != len(self.feature_names):
            raise DataValidationError("feature_ranges must have one (low, high) per feature name.")
        d = len(self.feature_names)
        for s in self.sites:
            if s.x_train.shape[1] != d or s.x_test.shape[1] != d:
                raise DataValidationError(
                    f"Site {s.name!r} has {s.x_train.shape[1]} feature columns; "
                    f"the federation has {d}."
                )

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def site(self, name: str) -> SiteData:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"No site {name!r}; sites are {[s.name for s in self.sites]}.")

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        """All sites' test splits stacked (for simulation reports only)."""
        return (np.concatenate([s.x_test for s in self.sites]),
                np.concatenate([s.y_test for s in self.sites]))


def feature_ranges_for(encoded_names: list[str],
                       catalogue: Catalogue | None = None) -> list[tuple[float, float]]:
    """Plausible range of each encoded column, from the catalogue (default: built-in)."""
    return (catalogue or CATALOGUE).ranges(encoded_names)
