"""Privacy audit: what leaves a site, measured rather than claimed.

* :func:`canary_audit` plants unique records at every site, captures every payload the
  sites send (statistics, updates, metrics) and searches each for the records' values
  in the encodings a leak would use (float32/float64 bytes, decimal text; raw and
  standardised). It also counts what was sent, by payload kind and by site.
* :func:`membership_inference` runs the loss-threshold attack (Yeom et al. 2018) on the
  released global model: members are training rows, non-members test rows.
* :func:`update_inversion` shows why updates are personal data: one logistic-regression
  SGD step on one record gives ``delta_w = -lr (p - y) x`` and ``delta_b = -lr (p - y)``,
  so ``x = delta_w / delta_b`` exactly; DP-SGD's noise drowns the clipped gradient.

Reports hold counts, bytes and error summaries only, never a patient value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np
from rich.table import Table
from sklearn.metrics import roc_auc_score, roc_curve

from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.networks import get_weights, make_model, score
from cardiofed.privacy.accountant import calibrate_noise
from cardiofed.privacy.dp_sgd import DPConfig, train_local_dp
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    PRIVACY_DISCLOSURE,
    run_experiment,
    site_privacy,
)
from cardiofed.simulation.prepare import PreparedSite, Standardisation, prepare_federation
from cardiofed.simulation.runner import derive_seed, run_federated
from cardiofed.training.local import LocalTrainingConfig, train_local
from cardiofed.wire import PAYLOAD_KINDS

Payload = tuple[str, str, bytes]  # (site, kind, payload bytes), as an outbox sees them
_MIN_DIGITS = 6  # decimal renderings with fewer significant digits are too common to count


@dataclass(frozen=True)
class Match:
    """A canary value found in a payload: where, which canary and column, how encoded."""

    site: str
    kind: str
    canary: int
    feature: int
    encoding: str
    offset: int


@dataclass
class CanaryReport:
    """What the sites sent during a federated run, and any canary value found in it."""

    n_canaries: int
    n_patterns: int
    n_payloads: int
    payloads_by_kind: dict[str, int]
    bytes_by_kind: dict[str, int]
    bytes_by_site: dict[str, int]
    matches: list[Match] = field(default_factory=list)
    # Positive control: the same search run on a payload that does hold the canaries
    # (their rows as float32, as a leaking update would carry them) finds them.
    control_detected: bool = False

    @property
    def passed(self) -> bool:
        return not self.matches and self.control_detected

    def to_dict(self) -> dict[str, object]:
        return {**{k: v for k, v in asdict(self).items() if k != "matches"},
                "passed": self.passed, "matches": [asdict(m) for m in self.matches]}


def _digits(text: str) -> int:
    mantissa = text.lower().split("e")[0].lstrip("-").replace(".", "").lstrip("0")
    return len(mantissa)


def _patterns(value: float, label: str) -> list[tuple[str, bytes, bool]]:
    """(encoding, byte pattern, is text) of one value; none for integers and non-finite."""
    if not math.isfinite(value) or float(value).is_integer():
        return []
    v32 = np.float32(value)
    out = [(f"float32 {label}", np.array(value, "<f4").tobytes(), False),
           (f"float64 {label}", np.array(value, "<f8").tobytes(), False)]
    if float(v32) != value:
        out.append((f"float64(float32) {label}", np.array(float(v32), "<f8").tobytes(), False))
    texts = {repr(float(value)), f"{value:.6g}", f"{value:.4f}", str(v32), repr(float(v32))}
    out += [(f"text {label}", t.encode(), True) for t in sorted(texts) if _digits(t) >= _MIN_DIGITS]
    return out


def _find(data: bytes, pattern: bytes, text: bool) -> int:
    """First offset of `pattern`; text must stand alone as a number (no digit around it)."""
    start = 0
    while (i := data.find(pattern, start)) >= 0:
        before, after = data[max(i - 1, 0):i], data[i + len(pattern):i + len(pattern) + 1]
        if not text or ((not before or before not in b"0123456789.-")
                        and (not after or after not in b"0123456789eE")):
            return i
        start = i + 1
    return -1


def _row_patterns(row: np.ndarray, label: str) -> list[tuple[str, bytes, bool]]:
    """A whole row as contiguous float32 and float64 bytes: integer-valued columns (age,
    codes, counts) are too common to search one by one, but a dumped row carries them."""
    values = row[np.isfinite(row)]
    if len(values) < 2:
        return []
    return [(f"row float32 {label}", np.asarray(values, "<f4").tobytes(), False),
            (f"row float64 {label}", np.asarray(values, "<f8").tobytes(), False)]


def scan_payloads(payloads: Iterable[Payload], canary_rows_raw: np.ndarray,
                  canary_rows_standardised: np.ndarray | None = None) -> list[Match]:
    """Every payload that contains a canary value, or a whole canary row (integers
    included) as contiguous floats; NaN entries are not searched. A whole-row match is
    reported with feature -1."""
    patterns = []
    for label, rows in (("raw", canary_rows_raw), ("standardised", canary_rows_standardised)):
        if rows is None:
            continue
        rows = np.asarray(rows, dtype=np.float64)
        for (i, j), v in np.ndenumerate(rows):
            patterns += [(i, j, *p) for p in _patterns(float(v), label)]
        for i, row in enumerate(rows):
            patterns += [(i, -1, *p) for p in _row_patterns(row, label)]
    matches = []
    for site, kind, data in payloads:
        for i, j, encoding, pattern, text in patterns:
            if (offset := _find(data, pattern, text)) >= 0:
                matches.append(Match(site, kind, i, j, encoding, offset))
    return matches


def _binary(dataset: FederatedDataset) -> np.ndarray:
    return np.array([tuple(map(float, r)) == (0.0, 1.0) for r in dataset.feature_ranges])


def _canary_rows(site: SiteData, dataset: FederatedDataset, n: int,
                 rng: np.random.Generator, used: set[float]) -> np.ndarray:
    """`n` rows: binary columns copied from real rows, continuous ones new 6-decimal values
    inside the site's 10th-90th percentiles (clipped to the feature's plausible range)."""
    rows = np.nan_to_num(site.x_train[rng.choice(site.n_train, size=n)].astype(np.float64))
    for j in np.flatnonzero(~_binary(dataset)):
        lo, hi = dataset.feature_ranges[j]
        col = site.x_train[:, j]
        q = np.nanpercentile(col, [10, 90]) if np.isfinite(col).any() else [lo, hi]
        a, b = max(lo, float(q[0])), min(hi, float(q[1]))
        if b - a < 1e-3:
            a, b = lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo)
        for i in range(n):
            v = round(float(rng.uniform(a, b)), 6)
            while v in used or v.is_integer():  # unique, and never a common integer
                v = round(float(rng.uniform(a, b)), 6)
            used.add(v)
            rows[i, j] = v
    return rows


def canary_audit(dataset: FederatedDataset, config: SimulationConfig, *, seed: int,
                 per_site: int = 3) -> CanaryReport:
    """Plant `per_site` canary rows in each site's training split, run the federation
    with every payload captured, and search the payloads for the canaries' values."""
    if per_site < 1:
        raise ConfigurationError(f"The 'per_site' parameter must be >= 1; got {per_site!r}.")
    rng, used = np.random.default_rng(seed), set[float]()
    canaries = {s.name: _canary_rows(s, dataset, per_site, rng, used) for s in dataset.sites}
    planted = replace(dataset, sites=[replace(
        s, x_train=np.vstack([s.x_train, canaries[s.name]]),
        y_train=np.concatenate([s.y_train, rng.integers(0, 2, per_site)]))
        for s in dataset.sites])
    captured: list[Payload] = []
    # eval_every=0 skips simulation-only per-round evaluation; what is sent is unchanged.
    result = run_experiment(planted, _with(config, eval_every=0), baselines=False,
                            outbox=lambda site, kind, data: captured.append((site, kind, data)))
    raw = np.vstack(list(canaries.values()))
    std = np.vstack([result.preprocessors[name].standardise(rows)
                     for name, rows in canaries.items()])
    raw[:, _binary(dataset)] = std[:, _binary(dataset)] = np.nan  # 0/1: common to everyone
    n_patterns = sum(len(_patterns(float(v), "")) for v in np.concatenate([raw, std]).ravel())
    by_kind = {k: [len(d) for _, kind, d in captured if kind == k] for k in PAYLOAD_KINDS}
    return CanaryReport(
        n_canaries=len(raw), n_patterns=n_patterns, n_payloads=len(captured),
        payloads_by_kind={k: len(v) for k, v in by_kind.items()},
        bytes_by_kind={k: sum(v) for k, v in by_kind.items()},
        bytes_by_site={s.name: sum(len(d) for name, _, d in captured if name == s.name)
                       for s in dataset.sites},
        matches=scan_payloads(captured, raw, std),
        control_detected=bool(scan_payloads(
            [("control", "update", np.nan_to_num(std).astype("<f4").tobytes())], raw, std)))


