"""Many sites trained at once give the models the per-site loop gives."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from cardiofed.models.networks import get_weights, make_model, set_weights
from cardiofed.training.batched import batchable, train_batched
from cardiofed.training.local import LocalTrainingConfig, train_local


def _sites(sizes: list[int], d: int = 5, seed: int = 0
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)).astype(np.float32) for n in sizes]
    ys = [(rng.random(len(x)) < 1 / (1 + np.exp(-x[:, 0]))).astype(np.float32) for x in xs]
    return xs, ys


def _loop(kind: str, start: dict[str, np.ndarray], xs: list[np.ndarray], ys: list[np.ndarray],
          config: LocalTrainingConfig, seeds: list[int],
          weights: list[np.ndarray | None] | None = None) -> list[dict[str, np.ndarray]]:
    out = []
    for k, (x, y, seed) in enumerate(zip(xs, ys, seeds, strict=True)):
        model = make_model(kind, x.shape[1], seed=0)
        set_weights(model, start)
        train_local(model, x, y, config, seed=seed, anchor=start,
                    sample_weight=None if weights is None else weights[k])
        out.append({n: v - start[n] for n, v in get_weights(model).items()})
    return out


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
@pytest.mark.parametrize("settings", [
    {}, {"proximal_mu": 0.1}, {"weight_decay": 0.01}, {"local_steps": 7, "batch_size": 8},
    {"local_epochs": 2, "batch_size": 16}])
def test_batched_training_equals_the_per_site_loop(kind: str, settings: dict[str, object]
                                                   ) -> None:
    sizes = [3, 40, 101, 17]  # a site smaller than the batch, partial last batches
    xs, ys = _sites(sizes)
    config = replace(LocalTrainingConfig(lr=0.1, batch_size=32), **settings)  # type: ignore[arg-type]
    start = get_weights(make_model(kind, 5, seed=3))
    seeds = [11, 12, 13, 14]
    batched = train_batched(kind, start, xs, ys, config, seeds)
    for got, want in zip(batched.deltas, _loop(kind, start, xs, ys, config, seeds),
                         strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=2e-6)
    assert batched.steps == [config.steps_for(n) for n in sizes]


def test_row_weights_are_the_per_site_loop_s() -> None:
    xs, ys = _sites([30, 50])
    rng = np.random.default_rng(1)
    weights = [rng.random(30), None]
    config = LocalTrainingConfig(lr=0.1, batch_size=8)
    start = get_weights(make_model("logistic", 5, seed=0))
    batched = train_batched("logistic", start, xs, ys, config, [1, 2], weights)
    for got, want in zip(batched.deltas, _loop("logistic", start, xs, ys, config, [1, 2],
                                               weights), strict=True):
        np.testing.assert_allclose(got["linear.weight"], want["linear.weight"], atol=2e-6)


def test_what_needs_the_per_site_loop_is_named() -> None:
    assert batchable(LocalTrainingConfig(optimizer="adam")) == \
        "the 'adam' optimiser keeps per-site moments"
    assert batchable(LocalTrainingConfig(momentum=0.9)) == "momentum keeps a per-site velocity"
    assert batchable(LocalTrainingConfig()) is None
    with pytest.raises(ValueError, match="plain SGD; momentum"):
        train_batched("logistic", get_weights(make_model("logistic", 5, seed=0)),
                      *_sites([5]), LocalTrainingConfig(momentum=0.5), [0])


@pytest.mark.parametrize("settings", [
    {}, {"algorithm": "fedprox", "proximal_mu": 0.1}, {"algorithm": "fedadam"},
    {"algorithm": "fedyogi", "server_lr": 0.05}, {"weighting": "type-balanced"},
    {"weighting": "qffl", "qffl_q": 2.0}, {"weighting": "agnostic"}, {"model": "mlp"},
    {"fraction_fit": 0.5}, {"covariate_shift": True}])
def test_a_vectorised_federation_trains_the_per_site_loop_s_model(
        small_federation, settings: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.prepare import prepare_federation
    from cardiofed.simulation.runner import run_federated

    base = {"rounds": 3, "seed": 4, "eval_every": 0, **settings}
    sites = prepare_federation(small_federation,
                               covariate_shift=bool(settings.get("covariate_shift")))
    loop = run_federated(sites, SimulationConfig.create(**base, backend="loop"))
    fast = run_federated(sites, SimulationConfig.create(**base, backend="vectorised"))
    for name, value in loop.weights.items():
        np.testing.assert_allclose(fast.weights[name], value, atol=1e-5)
    assert fast.participation == loop.participation
    assert fast.weight_share == pytest.approx(loop.weight_share, abs=1e-6)


def test_plans_the_vectorised_backend_cannot_run_are_refused_by_name() -> None:
    from cardiofed.exceptions import ConfigurationError
    from cardiofed.simulation.config import SimulationConfig

    with pytest.raises(ConfigurationError, match="backend 'vectorised' cannot run this plan: "
                                                 "DP-SGD clips"):
        SimulationConfig.create(backend="vectorised", dp_epsilon=1.0)
    with pytest.raises(ConfigurationError, match="SCAFFOLD's control variates"):
        SimulationConfig.create(backend="vectorised", algorithm="scaffold")
    assert SimulationConfig.create(optimizer="adam").vectorised_refusal() == \
        "the 'adam' optimiser keeps per-site moments"


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_global_losses_are_each_site_s_loss_whatever_the_blocks(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sites' losses under the global model, scored many sites at a time, are what
    scoring each site alone gives (to float32 tolerance), across block boundaries; a
    site without rows has none."""
    from types import SimpleNamespace

    from cardiofed.models.networks import score
    from cardiofed.simulation import runner

    xs, ys = _sites([30, 1, 0, 57, 12, 40, 0])
    sites = [SimpleNamespace(x_train=x, y_train=y) for x, y in zip(xs, ys, strict=True)]
    weights = get_weights(make_model(kind, 5, seed=3))
    alone = [float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(y) else math.nan
             for x, y in zip(xs, ys, strict=True)
             for p in [np.clip(score(kind, weights, x), 1e-12, 1 - 1e-12)]]
    for block_rows in (1, 31, 70, 10**6):
        monkeypatch.setattr(runner, "GLOBAL_LOSS_BLOCK_ROWS", block_rows)
        got = runner.global_losses(kind, weights, sites)  # type: ignore[arg-type]
        assert got == pytest.approx(alone, rel=1e-6, nan_ok=True)
