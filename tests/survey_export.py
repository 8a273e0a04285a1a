"""A survey-style export for tests and bench/own_data.py: the column layout and codes of
a health-interview survey ("Personal Key Indicators of Heart Disease", from the US
BRFSS), written as the survey publishes it, with outcomes drawn from a logistic model
of its predictors. Synthetic: the layout is real, the people and the coefficients are
not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

AGE_BANDS = ["18-24", "25-29", "30-34", "35-39", "40-44", "45-49", "50-54", "55-59", "60-64",
             "65-69", "70-74", "75-79", "80 or older"]
HEALTH = ["Excellent", "Very good", "Good", "Fair", "Poor"]
RACE = ["White", "Black", "Asian", "American Indian/Alaskan Native", "Hispanic", "Other"]
DIABETIC = ["No", "Yes", "No, borderline diabetes", "Yes (during pregnancy)"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "survey"


def survey_frame(n: int, rng: np.random.Generator, older: float = 0.0) -> pd.DataFrame:
    """`n` respondents; `older` shifts the age distribution (a site's case mix)."""
    band = np.clip(np.round(rng.normal(7 + older, 3.2, n)), 0, 12).astype(int)
    male = rng.random(n) < 0.48
    bmi = np.clip(rng.normal(28 + 0.2 * band, 5.5, n), 13, 75).round(2)
    health = np.clip(np.round(rng.normal(1.4 + 0.12 * band + 0.04 * (bmi - 28), 1.0, n)),
                     0, 4).astype(int)
    walking = rng.random(n) < 0.04 + 0.03 * health
    diabetic = rng.choice(4, n, p=[0.84, 0.12, 0.03, 0.01])
    yes = {True: "Yes", False: "No"}
    flags = {name: rng.random(n) < p for name, p in (
        ("Smoking", 0.41), ("AlcoholDrinking", 0.07), ("Stroke", 0.04), ("Asthma", 0.13),
        ("KidneyDisease", 0.04), ("SkinCancer", 0.09), ("PhysicalActivity", 0.77))}
    physical = np.clip(rng.poisson(1 + 1.5 * health), 0, 30)
    mental = np.clip(rng.poisson(3.0, n), 0, 30)
    sleep = np.clip(np.round(rng.normal(7, 1.4, n)), 1, 24)
    race = rng.choice(6, n, p=[0.77, 0.07, 0.03, 0.02, 0.08, 0.03])
    lp = (-7.2 + 0.38 * band + 0.7 * male + 0.55 * health + 0.5 * (diabetic == 1)
          + 0.9 * flags["Stroke"] + 0.6 * walking + 0.6 * flags["KidneyDisease"]
          + 0.35 * flags["Smoking"] - 0.25 * flags["AlcoholDrinking"]
          + 0.02 * physical + 0.2 * flags["Asthma"] + 0.15 * flags["SkinCancer"]
          - 0.15 * flags["PhysicalActivity"] + 0.05 * np.abs(sleep - 7)
          - 0.3 * (race == 2) + 0.01 * (bmi - 28))
    y = rng.random(n) < 1.0 / (1.0 + np.exp(-lp))
    frame = pd.DataFrame({
        "HeartDisease": [yes[v] for v in y], "BMI": bmi.astype(str),
        "Smoking": [yes[v] for v in flags["Smoking"]],
        "AlcoholDrinking": [yes[v] for v in flags["AlcoholDrinking"]],
        "Stroke": [yes[v] for v in flags["Stroke"]], "PhysicalHealth": physical.astype(str),
        "MentalHealth": mental.astype(str), "DiffWalking": [yes[v] for v in walking],
        "Sex": np.where(male, "Male", "Female"), "AgeCategory": [AGE_BANDS[b] for b in band],
        "Race": [RACE[r] for r in race], "Diabetic": [DIABETIC[d] for d in diabetic],
        "PhysicalActivity": [yes[v] for v in flags["PhysicalActivity"]],
        "GenHealth": [HEALTH[h] for h in health], "SleepTime": sleep.astype(int).astype(str),
        "Asthma": [yes[v] for v in flags["Asthma"]],
        "KidneyDisease": [yes[v] for v in flags["KidneyDisease"]],
        "SkinCancer": [yes[v] for v in flags["SkinCancer"]]})
    return frame


def write_survey_sites(folder: Path, sizes: dict[str, tuple[int, float]], *, seed: int
                       ) -> tuple[list[Path], list[Path]]:
    """One CSV and one mapping per site (the example mapping with the site's name)."""
    template = (EXAMPLES / "mapping.toml").read_text()
    csvs, mappings = [], []
    for k, (site, (n, older)) in enumerate(sizes.items()):
        csv = folder / f"{site}.csv"
        survey_frame(n, np.random.default_rng([seed, k]), older).to_csv(csv, index=False)
        mapping = folder / f"{site}.toml"
        mapping.write_text(template.replace('site = "survey_a"', f'site = "{site}"'))
        csvs.append(csv)
        mappings.append(mapping)
    return csvs, mappings
