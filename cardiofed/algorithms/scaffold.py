"""SCAFFOLD's control variates (Karimireddy et al., ICML 2020, Algorithm 1, option II).

Each local step follows ``g - c_i + c`` instead of ``g``: the site's control variate
``c_i`` estimates its own gradient drift, the server's ``c`` the average one. After ``K``
local SGD steps of size ``lr`` that moved the model by ``delta = y_i - x``:

    c_i+ = c_i - c - delta / (K lr)          (option II)
    c   <- c + (|S| / N) mean_{i in S}(c_i+ - c_i)

Pure functions on named arrays; the simulator keeps ``c`` and each ``c_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cardiofed.models.kinds import Weights


def zeros_like(weights: Weights) -> Weights:
    return {k: np.zeros_like(v, dtype=np.float32) for k, v in weights.items()}


def gradient_correction(c_site: Weights, c_server: Weights) -> Weights:
    """What each local gradient gets added: ``c - c_i``."""
    return {k: (c_server[k] - c_site[k]).astype(np.float32) for k in c_server}


def site_control_update(c_site: Weights, c_server: Weights, delta: Weights, *, steps: int,
                        lr: float) -> Weights:
    """The site's new control variate after ``steps`` SGD steps of size ``lr``."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps must be >= 1 and lr > 0; got steps={steps}, lr={lr}.")
    return {k: (c_site[k] - c_server[k] - delta[k] / (steps * lr)).astype(np.float32)
            for k in c_site}


def server_control_update(c_server: Weights, control_deltas: Sequence[Weights],
                          n_sites: int) -> Weights:
    """``c + (|S| / N) * mean(c_i+ - c_i)`` over the sites that reported."""
    if not control_deltas:
        return c_server
    share = len(control_deltas) / n_sites
    return {k: (c_server[k] + share * np.mean([d[k] for d in control_deltas], axis=0))
            .astype(np.float32) for k in c_server}
