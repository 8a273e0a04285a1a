"""Long-polls woken when their study changes, instead of at their next look.

A waiting ``GET /v1/tasks/next`` looks again every :data:`LOOK_S` seconds, or as soon as
a site's upload, refusal or secure-sum message to the same study is stored in this
process (a study whose rounds close on another worker's request is seen at the next
look). A secure round takes four steps, each of which every site must see: without
this, each step waited for the sites' next look.
"""

from __future__ import annotations

import asyncio
import contextlib

LOOK_S = 0.2

# study id -> the event its long-polls wait on, and the loop they wait in
_events: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}


async def wait(study_id: str, timeout: float = LOOK_S) -> None:
    """Until `study_id` changes in this process, at most `timeout` seconds."""
    loop, event = _events.setdefault(study_id, (asyncio.get_running_loop(), asyncio.Event()))
    if loop is not asyncio.get_running_loop():  # left by another loop (tests): a new one
        event = asyncio.Event()
        _events[study_id] = (asyncio.get_running_loop(), event)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def notify(study_id: str) -> None:
    """Wake the long-polls waiting on `study_id` (from any thread); a poll that starts
    waiting meanwhile looks again after :data:`LOOK_S` at the latest."""
    entry = _events.pop(study_id, None)
    if entry is not None and not entry[0].is_closed():
        entry[0].call_soon_threadsafe(entry[1].set)
