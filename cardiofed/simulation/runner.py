"""In-process simulation backend: rounds over the sites, plus the baselines.

The federated loop gathers :class:`~cardiofed.algorithms.ClientUpdate` objects from
the sites sampled each round and hands them to the algorithm's server step, exactly
as the networked coordinator does. Only the simulator may train the pooled baseline
on the union of the sites' rows.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cardiofed.aggregation.robust import SiteAggregation
from cardiofed.aggregation.weighted_mean import shares, tail_average
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms import scaffold as scaffold_cv
from cardiofed.algorithms.base import LocalTrainer
from cardiofed.algorithms.stopping import round_loss
from cardiofed.evaluation.metrics import auc_score, grouped_auc
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import (
    Weights,
    get_weights,
    make_model,
    predict_proba,
    score,
    set_weights,
)
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.clock import SiteSpeed
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import PreparedSite
from cardiofed.training.batched import train_batched
from cardiofed.training.local import train_local
from cardiofed.wire import decode_arrays, encode_arrays


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived deterministically from integers (run seed, round, site)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class FederatedRun:
    """The outcome of a simulated federation."""

    weights: Weights
    history: list[dict[str, float]] = field(default_factory=list)
    participation: dict[str, int] = field(default_factory=dict)
    # Sites' refusals to train (privacy budget exhausted): (round, site, reason).
    refusals: list[tuple[int, str, str]] = field(default_factory=list)
    # Each site's share of the aggregation weight, averaged over rounds.
    weight_share: dict[str, float] = field(default_factory=dict)
    # Each site's share of the updates folded into the final model.
    update_share: dict[str, float] = field(default_factory=dict)
    # Asynchronous runs: updates refused as too stale, (simulated time, site, reason).
    rejected: list[tuple[float, str, str]] = field(default_factory=list)
    # Simulated wall-clock seconds the run took (with site speeds; else 0).
    sim_time_s: float = 0.0
    # Robust aggregation: updates clipped or rejected, (round or version, site, action).
    robust_actions: list[tuple[int, str, str]] = field(default_factory=list)
    # The round training stopped at because the sites' loss stopped improving
    # (config.stop_patience); None when every planned round ran.
    stopped_at: int | None = None
    # The rounds (or versions) that ran: what the baselines' training budget matches.
    rounds: int = 0

    def record_robust(self, rnd: int, report: Sequence[SiteAggregation]) -> None:
        """Keep what robust aggregation clipped or rejected in round (or version) `rnd`."""
        self.robust_actions += [(rnd, r.site, "rejected" if r.rejected else "clipped")
                                for r in report if r.rejected or r.clipped]


def work_samples(site: PreparedSite, config: SimulationConfig) -> int:
    """Samples one local training task processes (for simulated compute time)."""
    if config.local_steps is not None:
        return config.local_steps * min(config.batch_size, site.n_train)
    return config.local_epochs * site.n_train


def site_clocks(sites: Sequence[PreparedSite], config: SimulationConfig,
                speeds: Mapping[str, SiteSpeed]
                ) -> tuple[list[SiteSpeed], list[np.random.Generator]]:
    """Each site's speed (in site order) and its own seeded duration generator."""
    missing = [s.name for s in sites if s.name not in speeds]
    if missing:
        raise ConfigurationError(f"No speed given for sites {missing}.")
    return ([speeds[s.name] for s in sites],
            [np.random.default_rng(derive_seed(config.seed, 30_000, k))
             for k in range(len(sites))])


def round_metrics(model_kind: str, weights: Weights,
                  sites: Sequence[PreparedSite]) -> dict[str, float]:
    """Pooled-test AUC and each site's test AUC for one global model."""
    p_all = score(model_kind, weights, np.concatenate([s.x_test for s in sites]))
    y_all = np.concatenate([s.y_test for s in sites])
    out = {"pooled_auc": auc_score(y_all, p_all)}
    groups = np.repeat(np.arange(len(sites)), [len(s.y_test) for s in sites])
    for s, auc in zip(sites, grouped_auc(y_all, p_all, groups, len(sites)), strict=True):
        out[f"auc/{s.name}"] = float(auc)
    return out