def _with(config: SimulationConfig, **changes: object) -> SimulationConfig:
    return SimulationConfig.create(**{**config.model_dump(), **changes})


def _losses(model: str, weights: dict[str, np.ndarray], x: np.ndarray,
            y: np.ndarray) -> np.ndarray:
    p = np.clip(score(model, weights, x), 1e-7, 1 - 1e-7)
    return np.asarray(-(y * np.log(p) + (1 - y) * np.log1p(-p)), np.float64)


def _attack(member_loss: np.ndarray, other_loss: np.ndarray) -> tuple[float, float]:
    """(AUC, max TPR - FPR) of the score -loss, members labelled 1."""
    if not (len(member_loss) and len(other_loss)):
        return float("nan"), float("nan")
    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(other_loss))]
    scores = -np.r_[member_loss, other_loss]
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(roc_auc_score(labels, scores)), float(np.max(tpr - fpr))


def membership_inference(dataset: FederatedDataset, config: SimulationConfig, *,
                         epsilons: Sequence[float | None] = (None,),
                         seed: int) -> list[dict[str, object]]:
    """Loss-threshold membership attack on the final global model, one row per epsilon
    (None: no DP). `seed` replaces ``config.seed`` for training. AUC 0.5: no leakage."""
    rows: list[dict[str, object]] = []
    for eps in epsilons:
        cfg = _with(config, dp_epsilon=eps, seed=seed, eval_every=0)
        privacy = site_privacy(dataset, cfg)
        sites = prepare_federation(dataset, cfg.standardisation, privacy=privacy or None)
        run = run_federated(sites, cfg, privacy=privacy or None)
        inside = {s.name: _losses(cfg.model, run.weights, s.x_train, s.y_train) for s in sites}
        outside = {s.name: _losses(cfg.model, run.weights, s.x_test, s.y_test) for s in sites}
        member = np.concatenate(list(inside.values()))
        other = np.concatenate(list(outside.values()))
        auc, advantage = _attack(member, other)
        rows.append({"epsilon": eps, "attack_auc": auc, "attack_advantage": advantage,
                     "n_members": len(member), "n_non_members": len(other),
                     "mean_member_loss": float(member.mean()),
                     "mean_non_member_loss": float(other.mean()),
                     "site_attack_auc": {s.name: _attack(inside[s.name], outside[s.name])[0]
                                         for s in sites}})
    return rows


