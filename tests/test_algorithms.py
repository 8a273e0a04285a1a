"""Federated algorithms (client step, server step) and local training."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cardiofed.aggregation import ServerAdaptive, ServerSGD
from cardiofed.algorithms import ALGORITHMS, ClientUpdate, make_algorithm
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.networks import Weights, get_weights, make_model
from cardiofed.training.local import LocalTrainingConfig, train_local

N_FEATURES = 5


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    """200 standardised rows whose label depends on the first feature."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=200) > 0).astype(np.float32)
    return x, y


def norm(weights: Weights) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                             for v in weights.values())))


# --- Registry ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "server", "server_lr", "mu"), [
    ("fedavg", ServerSGD, 1.0, 0.0),
    ("fedprox", ServerSGD, 1.0, 0.01),
    ("fedadam", ServerAdaptive, 0.01, 0.0),
    ("fedyogi", ServerAdaptive, 0.01, 0.0),
])
def test_make_algorithm_by_name(name: str, server: type, server_lr: float, mu: float) -> None:
    # Default server learning rates: 1.0 for FedAvg/FedProx, 0.01 for FedAdam/FedYogi.
    algorithm = make_algorithm(name, LocalTrainingConfig(proximal_mu=0.5))

    assert algorithm.name == name
    assert isinstance(algorithm.server, server)
    assert algorithm.server.lr == server_lr  # type: ignore[attr-defined]
    assert algorithm.local.proximal_mu == mu  # only FedProx keeps a proximal term


def test_registry_lists_every_algorithm() -> None:
    assert ALGORITHMS == ("fedavg", "fedprox", "fedadam", "fedyogi", "scaffold")


def test_adaptive_variant_follows_the_name() -> None:
    assert make_algorithm("fedyogi", LocalTrainingConfig()).server.name == "yogi"
    assert make_algorithm("fedadam", LocalTrainingConfig(), server_lr=0.1).server.name == "adam"


def test_unknown_algorithm_name() -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "The 'algorithm' parameter must be one of ['fedavg', 'fedprox', 'fedadam', "
            "'fedyogi', 'scaffold']; got 'fedsgd'.")):
        make_algorithm("fedsgd", LocalTrainingConfig())


@pytest.mark.parametrize("mu", [0.0, -0.5])
def test_fedprox_needs_a_positive_proximal_mu(mu: float) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            f"The 'proximal_mu' parameter must be > 0 for fedprox; got {mu!r}.")):
        make_algorithm("fedprox", LocalTrainingConfig(), proximal_mu=mu)


# --- Client and server steps ------------------------------------------------------------------

