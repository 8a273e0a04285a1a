"""The national federation: the type mix and size spread it promises, in bulk."""

from __future__ import annotations

import numpy as np
import pytest

from cardiofed.data.catalog import NATIONAL_FROM, load_dataset
from cardiofed.data.national import NATIONAL_SHARE, SIZE_RANGE, national_federation
from cardiofed.exceptions import ConfigurationError


def test_types_and_sizes_follow_the_national_mix() -> None:
    data = national_federation(3000, seed=1)
    types = [s.site_type for s in data.sites]
    for site_type, share in NATIONAL_SHARE.items():
        assert types.count(site_type) == pytest.approx(share * 3000, abs=1)
    sizes = {t: np.median([s.n_train + s.n_test for s in data.sites if s.site_type == t])
             for t in NATIONAL_SHARE}
    assert sizes["tier3"] > 3 * sizes["tier2"] > 9 * sizes["community"]
    all_sizes = [s.n_train + s.n_test for s in data.sites]
    assert SIZE_RANGE[0] <= min(all_sizes) and max(all_sizes) <= SIZE_RANGE[1]
    assert len({s.name for s in data.sites}) == 3000
    again = national_federation(3000, seed=1)
    np.testing.assert_array_equal(again.sites[7].x_train, data.sites[7].x_train)
    # Older, sicker patients at tier-3 hospitals, as in the demo's sites.
    age = {t: np.mean(np.concatenate([s.x_train[:, 0] for s in data.sites
                                      if s.site_type == t])) for t in NATIONAL_SHARE}
    assert age["tier3"] > age["tier2"] > age["community"]


def test_many_synthetic_sites_are_the_national_federation() -> None:
    data = load_dataset("synthetic", n_sites=NATIONAL_FROM + 1)
    assert data.description.startswith("National synthetic federation: 1,001 institutions")
    with pytest.raises(ConfigurationError, match="eval_size applies to the demo"):
        load_dataset("synthetic", n_sites=NATIONAL_FROM + 1, eval_size=100)
