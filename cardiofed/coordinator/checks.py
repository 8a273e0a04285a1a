"""A report checked against its round (:mod:`cardiofed.coordinator.payloads`): when it
arrives, and again before it is folded, when one that no longer passes is quarantined
with the reason, so one site's payload never stops a round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    update,
)
from sqlalchemy.orm import Session

from cardiofed.coordinator import attribution
from cardiofed.coordinator.models import load_model
from cardiofed.coordinator.payloads import (
    MAX_METRICS_BYTES,
    check_intercept,
    check_manifest,
    check_statistics,
    check_update,
    evaluation_metrics,
)
from cardiofed.coordinator.studies import EVALUATE, INTERCEPT, STATISTICS, study_plan
from cardiofed.exceptions import (
    CoordinatorError,
    DataValidationError,
    InvalidUpdate,
    PayloadTooLarge,
)
from cardiofed.store import (
    Round,
    Study,
    Update,
)
from cardiofed.wire import decode_arrays

log = logging.getLogger("cardiofed.coordinator")


@dataclass(frozen=True)
class CheckedReport:
    """A payload that passed the checks: its declared sample size and what it holds."""

    num_samples: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    manifest: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # an evaluation's


def check_report(db: Session, study: Study, rnd: Round, site_name: str, payload: bytes
           ) -> CheckedReport:
    """The payload checked by :mod:`cardiofed.coordinator.payloads` against the round."""
    if rnd.kind == EVALUATE:
        if len(payload) > MAX_METRICS_BYTES:
            raise PayloadTooLarge(f"Metrics payload exceeds {MAX_METRICS_BYTES} bytes.")
        return CheckedReport(0, metrics=evaluation_metrics(payload))
    try:
        arrays, manifest = decode_arrays(payload)
    except DataValidationError as exc:
        raise InvalidUpdate(str(exc)) from None
    check_manifest(manifest, {"study": study.id, "round": str(rnd.number),
                              "model_version": str(rnd.model_version), "site": site_name})
    if study.analysis is not None:
        plan = study_plan(study).analysis
        assert plan is not None
        n = attribution.check_payload(plan, study, rnd.kind, arrays)
    elif rnd.kind == STATISTICS:
        n = check_statistics(arrays, [(lo, hi) for lo, hi in study.feature_ranges])
    elif rnd.kind == INTERCEPT:
        n = check_intercept(arrays, manifest)
    else:
        n = check_update(arrays, manifest, expected_tensors(db, study, rnd.model_version))
    return CheckedReport(n, arrays, manifest)


_TENSORS: dict[tuple[str, datetime, int], dict[str, tuple[tuple[int, ...], np.dtype[Any]]]] = {}


def expected_tensors(db: Session, study: Study, version: int
                      ) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """The tensors of a model version, decoded once per process (a stored version never
    changes; a study's creation time tells a re-created study of the same id apart)."""
    key = (study.id, study.created_at, version)
    if key not in _TENSORS:
        if len(_TENSORS) > 1024:
            _TENSORS.clear()
        _TENSORS[key] = {k: (v.shape, v.dtype)
                         for k, v in load_model(db, study, version).items()}
    return _TENSORS[key]


def checked_or_quarantined(db: Session, study: Study, rnd: Round, site_name: str,
                            update_id: int, payload: bytes) -> CheckedReport | None:
    """The update's payload checked again before it is folded; one that no longer passes
    is quarantined with the reason (shown in the status) and None returned, so one site's
    payload never stops a round."""
    try:
        return check_report(db, study, rnd, site_name, payload)
    except CoordinatorError as exc:
        reason = str(exc)[:300]
        db.execute(update(Update).where(Update.id == update_id).values(quarantine=reason))
        log.warning("study %s round %d: update of site %s quarantined: %s", study.id,
                    rnd.number, site_name, reason)
        return None