LEAKY_ROWS = 30
LEAKY_SETTINGS: dict[str, object] = {"model": "mlp", "rounds": 3, "local_epochs": 20,
                                     "optimizer": "adam", "lr": 0.01, "batch_size": 16}


def leaky_membership(dataset: FederatedDataset, config: SimulationConfig, *, epsilon: float,
                     seed: int) -> list[dict[str, object]]:
    """The membership attack's positive control: at most :data:`LEAKY_ROWS` training (and
    as many test) rows per site and an over-trained MLP (:data:`LEAKY_SETTINGS`), so that
    without DP the model memorises its members and the attack has something to find;
    then the same with DP."""
    # As many non-members as members at every site: otherwise the attack could tell them
    # apart by site mix alone (small sites' rows over-represented among members).
    small = replace(dataset, sites=[replace(s, x_train=s.x_train[:LEAKY_ROWS],
                                            y_train=s.y_train[:LEAKY_ROWS],
                                            x_test=s.x_test[:LEAKY_ROWS],
                                            y_test=s.y_test[:LEAKY_ROWS],
                                            true_risk_test=None)
                                    for s in dataset.sites])
    leaky = _with(config, **LEAKY_SETTINGS, algorithm="fedavg", standardisation="global")
    rows = membership_inference(small, leaky, epsilons=(None, epsilon), seed=seed)
    return [{**r, "setting": "leaky control"} for r in rows]


@lru_cache(maxsize=32)
def _one_step_noise(epsilon: float, delta: float) -> float:
    return calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1)


