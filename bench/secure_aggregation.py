"""Secure aggregation: what the protocol costs, and what distributed DP buys.

* Protocol cost, in process: every step of every site of one secure sum
  (:func:`cardiofed.secure.simulate.run_protocol`, X25519 + HKDF + ChaCha20 + AES-GCM +
  Shamir, a SecAgg+ neighbour graph) at 10 to 1,000 sites, a vector of 17 values (a
  logistic model of 15 columns and the record count) and of 10,000, with a fifth of the
  sites dropping after sharing their keys; seconds for all sites together and per site,
  and the coordinator's unmasking alone. No network: the HTTP rounds are not built yet.
  When ``flwr`` is installed, the same sums (up to 200 sites) also run through Flower's
  SecAgg+ (``bench/_flower_secagg.py``: its client stages and its workflow's server
  arithmetic, in process, without its messaging).
* A 36,000-site round simulated: the ring arithmetic the simulator runs
  (:func:`cardiofed.secure.simulate.ring_sum`: each site's encoding and noise share).
* Robust across groups: the demo's 12 hospitals at epsilon 1, one secure sum against
  groups of 3 with the median or the weighted median across them, clean and with one
  malicious site (two attacks, 10 runs each).
* Utility at epsilon 1 (delta 1e-5, every release charged), Framingham in 8 hospitals
  (needs the data): the pooled test split's AUC, calibration slope and
  calibration-in-the-large of the plain federation (FedAvg, lr 0.5), per-site DP-SGD
  (each site its own noise; ``bench/privacy_utility.py``'s Framingham recipe: lr 0.25,
  the mean of the last 20 of 40 rounds' models) and DP-FedSGD over secure sums (the
  noise split over the sites), 40 rounds, clip 2, config seeds 0-4. With distributed DP
  the rounds are gradient steps of the server (step 1), and the model is the mean of the
  last 30 rounds' (``average_last``), chosen at epsilon 1 on another partition of the
  hospitals (6 runs each): the last model left the pooled calibration slope at 0.78 and
  AUC 0.692, the mean of the last 20 at 0.81 and 0.705, of the last 30 at 0.88 and 0.706
  (server steps of 0.5, 2 and 4 and 20 or 80 rounds did worse on one or the other).

    python bench/secure_aggregation.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402
from _flower_secagg import flower_protocol_cost  # noqa: E402
from privacy_utility import SETUPS as PRIVACY_UTILITY  # noqa: E402

from cardiofed.secure.noise import DistributedNoise, integer_sensitivity  # noqa: E402
from cardiofed.secure.protocol import SecureSite, SumPlan  # noqa: E402
from cardiofed.secure.quantise import RingCodec  # noqa: E402
from cardiofed.secure.simulate import ring_sum, run_protocol  # noqa: E402

DELTA = 1e-5
# Flower's SecAgg+ took 48 to 66 s for 200 clients here (ours about 2 s), much of it
# pure-Python Shamir recombination; 1,000 would take many minutes more (not measured),
# so the side-by-side stops at 200.
FLOWER_MAX_SITES = 200
FRAMINGHAM = dict(rounds=40, local_epochs=1, batch_size=512, lr=0.5,
                  standardisation="global", stop_patience=None, eval_every=0)
PER_SITE_RECIPE = {k: PRIVACY_UTILITY["framingham"][0][k] for k in ("lr", "average_last")}
ARMS: dict[str, dict[str, Any]] = {
    "plain (FedAvg)": {},
    "DP-SGD at each site, epsilon 1": {"dp_epsilon": 1.0, **PER_SITE_RECIPE},
    "secure sums, distributed DP, epsilon 1": {"dp_epsilon": 1.0, "secure_aggregation": True,
                                               "average_last": 30}}


def _noise(n: int, length: int, scale: float) -> tuple[RingCodec, DistributedNoise]:
    noise = DistributedNoise(noise_multiplier=1.0, min_sites=max(2, int(0.8 * n)),
                             sensitivity=integer_sensitivity(2.0, scale, length))
    return RingCodec.for_sum(n, bound=2.0 * 10**7, scale=scale,
                             noise_bound=noise.noise_bound(n)), noise


def protocol_cost(n: int, length: int) -> dict[str, Any]:
    """One secure sum of `n` sites' vectors of `length`, a fifth dropping after sharing."""
    codec, noise = _noise(n, length, 2.0**16)
    names = tuple(f"site_{i:05d}" for i in range(n))
    plan = SumPlan(context=b"bench", codec=codec, sites=names, length=length,
                   min_inputs=noise.min_sites)
    rng = np.random.default_rng(0)
    vectors = {name: rng.normal(0, 1, length) for name in names}
    dropped = names[: n // 5]
    started = time.perf_counter()  # key generation included, as on Flower's side
    sites = {name: SecureSite(name, plan) for name in names}
    result, _ = run_protocol(sites, vectors, dict.fromkeys(names, rng), noise=noise,
                             drop_before_input=dropped)
    seconds = time.perf_counter() - started
    survivors = [vectors[name] for name in names if name not in dropped]
    error = float(np.max(np.abs(result.total - np.sum(survivors, axis=0))))
    started = time.perf_counter()
    np.sum(survivors, axis=0)
    plain = time.perf_counter() - started
    return {"sites": n, "length": length, "neighbours": plan.neighbours,
            "threshold": plan.threshold, "dropped": len(dropped), "ring_bits": codec.bits,
            "seconds": seconds, "seconds_per_site": seconds / n, "plain_sum_s": plain,
            "max_abs_noise": error, "noise_sd": noise.site_sigma * np.sqrt(n - len(dropped))
            / codec.scale}


def national_round(n: int, length: int) -> dict[str, Any]:
    """The simulator's arithmetic of one secure round at `n` sites."""
    codec, noise = _noise(n, length, 2.0**12)
    rng = np.random.default_rng(1)
    vectors = {f"s{i}": rng.normal(0, 1, length) for i in range(n)}
    started = time.perf_counter()
    ring_sum(codec, vectors, dict.fromkeys(vectors, rng), noise)
    return {"sites": n, "length": length, "ring_bits": codec.bits,
            "seconds": time.perf_counter() - started}


def utility(data_dir: str | None, seeds: list[int], smoke: bool) -> dict[str, Any] | None:
    from cardiofed.data.catalog import load_dataset
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.exceptions import DataValidationError
    from cardiofed.experiments.acceptability import assess
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import FEDERATED, run_experiment

    try:
        data = (synthetic_federation(n_sites=4, seed=0, size_scale=0.3) if smoke
                else load_dataset("framingham", seed=0, data_dir=data_dir))
    except (DataValidationError, FileNotFoundError) as exc:
        print(f"Framingham utility skipped: {exc}")
        return None
    settings = {**FRAMINGHAM, "rounds": 3} if smoke else FRAMINGHAM
    out: dict[str, Any] = {}
    for arm, extra in ARMS.items():
        runs = []
        for seed in seeds:
            dp = {"dp_delta": DELTA} if "dp_epsilon" in extra else {}
            if smoke:
                extra = {**extra, "average_last": min(extra.get("average_last", 1), 3)}
            config = SimulationConfig.create(**{**settings, **extra, **dp, "seed": seed})
            result = run_experiment(data, config, baselines=False)
            y, p = (np.concatenate(parts) for parts in zip(
                *(m[FEDERATED] for m in result.predictions.values()), strict=True))
            auc, slope, citl = (c.value for c in assess(y, p).checks)
            runs.append({"seed": seed, "auc": auc, "slope": slope, "citl": citl,
                         "epsilon_max_spent": max((v["epsilon_spent"]
                                                   for v in result.privacy.values()),
                                                  default=0.0)})
        out[arm] = {"runs": runs, **{f"mean_{k}": statistics.fmean(r[k] for r in runs)
                                     for k in ("auc", "slope", "citl")}}
    return out


ATTACKS = {  # what the malicious site sends instead of its vector (gradient sum, count)
    "vector x -1000": lambda v: -1000.0 * v,
    "gradient x -10, count kept": lambda v: np.concatenate([-10.0 * v[:-1], v[-1:]]),
}
RULES = {"one sum": {},
         "groups of 3, median": {"secure_group_size": 3, "robust_rule": "median"},
         "groups of 3, weighted median": {"secure_group_size": 3,
                                          "robust_rule": "weighted-median",
                                          "robust_byzantine": 1}}


def robustness(runs: int, smoke: bool) -> dict[str, Any]:
    """The demo's 12 synthetic hospitals at epsilon 1: pooled-test AUC of one secure sum
    and of groups of 3 with a robust rule across them (the median; the weighted median, a
    networked study's default), clean and with the largest site attacking: its vector
    times -1000 (a sign flip far beyond any clip; its record count turns negative, which
    the count-weighted rules then weigh least), or its gradient sum times -10 with its
    record count kept (an attacker that knows the rule)."""
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import site_privacy
    from cardiofed.simulation.prepare import prepare_federation
    from cardiofed.simulation.secure_runner import run_secure_sgd

    data = synthetic_federation(n_sites=12, seed=0, size_scale=0.1 if smoke else 1.0)
    bad = max(data.sites, key=lambda s: s.n_train).name
    out: dict[str, Any] = {"malicious": bad}
    for label, extra in RULES.items():
        for attack in (None, *ATTACKS):
            aucs = []
            for seed in range(runs):
                config = SimulationConfig.create(dp_epsilon=1.0, dp_delta=DELTA, seed=seed,
                                                 secure_aggregation=True, eval_every=0,
                                                 rounds=3 if smoke else 40, **extra)
                privacy = site_privacy(data, config)
                sites = prepare_federation(data, privacy=privacy,
                                           secure_dropout=config.secure_dropout)
                run = run_secure_sgd(sites, config, privacy=privacy,
                                     attack=None if attack is None
                                     else _by(bad, ATTACKS[attack]))
                aucs.append(run.history[-1]["pooled_auc"])
            out[f"{label}, {attack or 'clean'}"] = aucs
    return out


def _by(bad: str, change: Callable[[np.ndarray], np.ndarray]
        ) -> Callable[[str, np.ndarray], np.ndarray]:
    """An attack: site `bad` sends `change(vector)` instead of its vector."""
    return lambda site, vector: change(vector) if site == bad else vector


def _robust_rows(robust: dict[str, Any]) -> list[list[Any]]:
    """Per rule and attack: the clean and attacked AUCs, and the attack's cost with
    Welch's p (clean against attacked)."""
    rows = []
    for label in RULES:
        clean = robust[f"{label}, clean"]
        for attack in ATTACKS:
            attacked = robust[f"{label}, {attack}"]
            rows.append([label, attack, statistics.fmean(clean), statistics.fmean(attacked),
                         *_welch(clean, attacked)])
    return rows


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means and Welch's two-sided p-value (the runs' noise is fresh)."""
    from scipy.stats import ttest_ind

    return statistics.fmean(a) - statistics.fmean(b), float(
        ttest_ind(a, b, equal_var=False).pvalue)


def _comparisons(useful: dict[str, Any]) -> list[list[Any]]:
    arms = list(useful)
    rows = []
    for first, second in ((arms[2], arms[1]), (arms[0], arms[2])):
        for key in ("auc", "slope", "citl"):
            diff, p = _welch([r[key] for r in useful[first]["runs"]],
                             [r[key] for r in useful[second]["runs"]])
            rows.append([f"{first} - {second}", key, diff, p])
    return rows


def _range(arm: dict[str, Any], key: str) -> str:
    values = [r[key] for r in arm["runs"]]
    return f"{min(values):.3f} to {max(values):.3f}"


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    add_smoke(parser)
    args = parser.parse_args()
    sizes, long, national, seeds = [10, 50, 200, 1000], 10_000, 36_000, [0, 1, 2, 3, 4]
    if args.smoke:
        sizes, long, national, seeds = [5], 100, 50, [0]
    cost = [protocol_cost(n, 17) for n in sizes] + [protocol_cost(sizes[min(2, len(sizes) - 1)],
                                                                  long)]
    flower = [] if args.smoke else [
        run for c in cost if c["sites"] <= FLOWER_MAX_SITES
        if (run := flower_protocol_cost(c["sites"], c["length"], c["neighbours"],
                                        c["threshold"])) is not None]
    scale = national_round(national, 17)
    useful = utility(args.data_dir, seeds, args.smoke)
    robust_runs = 2 if args.smoke else 10  # cheap: more runs than the utility's
    robust = robustness(robust_runs, args.smoke)
    results = {"protocol": cost, "flower_secaggplus": flower, "national": scale,
               "utility": useful, "robustness": robust}
    md = ["# Secure aggregation\n",
          "One secure sum in process, every step of every site (a fifth of the sites "
          "dropping after sharing their keys; the survivors' sum recovered to the noise):\n",
          markdown_table(["sites", "values", "neighbours", "threshold", "ring bits",
                          "seconds, all sites", "seconds per site", "plain sum s"],
                         [[c["sites"], c["length"], c["neighbours"], c["threshold"],
                           c["ring_bits"], c["seconds"], c["seconds_per_site"],
                           c["plain_sum_s"]] for c in cost], digits=4),
          f"\nA {scale['sites']:,}-site round simulated (ring arithmetic, each site's "
          f"encoding and noise share): {scale['seconds']:.2f} s.\n"]
    if flower:
        ours = {(c["sites"], c["length"]): c["seconds"] for c in cost}
        md += [f"\nThe same sums with Flower's SecAgg+ (flwr {_flower_version()}: its client "
               f"stages and its workflow's server arithmetic, in process; each client "
               f"masking with as many neighbours, the same threshold and dropouts; not run "
               f"above {FLOWER_MAX_SITES} sites):\n",
               markdown_table(["sites", "values", "Flower s, all sites", "CardioFed s",
                               "Flower / CardioFed", "Flower's unmasking s",
                               "Flower's max abs error"],
                              [[f["sites"], f["length"], f["seconds"],
                                ours[f["sites"], f["length"]],
                                f["seconds"] / ours[f["sites"], f["length"]], f["unmask_s"],
                                f["max_abs_error"]] for f in flower], digits=4)]
    if useful is not None:
        md += ["\nPooled-test AUC, calibration slope and calibration-in-the-large "
               f"(means over config seeds {seeds}):\n",
               markdown_table(["federation", "AUC", "AUC range", "slope", "slope range",
                               "CITL", "CITL range"],
                              [[arm, v["mean_auc"], _range(v, "auc"), v["mean_slope"],
                                _range(v, "slope"), v["mean_citl"], _range(v, "citl")]
                               for arm, v in useful.items()], digits=3),
               "\nDifferences of the means, with Welch's two-sided p (a difference is called "
               "significant only below 0.05):\n",
               markdown_table(["comparison", "measure", "difference", "p"],
                              _comparisons(useful), digits=3)]
    md += [f"\nRobust across groups, the demo's 12 synthetic hospitals at epsilon 1 "
           f"({robust['malicious']}, the largest, attacks; pooled-test AUC, means over "
           f"{robust_runs} runs; cost = clean - attacked, with Welch's two-sided p):\n",
           markdown_table(["aggregation", "attack", "clean", "attacked", "cost", "p"],
                          _robust_rows(robust), digits=3)]
    write_results("secure_aggregation", results, "\n".join(md))


if __name__ == "__main__":
    main()
