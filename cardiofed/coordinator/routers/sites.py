"""Sites: enrolment (one-time token -> credential) and the site's tasks."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cardiofed.coordinator import service
from cardiofed.coordinator.deps import DB, CurrentSite, Settings
from cardiofed.coordinator.schemas import EnrolRequest, EnrolResponse, TaskResponse
from cardiofed.coordinator.storage import Site

router = APIRouter(prefix="/v1", tags=["sites"])


@router.post("/enrol")
def enrol(body: EnrolRequest, db: DB) -> EnrolResponse:
    site, credential = service.enrol(db, body.token)
    return EnrolResponse(study=site.study_id, site=site.name, site_index=site.index,
                         credential=credential)


@router.get("/me")
def me(site: CurrentSite) -> dict[str, object]:
    """The authenticated site's name, study and index."""
    return {"site": site.name, "study": site.study_id, "site_index": site.index}


@router.get("/tasks/next", response_model=TaskResponse,
            responses={204: {"description": "Nothing to do now; poll again."}})
async def next_task(site: CurrentSite, db: DB, settings: Settings, wait: float = 0.0) -> object:
    """The site's next task. With ``wait`` (seconds, capped by the server's long-poll
    limit) the request is held until a task appears or the time is up. While it waits
    it holds neither a worker thread nor a database connection."""
    give_up = time.monotonic() + min(max(wait, 0.0), settings.long_poll_s)
    while True:
        task = await run_in_threadpool(_poll, db, site)
        if task is not None or time.monotonic() >= give_up:
            return task if task is not None else Response(status_code=204)
        await asyncio.sleep(0.2)


def _poll(db: Session, site: Site) -> TaskResponse | None:
    try:
        db.expire_all()
        task = service.next_task(db, site)
        if task is None:
            return None
        study = service.get_study(db, task.study_id)
        return TaskResponse(study=task.study_id, round=task.round, kind=task.kind,
                            model_version=task.model_version, deadline=task.deadline,
                            site_index=site.index, plan=study.plan,
                            feature_names=study.feature_names,
                            feature_ranges=study.feature_ranges)
    finally:
        db.rollback()  # end the transaction: the connection goes back to the pool