def run_federated(sites: Sequence[PreparedSite], config: SimulationConfig, *,
                  algorithm: FederatedAlgorithm | None = None, progress: bool = False,
                  privacy: Mapping[str, SitePrivacy] | None = None,
                  outbox: Outbox | None = None,
                  site_multipliers: Mapping[str, float] | None = None,
                  on_round: Callable[[int, Weights], None] | None = None,
                  speeds: Mapping[str, SiteSpeed] | None = None) -> FederatedRun:
    """Run at most ``config.rounds`` rounds of ``config``'s algorithm over the sites,
    stopping earlier once converged (``config.stopping_rule()``: the median of the global
    model's loss the sites report has stopped improving; ``stopped_at`` says when).

    Each round samples ``fraction_fit`` of the sites (at least one), lets each train
    from the current global model, and applies the server step. Every
    ``eval_every`` rounds (and after the last) the history records test AUCs and, with
    `privacy`, the epsilon each site has spent. A site whose budget would be exceeded
    refuses the round (recorded in ``refusals``) and the federation goes on without it.

    With `outbox`, every update is serialised as it would be on the wire, handed to
    ``outbox(site, kind, payload)`` and decoded again; the server step uses the decoded
    copy, so what was captured is exactly what the server used.

    With ``algorithm = "scaffold"`` each site's steps are corrected by ``c - c_i`` and the
    control variates are updated after every round (Karimireddy et al. 2020).
    Updates are weighted by ``config.weighting`` (times `site_multipliers`, e.g. from
    the label-quality check); ``weight_share`` records each site's share of the total
    aggregation weight over the run.

    With `speeds` the rounds also run on the virtual clock of
    :mod:`cardiofed.simulation.clock`: a round ends when its slowest site has uploaded,
    and ``history`` records each round's end as ``time_s``.

    The run ends with the mean of the last ``config.average_last`` rounds' global models
    (:func:`~cardiofed.aggregation.tail_average`); ``history`` records each round's own.
    """
    if config.aggregation != "sync":
        raise ConfigurationError("run_federated runs synchronous rounds; use "
                                 "cardiofed.simulation.async_runner.run_async for "
                                 "aggregation = 'async'.")
    rule = config.weighting_rule(dict(site_multipliers or {}))
    scaffold = config.algorithm == "scaffold"
    site_types = {s.name: s.site_type for s in sites}
    mixture: dict[str, float] = {}
    algorithm = algorithm or config.make_algorithm()
    model = make_model(config.model, sites[0].x_train.shape[1], seed=config.seed)
    weights = get_weights(model)
    state = algorithm.init_server(weights)
    c_server = scaffold_cv.zeros_like(weights)
    c_site = {s.name: scaffold_cv.zeros_like(weights) for s in sites} if scaffold else {}
    rng = np.random.default_rng(config.seed)
    tail: deque[Weights] = deque(maxlen=config.average_last)
    run = FederatedRun(weights=weights, participation={s.name: 0 for s in sites},
                       weight_share={s.name: 0.0 for s in sites},
                       update_share={s.name: 0.0 for s in sites})
    n_pick = max(1, round(config.fraction_fit * len(sites)))
    vectorised = config.backend != "loop" and privacy is None and \
        config.vectorised_refusal() is None
    clocks = site_clocks(sites, config, speeds) if speeds is not None else None
    stopping, losses = config.stopping_rule(), []
    needs_loss = config.reports_global_loss
    now = 0.0
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total} rounds"),
                   TextColumn("{task.fields[auc]}"),
                   TimeElapsedColumn(), disable=not progress, transient=False)
    with bar:
        task = bar.add_task(algorithm.name, total=config.rounds, auc="")
        for rnd in range(1, config.rounds + 1):
            chosen = (range(len(sites)) if n_pick == len(sites)
                      else np.sort(rng.choice(len(sites), size=n_pick, replace=False)))
            updates: list[ClientUpdate] = []
            control_deltas: list[Weights] = []
            if clocks is not None:
                now = max(clocks[0][k].finish(now, clocks[0][k].task_seconds(
                    work_samples(sites[k], config), clocks[1][k])) for k in chosen)
            if vectorised:
                for update in batched_updates(algorithm, config.model, weights,
                                              [sites[k] for k in chosen],
                                              [derive_seed(config.seed, rnd, int(k))
                                               for k in chosen], needs_loss):
                    updates.append(update if outbox is None else via_wire(update, rnd, outbox))
                    run.participation[update.site] += 1
            for k in ([] if vectorised else chosen):
                site = sites[k]
                trainer: LocalTrainer = train_local
                if privacy is not None:
                    trainer = partial(privacy[site.name].train, what=f"round {rnd}")
                elif scaffold:
                    trainer = partial(train_local, grad_correction=scaffold_cv.gradient_correction(
                        c_site[site.name], c_server))
                try:
                    update = algorithm.client_update(
                        model, weights, site.x_train, site.y_train, site=site.name,
                        seed=derive_seed(config.seed, rnd, int(k)), trainer=trainer,
                        report_global_loss=needs_loss, sample_weight=site.sample_weight)
                except PrivacyBudgetExceeded as refusal:
                    run.refusals.append((rnd, site.name, str(refusal)))
                    continue
                if privacy is not None:
                    update = privacy[site.name].declare(update)
                updates.append(update if outbox is None else via_wire(update, rnd, outbox))
                run.participation[site.name] += 1
                if scaffold:
                    new_c = scaffold_cv.site_control_update(
                        c_site[site.name], c_server, update.delta, steps=update.num_steps,
                        lr=config.lr)
                    control_deltas.append({n: new_c[n] - c_site[site.name][n] for n in new_c})
                    c_site[site.name] = new_c
            agg_weights: list[float] = []
            if updates:
                agg_weights, mixture = rule.weights(updates, site_types, mixture)
                total = sum(agg_weights)
                for u, w in zip(updates, agg_weights, strict=True):
                    run.weight_share[u.site] += w / total
                    run.update_share[u.site] += 1
            weights, state, report = algorithm.server_update_with_report(weights, updates, state,
                                                                         agg_weights)
            run.record_robust(rnd, report)
            if scaffold:
                c_server = scaffold_cv.server_control_update(c_server, control_deltas,
                                                             len(sites))
            tail.append(weights)
            if on_round is not None:
                on_round(rnd, weights)
            losses.append(round_loss([u.global_loss for u in updates]))
            if stopping is not None and stopping.stalled(losses):
                run.stopped_at = rnd
            last = rnd == config.rounds or run.stopped_at is not None
            if last or (config.eval_every and rnd % config.eval_every == 0):
                record = {"round": float(rnd), "time_s": now,
                          "train_loss": float(np.mean([u.train_loss for u in updates]))
                          if updates and privacy is None else float("nan"),
                          **round_metrics(config.model, weights, sites)}
                for name, site_privacy in (privacy or {}).items():
                    record[f"epsilon/{name}"] = site_privacy.ledger.spent()
                run.history.append(record)
                bar.update(task, auc=f"pooled AUC {record['pooled_auc']:.3f}")
            bar.advance(task)
            if last:
                break
    run.weights = tail_average(list(tail))
    run.sim_time_s = now
    run.update_share = shares(run.update_share)
    run.weight_share = {name: w / rnd for name, w in run.weight_share.items()}
    run.rounds = rnd
    return run


