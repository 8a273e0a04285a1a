"""Attacks of an *active* coordinator on a hospital node (bench/privacy_attacks.py, 7-12).

Each returns a positive control (the behaviour before the release gate and the one
sealed ledger, rebuilt here from the same library functions without the gate, which
must leak) and the protected path (the node's current code, which must not), as a dict
with ``row`` (control, protected) and ``passed``. Counts and rates only.

7. NaN channel in training: a preprocessor whose age scale overflows float32 exactly for
   ages above a threshold T; per-record clipping does not bound the NaN and noise does not
   hide it, so "is the release finite?" answers "is anyone older than T?". Binary search
   recovers the training maxima of age, systolic BP and cholesterol.
8. The same channel in a private attribution step (a standard deviation of 1e-307).
9. The evaluation crash channel: scores that are NaN for ages above T crashed the node
   before anything was charged; uncharged crashes answer the same question.
10. Ledger binding: 11 studies of one hospital, with other column orders, column subsets,
    attribution covariates, enrolment names and a refreshed export.
11. The exact record count: num_samples without a statistics release, and the epsilon a
    DP-SGD schedule planned on the exact count spends (published on the model card).
12. Path traversal through a site name, and exact releases a non-private node refuses
    (a batch of 1, exact attribution sums) unless it opted in.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cardiofed.causal.study import AttributionPlan, SiteArrays, check_state, release, site_step
from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.evaluation.private_metrics import release_score_histograms, score_bin_edges
from cardiofed.exceptions import CardioFedError, PrivacyBudgetExceeded, TaskRefused
from cardiofed.models.networks import Weights, get_weights, make_model, score, set_weights
from cardiofed.names import is_safe_name
from cardiofed.node.task_policy import check_exact_releases
from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget, open_site_ledger
from cardiofed.privacy.dp_sgd import DPConfig, dp_schedule, train_local_dp
from cardiofed.privacy.release_gate import bounded_rows, check_preprocessor, check_weights
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.config import SimulationConfig
from cardiofed.training.local import LocalTrainingConfig

EPSILON, DELTA = 1.0, 1e-5
BOUND = (math.exp(EPSILON) - 1 + 2 * DELTA) / (math.exp(EPSILON) + 1)  # 0.462
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fresh_privacy(n: int, released_n: float, local: LocalTrainingConfig) -> SitePrivacy:
    """A site's DP wrapper with a whole budget of EPSILON for one release, after its
    statistics release (negligible charge) gave `released_n`."""
    ledger = PrivacyLedger(site="attacked", n_records=n,
                           budget=SiteBudget(epsilon_max=EPSILON, delta=DELTA))
    ledger.record([GaussianEvent(noise_multiplier=1e4, sample_rate=1.0, steps=1)],
                  "statistics release", kind="statistics", released_n=released_n)
    return SitePrivacy(ledger=ledger, local=local, rounds=1)


def _binary_search(low: float, high: float, says_above: Callable[[float], bool]) -> float:
    """The smallest integer T in [low, high] for which nobody is above T, by queries
    "is anyone above T?"."""
    lo, hi = math.floor(low), math.ceil(high)
    while lo < hi:
        mid = (lo + hi) // 2
        if says_above(mid):
            lo = mid + 1
        else:
            hi = mid
    return float(lo)


# -- 7. training ------------------------------------------------------------------------
def _overflow_scale(width: float, threshold: float, largest: float) -> tuple[float, float]:
    """(mean, scale) mapping T + 0.5 to `largest` (the float type's maximum) and every
    value down to T - width inside the type's range: a standardised value overflows to
    inf exactly above T (integer values)."""
    scale = width / largest
    return threshold + 0.5 - width, scale


def _overflow_preprocessor(pre: Preprocessor, column: int, threshold: float,
                           width: float) -> Preprocessor:
    mean, std = pre.mean.copy(), pre.std.copy()
    mean[column], std[column] = _overflow_scale(width, threshold, FLOAT32_MAX)
    return Preprocessor(fill=pre.fill, mean=mean, std=std, form=pre.form)


def _width(bounds: tuple[float, float]) -> float:
    return float(bounds[1] - bounds[0]) + 1.0


def _probe_weights(d: int, column: int) -> Weights:
    w = {"linear.weight": np.zeros((1, d), np.float32), "linear.bias": np.zeros(1, np.float32)}
    w["linear.weight"][0, column] = 1.0
    return w


def _train_release(rows: np.ndarray, y: np.ndarray, pre: Preprocessor, weights: Weights,
                   ranges: list[tuple[float, float]], guarded: bool) -> str:
    """One full-batch DP-SGD step on the coordinator's numbers: 'non-finite', 'finite' or
    'refused'. Unguarded: the node before the gate (transform, flat clipping)."""
    local = LocalTrainingConfig(lr=0.05, batch_size=10_000, local_steps=1)
    model = make_model("logistic", pre.n_columns, seed=0)
    if not guarded:
        sigma = calibrate_noise(target_epsilon=EPSILON, delta=DELTA, sample_rate=1.0, steps=1)
        with np.errstate(all="ignore"):
            x = pre.transform(rows)
        set_weights(model, weights)
        train_local_dp(model, x, y, local, DPConfig(noise_multiplier=sigma, max_grad_norm=1.0,
                                                    intercept_clip=None))
    else:
        try:
            checked = check_preprocessor(pre, ranges)
            set_weights(model, check_weights(weights, get_weights(model)))
        except TaskRefused:
            return "refused"
        privacy = _fresh_privacy(len(y), float(len(y)), local)
        privacy.train(model, bounded_rows(checked, rows, ranges), y, local, seed=0)
    finite = all(np.isfinite(v).all() for v in get_weights(model).values())
    return "finite" if finite else "non-finite"


def nan_channel_training(dataset: FederatedDataset, raw: SiteData, pre: Preprocessor
                         ) -> dict[str, Any]:
    names = dataset.feature_names
    ranges = dataset.feature_ranges
    columns = [names.index(c) for c in ("age", "systolic_bp", "total_cholesterol")
               if c in names]
    y = raw.y_train.astype(np.float32)
    out: dict[str, Any] = {"setting": "full-batch DP-SGD step at epsilon 1 per query; "
                                      "scale 1e-38 below a threshold"}
    for label, guarded in (("control", False), ("protected", True)):
        recovered, outcomes = 0, []
        for j in columns:
            truth = float(np.nanmax(raw.x_train[:, j]))

            def above(t: float, j: int = j, guarded: bool = guarded,
                      outcomes: list[str] = outcomes) -> bool:
                result = _train_release(raw.x_train, y,
                                        _overflow_preprocessor(pre, j, t, _width(ranges[j])),
                                        _probe_weights(pre.n_columns, j), ranges, guarded)
                outcomes.append(result)
                return result == "non-finite"

            found = _binary_search(ranges[j][0], ranges[j][1], above)
            recovered += int(found == math.ceil(truth))
        # Neighbouring data sets: with and without the oldest patient, T between the two
        # oldest ages: does "non-finite" tell them apart?
        j = columns[0]
        ages = raw.x_train[:, j]
        oldest = int(np.nanargmax(ages))
        second = float(np.nanmax(np.delete(ages, oldest)))
        t = second if second < ages[oldest] else second - 1
        keep = np.arange(len(y)) != oldest
        probe = (_overflow_preprocessor(pre, j, t, _width(ranges[j])),
                 _probe_weights(pre.n_columns, j))
        with_p = _train_release(raw.x_train, y, *probe, ranges, guarded) == "non-finite"
        without = _train_release(raw.x_train[keep], y[keep], *probe, ranges,
                                 guarded) == "non-finite"
        out[label] = {"maxima_recovered": recovered, "of": len(columns),
                      "queries": len(outcomes),
                      "non_finite_releases": outcomes.count("non-finite"),
                      "refused": outcomes.count("refused"),
                      "advantage": float(abs(int(with_p) - int(without)))}
    c, p = out["control"], out["protected"]
    out["passed"] = (c["maxima_recovered"] == c["of"] and p["maxima_recovered"] == 0
                     and p["non_finite_releases"] == 0 and p["advantage"] <= BOUND)
    out["row"] = [f"exact maxima of {c['maxima_recovered']}/{c['of']} columns in "
                  f"{c['queries']} releases; neighbours told apart with advantage "
                  f"{c['advantage']:.2f}",
                  f"{p['maxima_recovered']}/{p['of']} maxima; {p['non_finite_releases']} "
                  f"non-finite of {p['queries']} releases (all charged); advantage "
                  f"{p['advantage']:.2f} (bound {BOUND:.2f})"]
    return out


# -- 8. attribution ---------------------------------------------------------------------
CANONICAL = ["age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp",
             "bp_treated", "current_smoker", "diabetes"]
PRIVATE_PLAN = {"treatment": "lipid_lowering", "covariates": CANONICAL, "private": True,
                "methods": ["overlap", "iptw"], "trim": 0.05}


def _attribution_release(rows: SiteArrays, plan: AttributionPlan, state: dict[str, Any],
                         ranges: list[tuple[float, float]], guarded: bool) -> str:
    sigma = calibrate_noise(target_epsilon=EPSILON, delta=DELTA, sample_rate=1.0, steps=1)
    rng = np.random.default_rng()
    if not guarded:
        with np.errstate(all="ignore"):
            arrays = release(plan, state, site_step(plan, state, rows, 0, ranges), sigma, rng)
    else:
        try:
            check_state(plan, state, ranges)
        except (ValueError, TypeError, CardioFedError):
            return "refused"
        ledger = PrivacyLedger(site="attacked", n_records=len(rows.outcome),
                               budget=SiteBudget(epsilon_max=EPSILON, delta=DELTA))
        privacy = SitePrivacy(ledger=ledger, study="att")
        arrays = privacy.release_attribution(
            plan, state, lambda: site_step(plan, state, rows, 0, ranges), "newton")
    finite = all(np.isfinite(v).all() for v in arrays.values())
    return "finite" if finite else "non-finite"


def nan_channel_attribution() -> dict[str, Any]:
    from cardiofed.causal.sources import synthetic_sites
    from cardiofed.data.catalog import study_columns

    plan = AttributionPlan.model_validate(PRIVATE_PLAN)
    sites, columns = synthetic_sites(4, seed=0)
    rows = sites[0]
    names, ranges = study_columns("synthetic")
    assert names == list(columns)
    truth = float(rows.x[:, 0].max())
    k = len(columns)
    float64_max = float(np.finfo(np.float64).max)

    def state(threshold: float) -> dict[str, Any]:
        # (age - mean) / sd overflows float64 exactly above T (other columns ordinary).
        mean, sd = _overflow_scale(_width(ranges[0]), threshold, float64_max)
        means = [mean, *[(lo + hi) / 2 for lo, hi in ranges[1:]]]
        sds = [sd, *[(hi - lo) / 4 for lo, hi in ranges[1:]]]
        return {"step": "newton", "columns": list(columns), "iterations": 1,
                "inputs": {"mean": means, "sd": sds, "beta": [0.0] * (k + 1)}}

    out: dict[str, Any] = {"setting": "private attribution, Newton step, epsilon 1 per query"}
    for label, guarded in (("control", False), ("protected", True)):
        outcomes: list[str] = []

        def above(t: float, guarded: bool = guarded, outcomes: list[str] = outcomes) -> bool:
            result = _attribution_release(rows, plan, state(t), ranges, guarded)
            outcomes.append(result)
            return result == "non-finite"

        found = _binary_search(ranges[0][0], ranges[0][1], above)
        out[label] = {"max_recovered": bool(found == math.ceil(truth)),
                      "queries": len(outcomes),
                      "non_finite_releases": outcomes.count("non-finite"),
                      "refused": outcomes.count("refused")}
    c, p = out["control"], out["protected"]
    out["passed"] = c["max_recovered"] and not p["max_recovered"] \
        and p["non_finite_releases"] == 0
    out["row"] = [f"the maximum age {'recovered' if c['max_recovered'] else 'not found'} in "
                  f"{c['queries']} releases ({c['non_finite_releases']} non-finite)",
                  f"{'recovered' if p['max_recovered'] else 'not recovered'}: "
                  f"{p['refused']}/{p['queries']} states refused by the gate (the same for "
                  f"any data), {p['non_finite_releases']} non-finite"]
    return out


# -- 9. evaluation ----------------------------------------------------------------------
def _nan_scores_inputs(pre: Preprocessor, column: int, other: int, threshold: float,
                       width: float) -> tuple[Preprocessor, Weights]:
    """Scores NaN exactly for patients above T: logit = z_T - z_inf, z_T inf above T and
    z_inf inf for everybody (inf - inf = NaN; otherwise -inf, a score of 0)."""
    shifted = _overflow_preprocessor(pre, column, threshold, width)
    mean, std = shifted.mean.copy(), shifted.std.copy()
    mean[other], std[other] = -1e6, 1e-38
    w = _probe_weights(pre.n_columns, column)
    w["linear.weight"][0, other] = -1.0
    return Preprocessor(fill=pre.fill, mean=mean, std=std, form=pre.form), w


def _evaluation_release(raw: SiteData, pre: Preprocessor, weights: Weights,
                        ranges: list[tuple[float, float]], guarded: bool,
                        charged: list[int]) -> str:
    edges = score_bin_edges()
    if not guarded:  # the old order: compute, then charge; a crash charged nothing
        with np.errstate(all="ignore"):
            probs = score("logistic", weights, pre.transform(raw.x_test))
        try:
            release_score_histograms(raw.y_test, probs, edges, noise_std=1.0,
                                     rng=np.random.default_rng())
        except ValueError:
            return "crashed"
        charged.append(1)
        return "released"
    try:
        checked = check_preprocessor(pre, ranges)
        model = make_model("logistic", pre.n_columns, seed=0)
        checked_weights = check_weights(weights, get_weights(model))
    except TaskRefused:
        return "refused"
    ledger = PrivacyLedger(site="attacked", n_records=len(raw.y_test),
                           budget=SiteBudget(epsilon_max=EPSILON, delta=DELTA))
    with np.errstate(over="ignore"):
        probs = score("logistic", checked_weights, bounded_rows(checked, raw.x_test, ranges))
    SitePrivacy(ledger=ledger, study="s").release_evaluation(raw.y_test, probs, edges)
    charged.append(len(ledger.entries))
    return "released"


def evaluation_crash_channel(dataset: FederatedDataset, raw: SiteData, pre: Preprocessor
                             ) -> dict[str, Any]:
    names, ranges = dataset.feature_names, dataset.feature_ranges
    j, other = names.index("age"), names.index("systolic_bp")
    truth = float(np.nanmax(raw.x_test[:, j]))
    out: dict[str, Any] = {"setting": "evaluation tasks whose scores are NaN above an age"}
    for label, guarded in (("control", False), ("protected", True)):
        outcomes: list[str] = []
        charged: list[int] = []

        def above(t: float, guarded: bool = guarded, outcomes: list[str] = outcomes,
                  charged: list[int] = charged) -> bool:
            result = _evaluation_release(
                raw, *_nan_scores_inputs(pre, j, other, t, _width(ranges[j])), ranges,
                guarded, charged)
            outcomes.append(result)
            return result == "crashed"

        found = _binary_search(ranges[j][0], ranges[j][1], above)
        out[label] = {"max_recovered": bool(found == math.ceil(truth)),
                      "queries": len(outcomes), "crashes": outcomes.count("crashed"),
                      "uncharged": len(outcomes) - len(charged) - outcomes.count("refused")}
    c, p = out["control"], out["protected"]
    out["passed"] = (c["max_recovered"] and c["uncharged"] > 0 and not p["max_recovered"]
                     and p["crashes"] == 0 and p["uncharged"] == 0)
    out["row"] = [f"the test split's maximum age recovered in {c['queries']} queries, "
                  f"{c['uncharged']} of them uncharged crashes",
                  f"{'recovered' if p['max_recovered'] else 'not recovered'}; "
                  f"{p['crashes']} crashes, {p['uncharged']} uncharged of {p['queries']}"]
    return out


# -- 13. the intercept step -------------------------------------------------------------
def intercept_nan_channel(dataset: FederatedDataset, raw: SiteData, pre: Preprocessor
                          ) -> dict[str, Any]:
    """The intercept step's sums over a model whose scores are NaN above an age, past the
    release gate (the worst case: the gate refuses this preprocessor, attack 9). Control:
    the sums as computed, NaN when any patient is above T. Protected: the node's release,
    whose risks that are not probabilities count as 0.5, charged first."""
    names, ranges = dataset.feature_names, dataset.feature_ranges
    j, other = names.index("age"), names.index("systolic_bp")
    truth = float(np.nanmax(raw.x_train[:, j]))
    y = raw.y_train.astype(float)
    out: dict[str, Any] = {"setting": "intercept sums of a model NaN above an age"}
    for label, guarded in (("control", False), ("protected", True)):
        answers: list[bool] = []
        ledger = PrivacyLedger(site="attacked", n_records=len(y),
                               budget=SiteBudget(epsilon_max=1e6, delta=DELTA))

        def above(t: float, guarded: bool = guarded, answers: list[bool] = answers,
                  ledger: PrivacyLedger = ledger) -> bool:
            shifted, weights = _nan_scores_inputs(pre, j, other, t, _width(ranges[j]))
            with np.errstate(all="ignore"):
                probs = score("logistic", weights, shifted.transform(raw.x_train))
            if guarded:  # a fresh study per query, each charged to the one ledger
                privacy = SitePrivacy(ledger=ledger, study=f"q{len(answers)}")
                sums = privacy.release_intercept_sums(y, probs)[:2]
            else:
                with np.errstate(all="ignore"):
                    sums = (float(np.sum(y - probs)), float(np.sum(probs * (1 - probs))))
            answers.append(not all(math.isfinite(v) for v in sums))
            return answers[-1]

        found = _binary_search(ranges[j][0], ranges[j][1], above)
        out[label] = {"max_recovered": bool(found == math.ceil(truth)),
                      "queries": len(answers), "non_finite": sum(answers),
                      "charged": len(ledger.entries)}
    c, p = out["control"], out["protected"]
    out["passed"] = (c["max_recovered"] and not p["max_recovered"] and p["non_finite"] == 0
                     and p["charged"] == p["queries"])
    out["row"] = [f"the training rows' maximum age recovered in {c['queries']} queries, "
                  f"{c['non_finite']} of them NaN sums",
                  f"{'recovered' if p['max_recovered'] else 'not recovered'}; "
                  f"{p['non_finite']} NaN sums, {p['charged']} of {p['queries']} charged"]
    return out


# -- 10. ledger binding -----------------------------------------------------------------
def _old_ledger_key(name: str, x: np.ndarray, y: np.ndarray) -> str:
    """The file the previous release kept a ledger in: the enrolled name and a SHA-256 of
    the records as the study encoded them."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)):
        h.update(str(arr.shape).encode())
        h.update(np.nan_to_num(arr, nan=np.inf).tobytes())
    return f"{name}-{h.hexdigest()[:16]}"


def ledger_binding(raw: SiteData) -> dict[str, Any]:
    """11 studies of one hospital, each a statistics release and 3 DP-SGD rounds on some
    encoding of the same patients, under another enrolment name or a refreshed export."""
    x, y = np.nan_to_num(raw.x_train, nan=0.0), raw.y_train.astype(float)
    d = x.shape[1]
    studies: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("tier2_a", x, y), ("tier2_a", x[:, ::-1], y), ("tier2_a", x[:, : d - 2], y),
        ("tier2_a", x[:, [0, 1, 3]], y), ("tier2_a-2", x, y), ("Tier2_A", x, y),
        ("tier2_a", np.vstack([x, x[:1]]), np.append(y, y[0])), ("tier2_a", x[:, 1:], y),
        ("tier2_a", x[:, [2, 0, 1]], y), ("tier2-a", x, y), ("tier2_a", x[::-1], y[::-1])]
    # Full batches (q = 1): the RDP of each release has a closed form, so the bench is quick.
    local = LocalTrainingConfig(lr=0.05, batch_size=100_000, local_steps=3)
    # Control: each study kept its own ledger, each at most 1 (a study's whole budget).
    control: dict[str, float] = {}
    events: list[GaussianEvent] = []
    for name, xs, ys in studies:
        steps = 1 + 3 * local.steps_for(len(ys))
        sigma = calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=1.0, steps=steps)
        event = GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
        key = _old_ledger_key(name, xs, ys)
        shown = PrivacyAccountant(events=[event]).get_epsilon(DELTA)
        control[key] = max(control.get(key, 0.0), shown)
        events.append(event)
    composed_control = PrivacyAccountant(events=events).get_epsilon(DELTA)
    budget = SiteBudget(epsilon_max=3.0, study_epsilon=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        ledger_dir = Path(tmp) / "ledger"
        refused, made = 0, 0
        for k, (name, xs, ys) in enumerate(studies):
            ledger = open_site_ledger(site=name, budget=budget, ledger_dir=ledger_dir)
            privacy = SitePrivacy(ledger=ledger, local=local, rounds=3, study=f"study-{k}")
            try:
                privacy.release_statistics(xs, np.tile(np.linspace(-5, 5, 17),
                                                       (xs.shape[1], 1)))
                for rnd in range(3):
                    privacy.train(make_model("logistic", xs.shape[1], seed=0),
                                  xs.astype(np.float32), ys.astype(np.float32), local,
                                  seed=rnd)
                made += 1
            except PrivacyBudgetExceeded:
                refused += 1
        final = open_site_ledger(site="any", budget=budget, ledger_dir=ledger_dir)
        ledgers = sum(1 for _ in Path(tmp).rglob("ledger.jsonl"))
        recorded = [GaussianEvent(**e) for entry in final.entries for e in entry["events"]]
        reference = _dp_accounting_epsilon(recorded)
        total = final.spent()
    out: dict[str, Any] = {
        "studies": len(studies),
        "control": {"ledgers": len(control), "largest_shown": max(control.values()),
                    "composed_total": composed_control},
        "protected": {"ledgers": ledgers, "studies_admitted": made, "studies_refused": refused,
                      "total": total, "dp_accounting_total": reference, "epsilon_max": 3.0}}
    c, p = out["control"], out["protected"]
    out["passed"] = (c["ledgers"] >= 10 and c["composed_total"] > 3.0 and p["ledgers"] == 1
                     and p["total"] <= 3.0 + 1e-9
                     and abs(p["total"] - p["dp_accounting_total"]) < 0.05)
    out["row"] = [f"{c['ledgers']} ledgers for {len(studies)} studies, each showing <= "
                  f"{c['largest_shown']:.2f}; everything composes to {c['composed_total']:.1f}",
                  f"1 ledger: {p['studies_admitted']} studies admitted, {p['studies_refused']} "
                  f"refused at epsilon_max 3; total {p['total']:.3f} (dp-accounting RDP "
                  f"{p['dp_accounting_total']:.3f})"]
    return out


def _dp_accounting_epsilon(events: list[GaussianEvent]) -> float:
    """The same events composed by Google's dp-accounting (RDP), an independent check."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()  # its own default orders
    for e in events:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)), e.steps)
    return float(accountant.get_epsilon(DELTA))


# -- 11. the exact record count -----------------------------------------------------------
def exact_count(raw: SiteData, window: int = 100) -> dict[str, Any]:
    """The coordinator reads n off what a site sends. Control: the schedule planned on the
    exact count (epsilon_spent on the card recovers n by matching candidates). Protected:
    planned on the released noisy count: sites of n and n + 1 records that released the
    same count spend the same epsilon (and num_samples is that count)."""
    n = raw.n_train
    local = LocalTrainingConfig(lr=0.05, batch_size=16, local_epochs=1)

    def epsilon_for(count: int, sigma: float) -> float:
        q, steps = dp_schedule(count, local)
        return PrivacyAccountant(events=[GaussianEvent(
            noise_multiplier=sigma, sample_rate=q, steps=3 * steps)]).get_epsilon(DELTA)

    sigma = 2.0
    published = epsilon_for(n, sigma)
    candidates = [c for c in range(max(1, n - window), n + window + 1)
                  if epsilon_for(c, sigma) == published]
    # Protected: two neighbouring sites (n and n + 1 records), the same released count.
    released = float(n) + 3.7
    spent = []
    for count in (n, n + 1):
        privacy = _fresh_privacy(count, released, local)
        privacy.rounds = 3
        x = np.nan_to_num(np.resize(raw.x_train, (count, raw.x_train.shape[1])), nan=0.0)
        privacy.train(make_model("logistic", x.shape[1], seed=0), x.astype(np.float32),
                      np.resize(raw.y_train, count).astype(np.float32), local, seed=0)
        spent.append(privacy.ledger.spent())
    out = {"control": {"candidates_matching": len(candidates),
                       "n_recovered": candidates == [n]},
           "protected": {"epsilon_n": spent[0], "epsilon_n_plus_1": spent[1],
                         "identical": spent[0] == spent[1]}}
    c, p = out["control"], out["protected"]
    out["passed"] = c["n_recovered"] and p["identical"]
    out["row"] = [f"n recovered exactly from epsilon_spent ({c['candidates_matching']} "
                  f"candidate in n +- {window})" if c["n_recovered"] else
                  f"{c['candidates_matching']} candidates match",
                  f"sites of n and n + 1 records spend {p['epsilon_n']:.4f} and "
                  f"{p['epsilon_n_plus_1']:.4f}: {'identical' if p['identical'] else 'differ'};"
                  f" training without the statistics release refused"]
    return out


# -- 12. names and exact releases ---------------------------------------------------------
def names_and_exact_releases() -> dict[str, Any]:
    name = "../../outside/tier2_a"
    with tempfile.TemporaryDirectory() as tmp:
        ledger_dir = Path(tmp) / "a" / "b" / "ledgers"
        old = (ledger_dir / f"{name}-0123456789abcdef.json").resolve()
        escaped = not old.is_relative_to(ledger_dir.resolve())
    batch_one = {"batch_size": 1, "local_steps": 1}
    exact = {"attribution": {**PRIVATE_PLAN, "private": False, "methods": ["iptw"]}}

    def admitted(plan: dict[str, Any], opt_in: list[str]) -> bool:
        try:
            check_exact_releases(SimulationConfig.model_validate(plan), private=False,
                                 opt_in=opt_in)
            return True
        except TaskRefused:
            return False

    refusals = [not admitted(plan, []) for plan in (batch_one, exact,
                                                     {"attribution": PRIVATE_PLAN})]
    opted = [admitted(batch_one, ["small_batches"]), admitted(exact, ["exact_attribution"])]
    out = {"control": {"ledger_path_escapes": escaped},
           "protected": {"name_accepted": is_safe_name(name),
                         "refused": sum(refusals), "of": len(refusals),
                         "admitted_when_opted_in": sum(opted)}}
    c, p = out["control"], out["protected"]
    out["passed"] = (c["ledger_path_escapes"] and not p["name_accepted"]
                     and p["refused"] == p["of"] and p["admitted_when_opted_in"] == 2)
    out["row"] = ["the old ledger path of site '../../outside/tier2_a' lies outside ledger_dir"
                  if c["ledger_path_escapes"] else "no escape",
                  f"the name is refused by coordinator and node (no name is a path); a "
                  f"non-private node refuses {p['refused']}/{p['of']} exact plans (batch 1, "
                  f"exact and private attribution sums) unless opted in"]
    return out


