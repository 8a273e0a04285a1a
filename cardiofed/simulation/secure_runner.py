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
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cardiofed.aggregation.robust import RobustAggregation, SiteAggregation
from cardiofed.aggregation.weighted_mean import shares, tail_average
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.kinds import Weights
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.secure.noise import DistributedNoise, integer_sensitivity
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite
from cardiofed.simulation.secure_statistics import MAX_SITE_RECORDS, noise_sites
from cardiofed.training.clipped import clipped_gradient_sum, unflatten
from cardiofed.training.clipped import sensitivity as gradient_sensitivity

if TYPE_CHECKING:  # the coordinator imports this module for its codec, without PyTorch
    from cardiofed.privacy.site_privacy import SitePrivacy
    from cardiofed.simulation.runner import FederatedRun

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


def secure_groups(names: Sequence[str], size: int, seed: int) -> list[list[str]]:
    """`names` shuffled by `seed` and dealt into ``len(names) // size`` groups (each at
    least `size`; sizes differ by at most one)."""
    n_groups = len(names) // size
    if n_groups < 3:
        raise ConfigurationError(
            f"secure_group_size {size} leaves {max(n_groups, 0)} group(s) of {len(names)} "
            f"sites; a robust rule across groups needs at least 3 (lower the size).")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return [sorted(order[g::n_groups]) for g in range(n_groups)]


def gradient_vector(weights: Weights, x: np.ndarray, y: np.ndarray,
                    clip: float) -> np.ndarray:
    """A site's part of a training round's sum: its rows' clipped gradient sum at
    `weights`, and their count."""
    return np.concatenate([clipped_gradient_sum(weights, x, y, clip), [len(y)]])


def mean_gradient_step(totals: Sequence[np.ndarray], weights: Weights) -> Weights:
    """The step down the mean gradient of unmasked sums (each a gradient sum and a noisy
    record count, at least 1)."""
    count = sum(max(float(t[-1]), 1.0) for t in totals)
    return unflatten(-np.sum(totals, axis=0)[:-1] / count, weights)


def group_step(totals: Sequence[np.ndarray], weights: Weights,
               robust: RobustAggregation | None) -> tuple[Weights, list[SiteAggregation]]:
    """The step from unmasked sums: down their mean gradient, or with `robust`, its rule
    across each group's mean gradient (weighted by the groups' noisy record counts), and
    what the rule did with each group."""
    if robust is None:
        return mean_gradient_step(totals, weights), []
    counts = [max(float(t[-1]), 1.0) for t in totals]
    return robust.aggregate(
        [unflatten(-t[:-1] / c, weights) for t, c in zip(totals, counts, strict=True)],
        counts, [f"group {g}" for g in range(len(totals))])


Attack = Callable[[str, np.ndarray], np.ndarray]


def run_secure_sgd(sites: Sequence[PreparedSite], config: SimulationConfig, *,
                   privacy: Mapping[str, SitePrivacy],
                   attack: Attack | None = None,
                   metrics: Callable[[Weights], dict[str, float]] | None = None
                   ) -> FederatedRun:
    """``config.rounds`` rounds of DP-FedSGD over secure sums (see the module docstring).

    With ``config.secure_group_size`` the sites are dealt into groups (once per study);
    each group's sum is unmasked on its own and ``config.robust_rule`` aggregates the
    groups' mean gradients (weighted by their noisy record counts). `attack(site,
    vector)`, for benchmarks and tests, replaces what a malicious site sends. A site's
    records are its rows, or its patients' blocks of person-period rows (``x_train`` of
    shape ``(n, J, d)``); `metrics(weights)` gives the history's figures (default: the
    test AUCs of :func:`~cardiofed.simulation.runner.round_metrics`)."""
    from cardiofed.models.networks import get_weights, make_model
    from cardiofed.simulation.runner import FederatedRun, round_metrics

    model = make_model(config.model, sites[0].x_train.shape[-1], seed=config.seed)
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
            needed[site.name] = privacy[site.name].secure_training_noise()
        except PrivacyBudgetExceeded as refusal:
            run.refusals.append((0, site.name, str(refusal)))
    taking_part = [s for s in sites if s.name in needed]
    multiplier = max(needed.values(), default=1.0)
    groups = ([[s.name for s in sites]] if config.secure_group_size is None
              else secure_groups([s.name for s in sites], config.secure_group_size,
                                 config.seed))
    sums = [(group, *secure_codec_and_noise(config, len(group), length, multiplier))
            for group in groups]
    robust = config.robust_aggregation()
    rnd = 0
    tail: deque[Weights] = deque(maxlen=config.average_last)
    for rnd in range(1, config.rounds + 1):
        vectors, rngs = {}, {}
        for site in taking_part:
            try:
                privacy[site.name].charge_secure_round(multiplier, f"round {rnd}")
            except PrivacyBudgetExceeded as refusal:
                run.refusals.append((rnd, site.name, str(refusal)))
                continue
            vectors[site.name] = gradient_vector(weights, site.x_train, site.y_train, clip)
            if attack is not None:
                vectors[site.name] = attack(site.name, vectors[site.name])
            rngs[site.name] = secure_numpy_rng()
        totals, short = [], []
        for group, codec, noise in sums:
            members = {n: vectors[n] for n in group if n in vectors}
            if len(members) < noise.min_sites:
                short.append(f"{len(members)} of a group's sites in the round, fewer than "
                             f"the {noise.min_sites} its noise is split over")
                continue
            totals.append(ring_sum(codec, members, rngs, noise))
        if not totals or (robust is not None and len(totals) < 3):
            why = "; ".join(short) or f"{len(totals)} group sums, fewer than a robust rule's 3"
            run.refusals.append((rnd, "*", f"{why}: training stops"))
            break
        step, report = group_step(totals, weights, robust)
        if robust is not None:
            run.record_robust(rnd, report)
        weights, state = algorithm.server.step(weights, step, state)
        tail.append(weights)
        for name in vectors:
            run.participation[name] += 1
            run.update_share[name] += 1
            run.weight_share[name] += 1 / len(vectors)
        if rnd == config.rounds or (config.eval_every and rnd % config.eval_every == 0):
            record = {"round": float(rnd), "time_s": 0.0, "train_loss": float("nan"),
                      **(metrics(weights) if metrics is not None
                         else round_metrics(config.model, weights, sites))}
            for name, site_privacy in privacy.items():
                record[f"epsilon/{name}"] = site_privacy.ledger.spent()
            run.history.append(record)
    run.weights = tail_average(list(tail)) if tail else weights
    run.rounds = rnd
    run.update_share = shares(run.update_share)
    run.weight_share = {name: w / max(rnd, 1) for name, w in run.weight_share.items()}
    return run
