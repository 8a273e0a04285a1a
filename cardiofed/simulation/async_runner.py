"""Asynchronous (buffered) federation on a virtual clock.

Every site trains on the newest global model it has, for as long as its
:class:`~cardiofed.simulation.clock.SiteSpeed` says, and uploads; the server folds
updates into a buffer and publishes a new version once ``buffer_size`` updates have
arrived (or ``buffer_timeout_s`` simulated seconds after the last publication with at
least one waiting), discounting each by its staleness
(:mod:`cardiofed.algorithms.staleness`). A site trains at most once per model
version: when it finishes before a new version is out it waits for one, as a node
waits on the coordinator, and it waits too while an update of its own is still in the
buffer (the coordinator refuses a second one). ``config.rounds`` is the number of
versions published.

Events are processed in simulated-time order from a heap, so a run is deterministic
given ``config.seed`` (and the speeds); training itself runs for real.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
from torch import nn

from cardiofed.aggregation.weighted_mean import shares
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms.base import LocalTrainer
from cardiofed.algorithms.staleness import StaleUpdate, buffer_ready, publish_buffer, window
from cardiofed.exceptions import PrivacyBudgetExceeded
from cardiofed.models.networks import Weights, get_weights, make_model
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.clock import SiteSpeed, default_speeds
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite
from cardiofed.simulation.runner import (
    FederatedRun,
    Outbox,
    derive_seed,
    round_metrics,
    site_clocks,
    via_wire,
    work_samples,
)
from cardiofed.training.local import train_local

_DONE, _TIMEOUT = 0, 1


def run_async(sites: Sequence[PreparedSite], config: SimulationConfig, *,
              speeds: Mapping[str, SiteSpeed] | None = None,
              privacy: Mapping[str, SitePrivacy] | None = None,
              outbox: Outbox | None = None,
              site_multipliers: Mapping[str, float] | None = None,
              max_time_s: float | None = None,
              algorithm: FederatedAlgorithm | None = None) -> FederatedRun:
    """Publish ``config.rounds`` model versions by buffered asynchronous aggregation.

    `speeds` default to :func:`~cardiofed.simulation.clock.default_speeds` by site type.
    Sites with a zero multiplier (flagged by the label-quality check) do not train; a
    site whose privacy budget is spent stops (``refusals``), and the buffer then needs
    at most as many updates as sites still train. The run also stops at simulated time
    `max_time_s`, or when no site trains any more; ``history`` shows how many versions
    were published. ``history`` records, per published
    version, the simulated time (``time_s``) and test AUCs; ``update_share`` each site's
    share of the updates folded into the final model; ``rejected`` the updates refused
    as too stale, with the reason.
    """
    config.check_buffer_size(len(sites))
    rule = config.weighting_rule(dict(site_multipliers or {}))
    staleness_rule = config.staleness_rule()
    site_types = {s.name: s.site_type for s in sites}
    clocks, rngs = site_clocks(sites, config, default_speeds(site_types, config.seed)
                               if speeds is None else speeds)
    algorithm = algorithm or config.make_algorithm()
    model = make_model(config.model, sites[0].x_train.shape[1], seed=config.seed)
    versions: dict[int, Weights] = {0: get_weights(model)}
    state = algorithm.init_server(versions[0])
    run = FederatedRun(weights=versions[0], participation={s.name: 0 for s in sites},
                       weight_share={s.name: 0.0 for s in sites},
                       update_share={s.name: 0.0 for s in sites})
    version, published_at = 0, 0.0
    mixture: dict[str, float] = {}
    base: dict[int, int] = {}  # site index -> version it is training from
    last_base: dict[int, int] = {}  # site index -> version of its last finished task
    waiting: set[int] = set()  # sites that finished and wait for a new version
    buffer: list[tuple[ClientUpdate, int]] = []
    latest: dict[str, tuple[ClientUpdate, int]] = {}  # site -> its last folded update
    events: list[tuple[float, int, int, int]] = []  # (time, sequence, kind, site or version)
    sequence = 0

    def push(t: float, kind: int, what: int) -> None:
        nonlocal sequence
        heapq.heappush(events, (t, sequence, kind, what))
        sequence += 1

    def start(k: int, t: float) -> None:
        base[k] = version
        busy = clocks[k].task_seconds(work_samples(sites[k], config), rngs[k])
        push(clocks[k].finish(t, busy), _DONE, k)

    # Sites the label-quality check gave no weight do not train; a site whose privacy
    # budget is spent stops. The buffer then needs at most as many updates as remain.
    training = {k for k, s in enumerate(sites) if rule.site_multipliers.get(s.name, 1.0) > 0}
    for k in sorted(training):
        start(k, 0.0)
    if config.buffer_timeout_s is not None:
        push(config.buffer_timeout_s, _TIMEOUT, 0)
    t = 0.0
    needs_loss = config.reports_global_loss
    while events and version < config.rounds:
        t, _, kind, what = heapq.heappop(events)
        if max_time_s is not None and t > max_time_s:
            t = max_time_s
            break
        if kind == _TIMEOUT and what != version:
            continue  # a newer version was published since this timeout was set
        if kind == _DONE:
            k, site = what, sites[what]
            trained_from = last_base[k] = base.pop(k)
            update = None
            try:
                update = _train(algorithm, model, versions[trained_from], site,
                                privacy, needs_loss, seed=derive_seed(
                                    config.seed, trained_from + 1, k))
            except PrivacyBudgetExceeded as refusal:
                run.refusals.append((trained_from + 1, site.name, str(refusal)))
                training.discard(k)  # the site stops: its budget is spent
                latest.pop(site.name, None)  # and its last update leaves the window
            if update is not None:
                if outbox is not None:
                    update = via_wire(update, trained_from + 1, outbox)
                run.participation[site.name] += 1
                try:
                    staleness_rule.check(version - trained_from)
                    buffer.append((update, version - trained_from))
                except StaleUpdate as exc:
                    run.rejected.append((t, site.name, str(exc)))
                waiting.add(k)
        if len(buffer) >= config.min_buffer() and (kind == _TIMEOUT or buffer_ready(
                len(buffer), buffer_size=min(config.buffer_size, len(training)),
                since_publication_s=t - published_at, timeout_s=config.buffer_timeout_s,
                min_count=config.min_buffer())):
            fresh = buffer
            if config.windowed:
                buffer = window(buffer, latest, version, staleness_rule)
                latest.update({u.site: (u, version - s) for u, s in fresh})
            updates = [u for u, _ in buffer]
            agg, mixture = rule.weights(updates, site_types, mixture)
            total = sum(agg)
            for u, w in zip(updates, agg, strict=True):
                run.weight_share[u.site] += w / total
            for u, _ in fresh:
                run.update_share[u.site] += 1
            stale = [s for _, s in fresh]
            new, state, report = publish_buffer(algorithm, versions[version], buffer, state,
                                                staleness_rule, agg)
            run.record_robust(version + 1, report)
            version += 1
            versions[version], published_at, buffer = new, t, []
            if config.buffer_timeout_s is not None:
                push(t + config.buffer_timeout_s, _TIMEOUT, version)
            if version == config.rounds or (config.eval_every
                                            and version % config.eval_every == 0):
                run.history.append({
                    "round": float(version), "time_s": t,
                    "train_loss": float(np.mean([u.train_loss for u, _ in fresh])),
                    "mean_staleness": float(np.mean(stale)),
                    **round_metrics(config.model, new, sites)})
        queued = {u.site for u, _ in buffer}
        for k in sorted(waiting):  # a new version is out: they start again, unless an
            # update of theirs still waits in the buffer (the coordinator refuses a
            # second one, so the node waits for the next version)
            if last_base[k] < version and sites[k].name not in queued:
                waiting.discard(k)
                start(k, t)
        for v in [v for v in versions if v != version and v not in base.values()]:
            del versions[v]
    run.weights = versions[version]
    run.sim_time_s = t
    run.update_share = shares(run.update_share)
    run.weight_share = {n: w / max(version, 1) for n, w in run.weight_share.items()}
    run.rounds = config.rounds  # the baselines' budget: one round per planned version
    return run


def _train(algorithm: FederatedAlgorithm, model: nn.Module, weights: Weights,
           site: PreparedSite, privacy: Mapping[str, SitePrivacy] | None, needs_loss: bool, *,
           seed: int) -> ClientUpdate:
    trainer: LocalTrainer = train_local
    if privacy is not None:
        trainer = partial(privacy[site.name].train, what="an asynchronous update")
    update = algorithm.client_update(model, weights, site.x_train, site.y_train,
                                     site=site.name, seed=seed, trainer=trainer,
                                     report_global_loss=needs_loss,
                                     sample_weight=site.sample_weight)
    return update if privacy is None else privacy[site.name].declare(update)
