"""The model registry: every registered model version with its card; one is promoted.

Versions are named ``<study>-v<n>`` (n counts up per study). The risk API serves the
promoted version unless a request pins another. Models come from simulations
(``cardiofed demo`` / ``simulate``) and from networked studies (the coordinator
registers every global model version it publishes).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cardiofed.exceptions import Conflict, NotFound
from cardiofed.serving.model import RiskModel
from cardiofed.store import AuditEvent, RegisteredModel, Study, utcnow


def register(db: Session, model: RiskModel, *, number: int | None = None,
             promote: bool = False, commit: bool = True) -> str:
    """Store `model` as the study's version `number` (default: the next); returns its name."""
    study = model.card.study
    if number is None:
        check_simulation_name(db, study)
        number = (db.scalar(select(func.max(RegisteredModel.number))
                            .where(RegisteredModel.study == study)) or 0) + 1
    version = f"{study}-v{number}"
    if db.scalar(select(RegisteredModel.id).where(RegisteredModel.version == version)):
        raise Conflict(f"Model version {version!r} is already registered.")
    model = model.with_card(version=version)
    db.add(RegisteredModel(version=version, study=study, number=number,
                           artifact=model.to_bytes(), card=model.card.model_dump(mode="json"),
                           content_sha256=model.card.content_sha256, created_at=utcnow()))
    db.flush()
    if promote:
        _promote(db, version)
    if commit:
        db.commit()
    return version


def update_card(db: Session, version: str, **changes: object) -> None:
    """Change fields of a version's card (e.g. metrics that arrive after registration);
    the weights, and so the content hash, never change. The caller commits."""
    model = load(db, version).with_card(**changes)
    row = _row(db, version)
    row.artifact = model.to_bytes()
    row.card = model.card.model_dump(mode="json")


def check_simulation_name(db: Session, study: str) -> None:
    """Refuse to number a simulation's models under a networked study's name (the
    coordinator numbers those)."""
    if db.get(Study, study) is not None:
        raise Conflict(f"{study!r} is a networked study's name in this database; the "
                       f"coordinator numbers its versions. Register the simulation under "
                       f"another name (or into another database, or not at all).")


def has_study(db: Session, study: str) -> bool:
    return db.scalar(select(RegisteredModel.id).where(RegisteredModel.study == study)
                     .limit(1)) is not None


def _row(db: Session, version: str) -> RegisteredModel:
    row = db.scalar(select(RegisteredModel).where(RegisteredModel.version == version))
    if row is None:
        raise NotFound(f"No model version {version!r} in the registry.")
    return row


def load(db: Session, version: str) -> RiskModel:
    return RiskModel.from_bytes(_row(db, version).artifact, source=f"registry {version}")


def study_of(db: Session, version: str) -> str:
    return _row(db, version).study


def promoted_or_none(db: Session) -> str | None:
    return db.scalar(select(RegisteredModel.version).where(RegisteredModel.promoted))


def promoted_version(db: Session) -> str:
    version = promoted_or_none(db)
    if version is None:
        raise NotFound("No model is promoted yet; promote one with "
                       "`cardiofed models promote VERSION`.")
    return version


def _promote(db: Session, version: str) -> None:
    _row(db, version)
    db.execute(update(RegisteredModel).values(promoted=RegisteredModel.version == version))


def promote(db: Session, version: str, *, by: str = "command line") -> None:
    """Make `version` the one the API serves by default (exactly one is promoted); `by`
    goes into the admin audit log (the dashboard shows it where the coordinator and the
    registry share a database)."""
    _promote(db, version)
    db.add(AuditEvent(actor=by[:64], action="promote model", study_id=_row(db, version).study,
                      detail=version))
    db.commit()


def list_models(db: Session, studies: Collection[str] | None = None
                ) -> list[dict[str, object]]:
    """Version, study, promoted flag, content hash and creation time (UTC, ISO 8601 with
    offset) of each model; only those of `studies` unless it is None."""
    query = select(RegisteredModel).order_by(RegisteredModel.id)
    if studies is not None:
        query = query.where(RegisteredModel.study.in_(sorted(studies)))
    return [{"version": r.version, "study": r.study, "promoted": r.promoted,
             "content_sha256": r.content_sha256,
             "created_at": r.created_at.replace(tzinfo=UTC).isoformat(),
             "outcome": r.card.get("outcome"), "model": r.card.get("model")}
            for r in db.scalars(query)]


def card(db: Session, version: str) -> dict[str, object]:
    row = _row(db, version)
    return {**row.card, "promoted": row.promoted}