def batched_updates(algorithm: FederatedAlgorithm, model_kind: str, weights: Weights,
                    sites: Sequence[PreparedSite], seeds: Sequence[int],
                    report_global_loss: bool) -> list[ClientUpdate]:
    """One round's client updates of `sites`, all trained at once
    (:func:`~cardiofed.training.batched.train_batched`): the updates the per-site loop's
    :meth:`FederatedAlgorithm.client_update` gives, to float tolerance."""
    result = train_batched(model_kind, weights, [s.x_train for s in sites],
                           [s.y_train for s in sites], algorithm.local, seeds,
                           [s.sample_weight for s in sites])
    losses = (global_losses(model_kind, weights, sites) if report_global_loss
              else [float("nan")] * len(sites))
    return [ClientUpdate(site=s.name, delta=delta, num_samples=s.n_train, num_steps=steps,
                         train_loss=loss, global_loss=global_loss)
            for s, delta, steps, loss, global_loss in zip(
                sites, result.deltas, result.steps, result.mean_loss, losses, strict=True)]


GLOBAL_LOSS_BLOCK_ROWS = 1_000_000


def global_losses(model_kind: str, weights: Weights, sites: Sequence[PreparedSite]
                  ) -> list[float]:
    """Each site's log loss of its training rows under the global model: one model, the
    rows of many sites scored at once (in blocks of about
    :data:`GLOBAL_LOSS_BLOCK_ROWS`); a model built per site cost more than training at
    36,000 sites."""
    model = make_model(model_kind, sites[0].x_train.shape[1], seed=0)
    set_weights(model, weights)
    losses: list[float] = []
    for block in _blocks(sites, GLOBAL_LOSS_BLOCK_ROWS):
        p = np.clip(predict_proba(model, np.concatenate([s.x_train for s in block])),
                    1e-12, 1 - 1e-12)
        y = np.concatenate([s.y_train for s in block])
        rows = np.array([len(s.y_train) for s in block])
        starts = np.cumsum(rows) - rows
        per_row = -(y * np.log(p) + (1 - y) * np.log1p(-p))
        mean = np.full(len(block), np.nan)  # a site without rows has no loss
        some = rows > 0
        if some.any():
            mean[some] = np.add.reduceat(per_row, starts[some]) / rows[some]
        losses += mean.tolist()
    return losses


