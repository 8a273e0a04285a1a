"""UCI Heart Disease, four hospitals, with FLamby's Fed-Heart-Disease preprocessing.

Reproduces ``flamby/datasets/fed_heart_disease/dataset.py`` (Ogier du Terrail et al.,
NeurIPS 2022 Datasets and Benchmarks) exactly: drop columns slope, ca and thal; drop
rows with any remaining ``?``; label ``num > 0``; per-centre 66/34 train/test split with
``train_test_split(random_state=43, shuffle=True)``, stratified on the label where each
class has more than two rows (all centres but Switzerland); one-hot ``cp`` and
``restecg`` with the first level dropped, giving 13 features. Train/test sizes:
Cleveland 199/104, Hungarian 172/89, Switzerland 30/16, VA Long Beach 85/45.

FLamby keeps the UCI files' value 0 for serum cholesterol (a missing-value code at
Switzerland and VA Long Beach) as a number; so do we, to match the benchmark. FLamby
standardises each centre with its own training mean and standard deviation; use
``standardisation="per-site"`` in the simulator for that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cardiofed.data.dataset import FederatedDataset, SiteData, SiteTypes, feature_ranges_for
from cardiofed.data.paths import require

CENTRES = ("cleveland", "hungarian", "switzerland", "va")
# Model input columns in FLamby's order: kept columns, then the cp and restecg dummies.
FEATURE_NAMES = [
    "age", "sex=male", "systolic_bp", "total_cholesterol", "fasting_glucose_high",
    "max_heart_rate", "exercise_angina", "st_depression",
    "chest_pain_type=2", "chest_pain_type=3", "chest_pain_type=4", "rest_ecg=1", "rest_ecg=2",
]
_TRAIN_FRACTION = 0.66
_SPLIT_SEED = 43


def _read_centre(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, header=None, dtype=str)
    df = df.replace("?", np.nan).drop(columns=[10, 11, 12]).dropna(axis=0)
    return df.apply(pd.to_numeric).reset_index(drop=True)


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and (counts > 2).all() else None
    train, test = train_test_split(np.arange(len(labels)), test_size=1.0 - _TRAIN_FRACTION,
                                   train_size=_TRAIN_FRACTION, random_state=_SPLIT_SEED,
                                   shuffle=True, stratify=stratify)
    return np.sort(train), np.sort(test)


def load_uci_heart(data_dir: str | Path | None = None) -> FederatedDataset:
    """The four UCI hospitals as FLamby prepares them (features not yet standardised)."""
    folder = require("uci_heart", data_dir)
    frames = [_read_centre(require(f"processed.{c}.data", folder)) for c in CENTRES]
    allrows = pd.concat(frames, ignore_index=True)
    features = pd.get_dummies(allrows.iloc[:, :-1], columns=[2, 6], drop_first=True)
    x_all = features.to_numpy(dtype=np.float64)
    y_all = (allrows.iloc[:, -1].to_numpy() > 0).astype(np.int64)
    sites, start = [], 0
    for centre, frame in zip(CENTRES, frames, strict=True):
        x, y = x_all[start:start + len(frame)], y_all[start:start + len(frame)]
        start += len(frame)
        train, test = _split(y)
        sites.append(SiteData(name=centre, site_type=SiteTypes.HOSPITAL,
                              x_train=x[train], y_train=y[train],
                              x_test=x[test], y_test=y[test]))
    return FederatedDataset(
        name="uci-heart", feature_names=list(FEATURE_NAMES),
        feature_ranges=feature_ranges(), sites=sites, outcome="heart_disease",
        description="UCI Heart Disease, four hospitals, FLamby Fed-Heart-Disease split",
    )


def feature_ranges() -> list[tuple[float, float]]:
    """Plausible ranges of the 13 columns (cholesterol from 0: the files' missing code)."""
    ranges = feature_ranges_for(FEATURE_NAMES)
    # Cholesterol 0 is the files' missing code, kept as FLamby keeps it: widen the range.
    ranges[FEATURE_NAMES.index("total_cholesterol")] = (0.0, ranges[3][1])
    return ranges
