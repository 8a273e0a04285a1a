"""Simulated rounds of secure aggregation with distributed DP (DP-FedSGD).

Each round every site computes its clipped per-record gradient sum at the global model
(:func:`~cardiofed.training.clipped.clipped_gradient_sum`) and its record count (one
record moves the pair by at most ``sqrt(clip^2 + 2)``), encodes them
into the secure sum's ring, adds its share of the noise and sends the masked result. The
coordinator unmasks only the sum: it divides the gradient sum by the noisy record count
and steps with the plan's server optimiser. The arithmetic is the protocol's
(:func:`~cardiofed.secure.simulate.ring_sum`; the masks cancel exactly), each site's
rounding and noise drawn from a generator seeded from the operating system's CSPRNG.

Every site charges each round to its ledger at the study's noise multiplier: the largest
any site's training share needs for the planned rounds, so the sum's noise covers every
site's budget (:meth:`~cardiofed.privacy.site_privacy.SitePrivacy.charge_secure_round`).
A site that refuses (its budget is spent) drops out of the round; a round with fewer
sites than the noise was split over is not unmasked, and training stops there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cardiofed.exceptions import PrivacyBudgetExceeded
from cardiofed.models.networks import get_weights, make_model
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.secure.noise import DistributedNoise, integer_sensitivity
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite
from cardiofed.simulation.runner import FederatedRun, round_metrics, shares
from cardiofed.simulation.secure_statistics import MAX_SITE_RECORDS, noise_sites
from cardiofed.training.clipped import clipped_gradient_sum, unflatten
from cardiofed.training.clipped import sensitivity as gradient_sensitivity

# Ring units per unit of the clip, per sqrt(coordinate): stochastic rounding then adds
# about 0.1% to the sensitivity.
SCALE_PER_ROOT_DIM = 1024


def secure_codec_and_noise(config: SimulationConfig, n_sites: int, length: int,
                           noise_multiplier: float) -> tuple[RingCodec, DistributedNoise]:
    """The ring and the noise of one round's secure sum of `length` values."""
    clip = config.dp_max_grad_norm
    scale = 2.0 ** math.ceil(math.log2(SCALE_PER_ROOT_DIM * math.sqrt(length) / clip))
    min_sites = noise_sites(n_sites, config.secure_dropout)
    noise = DistributedNoise(noise_multiplier=noise_multiplier,
                             sensitivity=integer_sensitivity(
                                 math.hypot(gradient_sensitivity(clip), 1.0), scale, length),
                             min_sites=min_sites)
    codec = RingCodec.for_sum(n_sites, bound=max(clip, 1.0) * MAX_SITE_RECORDS, scale=scale,
                              noise_bound=noise.noise_bound(n_sites))
    return codec, noise


def run_secure_sgd(sites: Sequence[PreparedSite], config: SimulationConfig, *,
                   privacy: Mapping[str, SitePrivacy]) -> FederatedRun:
    """``config.rounds`` rounds of DP-FedSGD over secure sums (see the module docstring)."""
    model = make_model(config.model, sites[0].x_train.shape[1], seed=config.seed)
    weights = get_weights(model)
    algorithm = config.make_algorithm()
    state = algorithm.init_server(weights)
    length = sum(v.size for v in weights.values()) + 1
    clip = config.dp_max_grad_norm
    run = FederatedRun(weights=weights, participation={s.name: 0 for s in sites},
                       weight_share={s.name: 0.0 for s in sites},
                       update_share={s.name: 0.0 for s in sites})
    needed = {}
    for site in sites:  # a site whose budget cannot cover the schedule sits it out
        try:
            needed[site.name] = privacy[site.name].secure_training_noise(config.rounds)
        except PrivacyBudgetExceeded as refusal:
            run.refusals.append((0, site.name, str(refusal)))
    taking_part = [s for s in sites if s.name in needed]
    codec, noise = secure_codec_and_noise(config, len(sites), length,
                                          max(needed.values(), default=1.0))
    rnd = 0
    for rnd in range(1, config.rounds + 1):
        vectors, rngs = {}, {}
        for site in taking_part:
            try:
                privacy[site.name].charge_secure_round(noise.noise_multiplier,
                                                       f"round {rnd}")
            except PrivacyBudgetExceeded as refusal:
                run.refusals.append((rnd, site.name, str(refusal)))
                continue
            vectors[site.name] = np.concatenate([
                clipped_gradient_sum(weights, site.x_train, site.y_train, clip),
                [len(site.y_train)]])
            rngs[site.name] = secure_numpy_rng()
        if len(vectors) < noise.min_sites:
            run.refusals.append((rnd, "*", f"{len(vectors)} sites in the round, fewer than "
                                            f"the {noise.min_sites} the noise is split over: "
                                            f"the sum is not unmasked and training stops"))
            break
        total = ring_sum(codec, vectors, rngs, noise)
        gradient = total[:-1] / max(total[-1], 1.0)
        weights, state = algorithm.server.step(
            weights, unflatten(-gradient, weights), state)
        for name in vectors:
            run.participation[name] += 1
            run.update_share[name] += 1
            run.weight_share[name] += 1 / len(vectors)
        if rnd == config.rounds or (config.eval_every and rnd % config.eval_every == 0):
            record = {"round": float(rnd), "time_s": 0.0, "train_loss": float("nan"),
                      **round_metrics(config.model, weights, sites)}
            for name, site_privacy in privacy.items():
                record[f"epsilon/{name}"] = site_privacy.ledger.spent()
            run.history.append(record)
    run.weights = weights
    run.rounds = rnd
    run.update_share = shares(run.update_share)
    run.weight_share = {name: w / max(rnd, 1) for name, w in run.weight_share.items()}
    return run