def _blocks(sites: Sequence[PreparedSite], max_rows: int) -> Iterator[list[PreparedSite]]:
    """`sites` in order, in blocks of at least `max_rows` training rows (the last one
    fewer)."""
    block: list[PreparedSite] = []
    rows = 0
    for site in sites:
        block.append(site)
        rows += len(site.y_train)
        if rows >= max_rows:
            yield block
            block, rows = [], 0
    if block:
        yield block


Outbox = Callable[[str, str, bytes], None]


def update_manifest(update: ClientUpdate) -> dict[str, str]:
    """The manifest fields an update carries: its declared sample size, and its training
    loss and the global model's loss at the site only when there are (a private update
    has neither)."""
    manifest = {"num_samples": str(update.num_samples)}
    for field_name in ("train_loss", "global_loss"):
        value = getattr(update, field_name)
        if math.isfinite(value):
            manifest[field_name] = repr(value)
    return manifest


def via_wire(update: ClientUpdate, rnd: int, outbox: Outbox) -> ClientUpdate:
    """Serialise `update` as on the wire, hand it to `outbox`, and decode it again."""
    payload = encode_arrays(update.delta, {"site": update.site, "round": str(rnd),
                                           **update_manifest(update)})
    outbox(update.site, "update", payload)
    delta, manifest = decode_arrays(payload)
    return replace(update, delta=delta, num_samples=int(manifest["num_samples"]))


def train_centralised(x: np.ndarray, y: np.ndarray, config: SimulationConfig, *,
                      seed: int, epochs: int | None = None,
                      rounds: int | None = None) -> Weights:
    """Train one model on rows held in one place (a single site, or the pooled union).

    The default budget, ``rounds x local_epochs`` epochs (or ``rounds x local_steps``
    steps), is what each site's data sees in the federated run: `rounds` that ran
    (default ``config.rounds``).
    """
    rounds = config.rounds if rounds is None else rounds
    model = make_model(config.model, x.shape[1], seed=config.seed)
    local = config.local_config()
    if epochs is not None:
        local = replace(local, local_epochs=epochs, local_steps=None)
    elif local.local_steps is not None:
        local = replace(local, local_steps=local.local_steps * rounds)
    else:
        local = replace(local, local_epochs=local.local_epochs * rounds)
    train_local(model, x, y, local, seed=seed)
    return get_weights(model)
