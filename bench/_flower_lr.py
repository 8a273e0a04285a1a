"""Flower's simulation engine on the same task: N sites' logistic regression, FedAvg,
one local epoch of mini-batch SGD (batch 32, lr 0.05), per-round wall time. Run by
bench/flower_peer.py with the interpreter of an environment that has flwr[simulation]."""
import json
import resource
import sys
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

data = np.load(sys.argv[1])
n_sites, rounds, out = int(data["n_sites"]), int(sys.argv[2]), sys.argv[3]
marks = []

def sgd(w, b, x, y, seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    for start in range(0, len(y), 32):
        idx = order[start:start + 32]
        z = x[idx] @ w + b
        err = (1 / (1 + np.exp(-z)) - y[idx]) / len(idx)
        w = w - 0.05 * (x[idx].T @ err)
        b = b - 0.05 * err.sum()
    return w, b

class Site(NumPyClient):
    def __init__(self, k):
        self.k = k
    def fit(self, parameters, config):
        x, y = data[f"x{self.k}"], data[f"y{self.k}"]
        w, b = sgd(parameters[0], float(parameters[1][0]), x, y, self.k)
        return [w, np.array([b])], len(y), {}

def client_fn(context: Context):
    return Site(int(context.node_config["partition-id"])).to_client()

class Timed(FedAvg):
    def aggregate_fit(self, server_round, results, failures):
        marks.append(time.perf_counter())
        return super().aggregate_fit(server_round, results, failures)

d = data["x0"].shape[1]
def server_fn(context: Context):
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n_sites,
                     min_available_clients=n_sites,
                     initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32),
                                                                np.zeros(1, np.float32)]))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

started = time.perf_counter()
run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=n_sites, backend_config={"client_resources": {"num_cpus": 1}})
per_round = [float(v) for v in np.diff(marks)]
usage = resource.getrusage
with open(out, "w") as fh:
    json.dump({"n_sites": n_sites, "rounds": rounds, "total_s": time.perf_counter() - started,
               "round_s": per_round,
               "peak_rss_mb_driver": usage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_rss_mb_children": usage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}, fh)