def test_client_update_is_local_minus_global(rows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = rows
    local = LocalTrainingConfig(lr=0.1, batch_size=32, local_epochs=2)
    algorithm = make_algorithm("fedavg", local)
    model = make_model("logistic", N_FEATURES, seed=0)
    global_weights = get_weights(model)

    update = algorithm.client_update(model, global_weights, x, y, site="a", seed=1)

    trained = get_weights(model)
    assert update.site == "a"
    assert update.num_samples == 200
    assert update.num_steps == 2 * 7  # 2 epochs x ceil(200 / 32)
    assert update.train_loss > 0
    for k in global_weights:
        np.testing.assert_array_equal(update.delta[k], trained[k] - global_weights[k])
    assert norm(update.delta) > 0


def test_fedprox_with_large_mu_stays_near_the_global_model(
        rows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = rows
    # mu = 5 with lr = 0.1: the proximal pull (lr * mu = 0.5 per step) dominates but is stable.
    local = LocalTrainingConfig(lr=0.1, batch_size=16, local_epochs=5)
    global_weights = get_weights(make_model("logistic", N_FEATURES, seed=0))

    def drift(name: str, mu: float) -> float:
        model = make_model("logistic", N_FEATURES, seed=0)
        update = make_algorithm(name, local, proximal_mu=mu).client_update(
            model, global_weights, x, y, site="a", seed=1)
        return norm(update.delta)

    fedavg, fedprox = drift("fedavg", 0.01), drift("fedprox", 5.0)

    assert fedprox < 0.2 * fedavg


def test_server_update_weights_clients_by_sample_size() -> None:
    algorithm = make_algorithm("fedavg", LocalTrainingConfig())
    global_weights = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    updates = [
        ClientUpdate(site="big", delta={"w": np.array([1.0, 0.0], dtype=np.float32)},
                     num_samples=30, num_steps=1, train_loss=0.5),
        ClientUpdate(site="small", delta={"w": np.array([0.0, 1.0], dtype=np.float32)},
                     num_samples=10, num_steps=1, train_loss=0.7),
    ]
    state = algorithm.init_server(global_weights)

    new, state = algorithm.server_update(global_weights, updates, state)

    # mean delta = (30 * [1, 0] + 10 * [0, 1]) / 40 = [0.75, 0.25]; server lr 1.
    np.testing.assert_allclose(new["w"], [1.75, 1.25], rtol=1e-7)
    assert state.step == 1


def test_server_update_without_updates_keeps_the_model() -> None:
    algorithm = make_algorithm("fedadam", LocalTrainingConfig())
    weights = {"w": np.array([1.0], dtype=np.float32)}
    state = algorithm.init_server(weights)

    new, after = algorithm.server_update(weights, [], state)

    assert new is weights and after is state


# --- Local training -----------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"lr": 0}, "The 'lr' parameter must be > 0; got 0."),
    ({"batch_size": 0}, "The 'batch_size' parameter must be >= 1; got 0."),
    ({"local_epochs": 0}, "The 'local_epochs' parameter must be >= 1; got 0."),
    ({"local_steps": 0}, "The 'local_steps' parameter must be >= 1 or None; got 0."),
    ({"optimizer": "rmsprop"}, "The 'optimizer' parameter must be 'sgd' or 'adam'; "
                               "got 'rmsprop'."),
    ({"momentum": 1.0}, "The 'momentum' parameter must be in [0, 1); got 1.0."),
    ({"weight_decay": -1}, "The 'weight_decay' parameter must be >= 0; got -1."),
    ({"proximal_mu": -0.1}, "The 'proximal_mu' parameter must be >= 0; got -0.1."),
])
def test_local_training_config_validation(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        LocalTrainingConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(("settings", "n", "steps"), [
    ({"batch_size": 32, "local_epochs": 1}, 100, 4),    # ceil(100 / 32)
    ({"batch_size": 32, "local_epochs": 3}, 100, 12),   # 3 x 4
    ({"batch_size": 50, "local_epochs": 2}, 100, 4),    # exact multiple: 2 x 2
    ({"batch_size": 64, "local_epochs": 1}, 10, 1),     # batch larger than the site
    ({"batch_size": 8, "local_steps": 5}, 1000, 5),     # fixed steps ignore the size
])
def test_steps_for(settings: dict[str, int], n: int, steps: int) -> None:
    assert LocalTrainingConfig(**settings).steps_for(n) == steps  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_local_is_deterministic_by_seed(rows: tuple[np.ndarray, np.ndarray],
                                              optimizer: str) -> None:
    x, y = rows
    config = LocalTrainingConfig(lr=0.05, batch_size=16, local_epochs=2,
                                 optimizer=optimizer)  # type: ignore[arg-type]

    def trained(seed: int) -> Weights:
        model = make_model("mlp", N_FEATURES, seed=3)
        result = train_local(model, x, y, config, seed=seed)
        assert result.num_steps == config.steps_for(len(y))
        return get_weights(model)

    first, again, other = trained(7), trained(7), trained(8)

    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_train_local_lowers_the_loss(rows: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = rows
    config = LocalTrainingConfig(lr=0.1, batch_size=200, local_steps=1)
    model = make_model("logistic", N_FEATURES, seed=0)
    before = train_local(model, x, y, config, seed=0).mean_loss

    after = train_local(model, x, y, LocalTrainingConfig(lr=0.1, batch_size=200,
                                                         local_steps=50), seed=0)

    assert after.mean_loss < before


def test_train_local_needs_rows() -> None:
    model = make_model("logistic", N_FEATURES, seed=0)

    with pytest.raises(ValueError, match=re.escape(
            "train_local needs at least one training row; got 0.")):
        train_local(model, np.empty((0, N_FEATURES)), np.empty(0), LocalTrainingConfig(),
                    seed=0)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_plain_sgd_is_torch_sgd_bit_for_bit(rows: tuple[np.ndarray, np.ndarray], kind: str,
                                            proximal_mu: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from cardiofed.training import local

    x, y = rows
    config = LocalTrainingConfig(lr=0.07, batch_size=16, local_epochs=2,
                                 proximal_mu=proximal_mu)
    anchor = get_weights(make_model(kind, N_FEATURES, seed=5))
    correction = {k: np.full_like(v, 0.01) for k, v in anchor.items()}

    def trained() -> Weights:
        model = make_model(kind, N_FEATURES, seed=3)
        local.train_local(model, x, y, config, seed=9, anchor=anchor,
                          grad_correction=correction)
        return get_weights(model)

    plain = trained()
    monkeypatch.setattr(local, "_optimizer", lambda params, c: torch.optim.SGD(params, lr=c.lr))
    reference = trained()

    for k in plain:
        np.testing.assert_array_equal(plain[k], reference[k])
