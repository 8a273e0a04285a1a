"""Long-polls woken when their study changes, instead of at their next look.

A waiting ``GET /v1/tasks/next`` looks again as soon as an upload that may close the
round, a refusal or the last secure-sum message of a step for the same study is stored
in this process, and
otherwise every :data:`LOOK_S` seconds (a deadline passing, or a round closed by another
worker's request). Measured with bench/secure_network.py's code at 50 sites: looking
every 0.2 s without wake-ups, the waiting polls took the CPU the round needed, 20 to 25 s
a secure round; woken, and looking every second, about 6 s."""

from __future__ import annotations

import asyncio
import contextlib

LOOK_S = 1.0

# study id -> the event its long-polls wait on, and the loop they wait in
_events: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}


def listen(study_id: str) -> asyncio.Event:
    """The event the next change of `study_id` sets: taken before a poll looks, so that
    a change while it looks is not missed."""
    loop = asyncio.get_running_loop()
    entry = _events.get(study_id)
    if entry is None or entry[0] is not loop:  # none yet, or left by another loop (tests)
        entry = _events[study_id] = (loop, asyncio.Event())
    return entry[1]


async def wait(event: asyncio.Event, timeout: float = LOOK_S) -> None:
    """Until `event` is set (its study changed), at most `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def notify(study_id: str) -> None:
    """Wake the long-polls waiting on `study_id` (from any thread)."""
    entry = _events.pop(study_id, None)
    if entry is not None and not entry[0].is_closed():
        entry[0].call_soon_threadsafe(entry[1].set)
