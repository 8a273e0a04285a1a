"""Data sets by name: ``synthetic``, ``uci-heart``, ``framingham``, or the user's ``csv``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cardiofed.exceptions import ConfigurationError

if TYPE_CHECKING:  # the command line reads DATASETS without loading NumPy
    from cardiofed.data.dataset import FederatedDataset
    from cardiofed.schema import Catalogue

DATASETS: tuple[str, ...] = ("synthetic", "uci-heart", "framingham", "csv")
# More synthetic sites than this: the national federation (cardiofed.data.national), with
# the size mix of a country's hospitals, generated in bulk.
NATIONAL_FROM = 1000


def load_dataset(name: str, *, seed: int = 0, data_dir: str | Path | None = None,
                 csv: list[Path] | None = None, mappings: list[Path] | None = None,
                 n_sites: int = 12, eval_size: int | None = None,
                 catalogue: Catalogue | None = None) -> FederatedDataset:
    """Load a federation by name (see :data:`DATASETS`); `eval_size` gives each synthetic
    site an evaluation cohort of that many new patients; `catalogue` holds a ``csv``
    study's own features and outcome."""
    if eval_size is not None and name != "synthetic":
        raise ConfigurationError(f"eval_size draws new patients from the synthetic sites' "
                                 f"profiles; data set {name!r} keeps its own test splits.")
    if name == "synthetic" and n_sites > NATIONAL_FROM:
        from cardiofed.data.national import national_federation

        if eval_size is not None:
            raise ConfigurationError(f"eval_size applies to the demo's federation (up to "
                                     f"{NATIONAL_FROM} sites); a national one of {n_sites} "
                                     f"keeps a test split per site.")
        return national_federation(n_sites, seed=seed)
    if name == "synthetic":
        from cardiofed.data.synthetic import synthetic_federation

        return synthetic_federation(n_sites, seed=seed, eval_size=eval_size)
    if name == "uci-heart":
        from cardiofed.data.uci_heart import load_uci_heart

        return load_uci_heart(data_dir)
    if name == "framingham":
        from cardiofed.data.framingham import load_framingham

        return load_framingham(data_dir, seed=seed)
    if name == "csv":
        from cardiofed.data.sites import federation_from_csv

        if not csv:
            raise ConfigurationError("The 'csv' data set needs --csv FILE (one per site) and "
                                     "--mapping FILE (one per site, same order).")
        return federation_from_csv(csv, mappings or [], seed=seed, catalogue=catalogue)
    raise ConfigurationError(f"The 'dataset' parameter must be one of {list(DATASETS)}; "
                             f"got {name!r}.")


def study_columns(dataset: str | None = None, features: list[str] | None = None,
                  catalogue: Catalogue | None = None
                  ) -> tuple[list[str], list[tuple[float, float]]]:
    """Encoded column names and plausible ranges of a study, from a reference data set's
    name or a list of canonical features (as in the sites' mapping files, looked up in
    `catalogue`, default the built-in one)."""
    from cardiofed.data.dataset import feature_ranges_for
    from cardiofed.schema import encoded_feature_names

    if (dataset is None) == (features is None):
        raise ConfigurationError("Give either a data set name or a list of canonical features.")
    if dataset == "uci-heart":
        from cardiofed.data import uci_heart

        return list(uci_heart.FEATURE_NAMES), uci_heart.feature_ranges()
    if dataset == "framingham":
        from cardiofed.data.framingham import FEATURES

        features = FEATURES
    elif dataset == "synthetic":
        from cardiofed.data.synthetic import SYNTHETIC_FEATURES

        features = SYNTHETIC_FEATURES
    elif dataset is not None:
        raise ConfigurationError(f"The 'dataset' parameter must be one of {list(DATASETS[:3])}; "
                                 f"got {dataset!r}.")
    if features is None:  # unreachable: exactly one of the two was given
        raise ConfigurationError("Give either a data set name or a list of canonical features.")
    names = encoded_feature_names(features, catalogue)
    return names, feature_ranges_for(names, catalogue)