def update_inversion(x_row: np.ndarray, y: float, *, epsilon: float | None,
                     delta: float | None = None, max_grad_norm: float = 1.0, lr: float = 0.05,
                     seed: int = 0) -> dict[str, object]:
    """Invert the update a site holding only `x_row` sends after one SGD step (q = 1);
    with `epsilon`, the step is DP-SGD calibrated to (epsilon, delta) for that one step.
    Returns the reconstruction ``x_hat`` and its RMSE and relative error."""
    x = np.asarray(x_row, dtype=np.float32).reshape(1, -1)
    if np.asarray(x_row).ndim != 1 or not np.isfinite(x).all():
        raise ConfigurationError(f"The 'x_row' parameter must be a finite 1-D row; "
                                 f"got shape {np.asarray(x_row).shape}.")
    if y not in (0, 1):
        raise ConfigurationError(f"The 'y' parameter must be 0 or 1; got {y!r}.")
    model = make_model("logistic", x.shape[1], seed=seed)
    start = get_weights(model)
    local = LocalTrainingConfig(lr=lr, batch_size=1, local_steps=1)
    target = np.array([float(y)], dtype=np.float32)
    sigma = None
    if epsilon is None:
        train_local(model, x, target, local, seed=seed)
    else:
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise ConfigurationError(f"The 'epsilon' parameter must be finite and > 0; "
                                     f"got {epsilon!r}.")
        if delta is None or not 0 < delta < 1:
            raise ConfigurationError(f"The 'delta' parameter must be in (0, 1); got {delta!r}.")
        sigma = _one_step_noise(float(epsilon), float(delta))
        train_local_dp(model, x, target, local, DPConfig(noise_multiplier=sigma,
                                                         max_grad_norm=max_grad_norm))
    end = get_weights(model)
    dw = end["linear.weight"].astype(np.float64).ravel() - start["linear.weight"].ravel()
    db = float(end["linear.bias"][0]) - float(start["linear.bias"][0])
    x_hat = dw / db if db != 0 else np.full_like(dw, np.nan)
    err = x_hat - x.ravel()
    return {"x_hat": x_hat, "rmse": float(np.sqrt(np.mean(err**2))),
            "relative_error": float(np.linalg.norm(err) / np.linalg.norm(x)),
            "noise_multiplier": sigma}


