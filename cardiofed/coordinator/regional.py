"""A *relay* study (``relay`` set at creation; :mod:`cardiofed.protocol.relay`) is a
region of a national study: its statistics round opens with it, its later rounds are
opened by the region's node with the national model, and each closed round keeps the
aggregate that node sends upward, the study waiting (phase ``relay``) in between.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from cardiofed.coordinator.models import initial_weights, store_model
from cardiofed.coordinator.rounds import advance
from cardiofed.coordinator.studies import (
    EVALUATE,
    INTERCEPT,
    TRAIN,
    Clock,
    get_study,
    round_of,
    serialised,
    study_plan,
)
from cardiofed.exceptions import (
    Conflict,
    DataValidationError,
    InvalidUpdate,
)
from cardiofed.store import (
    ModelVersion,
    Round,
    Study,
    sha256,
    utcnow,
)
from cardiofed.wire import decode_arrays


def _relay_study(db: Session, study_id: str) -> Study:
    study = get_study(db, study_id)
    if not study.relay:
        raise Conflict(f"Study {study_id!r} is not a relay study: only a regional study "
                       f"created with relay = true takes a national study's model from its "
                       f"region's node.")
    return study


def relay_info(db: Session, study_id: str) -> dict[str, object]:
    """What the region's node checks against its national task: the regional plan and
    columns, and where the regional study stands."""
    study = _relay_study(db, study_id)
    return {"study": study.id, "plan": study.plan, "feature_names": study.feature_names,
            "feature_ranges": study.feature_ranges, "outcome": study.outcome,
            "phase": study.phase, "round": study.current_round,
            "model_version": study.model_version,
            "preprocessor_sha256": None if study.preprocessor is None
            else sha256(study.preprocessor),
            "model_versions": list(db.scalars(select(ModelVersion.version).where(
                ModelVersion.study_id == study.id).order_by(ModelVersion.version)))}


def relay_model(db: Session, study_id: str, version: int, blob: bytes) -> None:
    """Store national model `version` in the relay study (a repeat of the same weights is
    acknowledged; other weights for a stored version are a conflict)."""
    study = _relay_study(db, study_id)
    try:
        weights, _ = decode_arrays(blob)
    except DataValidationError as exc:
        raise InvalidUpdate(f"Model version {version} is not a model: {exc}") from None
    expected = {k: (v.shape, v.dtype) for k, v in
                initial_weights(study_plan(study), study.feature_names).items()}
    got = {k: (v.shape, v.dtype) for k, v in weights.items()}
    if got != expected:
        raise InvalidUpdate(f"Model version {version} holds tensors {got}; the study's model "
                            f"has {expected}.")
    with serialised(db, study):
        existing = db.scalar(select(ModelVersion).where(ModelVersion.study_id == study.id,
                                                        ModelVersion.version == version))
        if existing is None:
            store_model(db, study, weights, version=version,
                         round_number=study.current_round, participants=[])
        elif any(not np.array_equal(v, weights[k])
                 for k, v in decode_arrays(existing.weights)[0].items()):
            raise Conflict(f"Study {study.id!r} already holds a different model version "
                           f"{version}.")


def relay_preprocessor(db: Session, study_id: str, blob: bytes) -> None:
    """Set the national study's preprocessor in the relay study (once; a repeat of the
    same bytes is acknowledged)."""
    from cardiofed.data.preprocessing import Preprocessor

    study = _relay_study(db, study_id)
    try:
        Preprocessor.from_arrays(decode_arrays(blob)[0],
                                 study_plan(study).model_form(study.feature_names))
    except (DataValidationError, KeyError, TypeError, ValueError) as exc:
        raise InvalidUpdate(f"The preprocessor is not one of this study's columns: "
                            f"{type(exc).__name__}: {exc}") from None
    with serialised(db, study):
        if study.preprocessor is not None and study.preprocessor != blob:
            raise Conflict(f"Study {study.id!r} already holds a different preprocessor.")
        study.preprocessor = blob


def relay_round(db: Session, study_id: str, *, number: int, kind: str, model_version: int,
                now: Clock = utcnow) -> None:
    """Open round `number` of the relay study (the national round's number) for its sites,
    to `kind` from stored model `model_version`. A round still open (its region fell
    behind) closes without an aggregate. Repeating an opened round is acknowledged."""
    if kind not in (TRAIN, INTERCEPT, EVALUATE):
        raise InvalidUpdate(f"A relayed round trains, steps the intercept or evaluates; got "
                            f"kind {kind!r} (the statistics round opens with the study).")
    study = _relay_study(db, study_id)
    with serialised(db, study):
        existing = db.scalar(select(Round).where(Round.study_id == study.id,
                                                 Round.number == number))
        if existing is not None:
            if (existing.kind, existing.model_version) != (kind, model_version):
                raise Conflict(f"Round {number} of study {study.id!r} is open to "
                               f"{existing.kind} from model version "
                               f"{existing.model_version}, not to {kind} from "
                               f"{model_version}.")
            return
        if number <= study.current_round:
            raise Conflict(f"Round {number} is behind study {study.id!r}'s round "
                           f"{study.current_round}: relayed rounds only move forward.")
        if study.preprocessor is None:
            raise Conflict(f"Study {study.id!r} has no preprocessor yet: relay the national "
                           f"one first.")
        if db.scalar(select(ModelVersion.id).where(ModelVersion.study_id == study.id,
                                                   ModelVersion.version == model_version)
                     ) is None:
            raise Conflict(f"Study {study.id!r} has no model version {model_version}: relay "
                           f"the national model first.")
        current = round_of(db, study)
        if current.closed_at is None:
            current.closed_at = now()
            current.outcome = f"superseded: the national study moved on to round {number}"
        db.add(Round(study_id=study.id, number=number, kind=kind,
                     model_version=model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
        study.current_round, study.phase, study.model_version = number, kind, model_version


def relay_result(db: Session, study_id: str, number: int, now: Clock = utcnow
                 ) -> bytes | None:
    """Round `number`'s aggregate, or None while the round waits for its sites."""
    study = _relay_study(db, study_id)
    advance(db, study, now)
    rnd = round_of(db, study, number)
    if rnd.relay_result is None and rnd.closed_at is not None:
        raise Conflict(f"Round {number} of study {study.id!r} closed without an aggregate "
                       f"({rnd.outcome}).")
    return rnd.relay_result
