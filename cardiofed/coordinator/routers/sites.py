"""Sites: enrolment (one-time token -> credential) and the site's tasks."""

from __future__ import annotations

import time
from datetime import UTC
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cardiofed.coordinator import attribution, enrolment, studies, wakeups
from cardiofed.coordinator.deps import DB, Clock, CurrentSite, ReleasingRoute, Settings, refusals
from cardiofed.protocol.schemas import EnrolRequest, EnrolResponse, SiteInfo, TaskResponse
from cardiofed.store import Site

router = APIRouter(prefix="/v1", tags=["sites"], route_class=ReleasingRoute)


@router.post("/enrol", responses=refusals(401, 413, 422))
def enrol(body: EnrolRequest, db: DB) -> EnrolResponse:
    site, credential = enrolment.enrol(db, body.token)
    return EnrolResponse(study=site.study_id, site=site.name, site_index=site.index,
                         credential=credential)


@router.get("/me", responses=refusals(401, 413))
def me(site: CurrentSite) -> SiteInfo:
    """The authenticated site's name, study and index."""
    return SiteInfo(site=site.name, study=site.study_id, site_index=site.index)


STUDY_PHASE = "X-Study-Phase"


@router.get("/tasks/next", response_model=TaskResponse,
            responses={204: {"description": "Nothing to do now; poll again. Header "
                                            "X-Study-Phase: done once the study finished, "
                                            "else running.",
                             "headers": {STUDY_PHASE: {"schema": {"type": "string"}}}},
                       **refusals(401, 413, 422)})
async def next_task(site: CurrentSite, db: DB, settings: Settings, request: Request,
                    clock: Clock,
                    wait: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)] = 0.0
                    ) -> object:
    """The site's next task. With ``wait`` (seconds, at most 3600, capped by the server's
    long-poll limit) the request is held until a task appears or the time is up; it
    ends at once when the client goes away. While it waits it holds neither a worker
    thread nor a database connection."""
    give_up = time.monotonic() + min(wait, settings.long_poll_s)
    study_id = site.study_id  # read now: each look expires the site (a read would block)
    while True:
        changed = wakeups.listen(study_id)
        task = await run_in_threadpool(_poll, db, site, clock)
        if isinstance(task, TaskResponse):
            return task
        if task == "done" or time.monotonic() >= give_up or await request.is_disconnected():
            # A finished study answers at once, and says so (no status request needed).
            return Response(status_code=204, headers={
                STUDY_PHASE: "done" if task == "done" else "running"})
        await wakeups.wait(changed)


def _poll(db: Session, site: Site, clock: studies.Clock) -> TaskResponse | str | None:
    """The site's task, "done" when its study has finished, or None."""
    try:
        db.expire_all()
        task = enrolment.next_task(db, site, clock)
        if task is None:
            return "done" if studies.get_study(db, site.study_id).phase == "done" else None
        study = studies.get_study(db, task.study_id)
        return TaskResponse(study=task.study_id, round=task.round, kind=task.kind,
                            model_version=task.model_version,
                            deadline=task.deadline.replace(tzinfo=UTC),
                            site_index=site.index, plan=study.plan,
                            feature_names=study.feature_names,
                            feature_ranges=study.feature_ranges,
                            outcome=study.outcome, attribution=attribution.task_state(study),
                            secure=task.secure)
    finally:
        db.rollback()  # end the transaction: the connection goes back to the pool