def update_inversion_audit(dataset: FederatedDataset, *, epsilon: float,
                           delta: float | None = None, seed: int, n_records: int = 20,
                           standardisation: Standardisation = "global", max_grad_norm: float = 1.0,
                           lr: float = 0.05) -> dict[str, object]:
    """:func:`update_inversion` on `n_records` training rows of the first site, without
    and with DP (delta defaults to that site's ``1 / (10 n)``); errors only, no rows."""
    if n_records < 1:
        raise ConfigurationError(f"The 'n_records' parameter must be >= 1; got {n_records!r}.")
    site: PreparedSite = prepare_federation(dataset, standardisation)[0]
    picked = np.random.default_rng(seed).choice(site.n_train, min(n_records, site.n_train),
                                                replace=False)
    delta = delta if delta is not None else 1.0 / (10 * site.n_train)
    out: dict[str, object] = {"site": site.name, "n_records": len(picked), "epsilon": epsilon,
                              "delta": delta, "max_grad_norm": max_grad_norm, "lr": lr}
    for label, eps in (("no_dp", None), ("dp", epsilon)):
        runs = [update_inversion(site.x_train[i], float(site.y_train[i]), epsilon=eps,
                                 delta=delta, max_grad_norm=max_grad_norm, lr=lr,
                                 seed=derive_seed(seed, int(i))) for i in picked]
        rmse = np.array([r["rmse"] for r in runs], dtype=np.float64)
        rel = np.array([r["relative_error"] for r in runs], dtype=np.float64)
        out[label] = {"noise_multiplier": runs[0]["noise_multiplier"],
                      "mean_rmse": float(rmse.mean()), "median_rmse": float(np.median(rmse)),
                      "mean_relative_error": float(rel.mean()),
                      "median_relative_error": float(np.median(rel))}
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class AuditReport:
    """The three audits of one federation and configuration."""

    dataset: str
    config: dict[str, object]
    epsilon: float
    canary: CanaryReport
    membership: list[dict[str, object]]
    inversion: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        return _jsonable({"dataset": self.dataset, "config": self.config,
                          "epsilon": self.epsilon, "canary": self.canary.to_dict(),
                          "membership_inference": self.membership,
                          "update_inversion": self.inversion,
                          "notes": [PRIVACY_DISCLOSURE]})  # type: ignore[return-value]

    def to_markdown(self) -> str:
        lines = [f"# Privacy audit: {self.dataset}", ""]
        for title, caption, headers, rows in _sections(self):
            lines += [f"## {title}", "", "| " + " | ".join(headers) + " |",
                      "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + ["", caption, ""]
        return "\n".join(lines + [f"Note: {PRIVACY_DISCLOSURE}", ""])


def _f(value: object, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec) if isinstance(value, float | int) else str(value)


Section = tuple[str, str, list[str], list[list[str]]]  # title, caption, headers, rows


def _sections(report: AuditReport) -> list[Section]:
    c, inv = report.canary, report.inversion
    canary: Section = (
        "Canary audit: what left the sites (federation run without DP noise)",
        f"{c.n_canaries} canary records, {c.n_patterns} encodings searched; canary values "
        f"found in payloads: {len(c.matches)}; positive control (a payload holding them) "
        f"{'found' if c.control_detected else 'NOT found'} ({'PASS' if c.passed else 'FAIL'})",
        ["payload kind", "payloads", "bytes", "canary matches"],
        [[k, str(c.payloads_by_kind[k]), str(c.bytes_by_kind[k]),
          str(sum(m.kind == k for m in c.matches))] for k in PAYLOAD_KINDS])
    mia: Section = (
        "Membership inference (loss threshold) on the global model",
        "AUC 0.5 and advantage 0: the attacker cannot tell members from non-members. The "
        f"leaky control (at most {LEAKY_ROWS} rows per site, an over-trained MLP) shows the "
        "attack works where there is something to find",
        ["setting", "epsilon", "attack AUC", "advantage", "members", "non-members"],
        [[str(r.get("setting", "")), "no DP" if r["epsilon"] is None
          else _f(r["epsilon"], "g"), _f(r["attack_auc"]), _f(r["attack_advantage"]),
          str(r["n_members"]), str(r["n_non_members"])] for r in report.membership])
    rows = []
    for label in ("no_dp", "dp"):
        r: dict[str, object] = inv[label]  # type: ignore[assignment]
        rows.append(["no DP" if label == "no_dp" else f"DP epsilon {_f(inv['epsilon'], 'g')}",
                     _f(r["noise_multiplier"]), _f(r["median_rmse"], ".3g"),
                     _f(r["median_relative_error"], ".3g")])
    inversion: Section = (
        f"Update inversion: one-record logistic updates ({inv['n_records']} records of "
        f"{inv['site']})", "x_hat = delta_w / delta_b, errors in standardised units",
        ["setting", "noise multiplier", "median RMSE", "median relative error"], rows)
    return [canary, mia, inversion]


def audit_tables(report: AuditReport) -> list[Table]:
    """Console tables of the three audits (counts, bytes and errors; no patient values)."""
    tables = []
    for title, caption, headers, rows in _sections(report):
        table = Table(title=title, caption=caption)
        for i, name in enumerate(headers):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def run_audit(dataset: FederatedDataset, config: SimulationConfig, *,
              epsilon: float | None = None, seed: int = 0) -> AuditReport:
    """All three audits; `epsilon` defaults to ``config.dp_epsilon``, else 1.

    Each has a positive control in the same run: the canary search is run on a payload
    that holds the canaries; the membership attack on a deliberately leaky setting
    (:func:`leaky_membership`) without DP; the update inversion without DP.

    The canary audit runs the federation without DP: noise could mask a value leaked
    inside an update, while without it a leak arrives bit-exact (the stricter test);
    what is encoded and sent is the same either way."""
    eps = epsilon if epsilon is not None else (config.dp_epsilon or 1.0)
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigurationError(f"The 'epsilon' parameter must be finite and > 0; got {eps!r}.")
    return AuditReport(
        dataset=dataset.name, config=config.model_dump(), epsilon=eps,
        canary=canary_audit(dataset, _with(config, dp_epsilon=None), seed=seed),
        membership=[{**r, "setting": "as configured"} for r in membership_inference(
            dataset, config, epsilons=(None, eps), seed=seed)]
        + leaky_membership(dataset, config, epsilon=eps, seed=seed),
        inversion=update_inversion_audit(dataset, epsilon=eps, delta=config.dp_delta, seed=seed,
                                         standardisation=config.standardisation,
                                         max_grad_norm=config.dp_max_grad_norm, lr=config.lr))
