"""Request body limits: an ASGI middleware that refuses an over-long body with 413.

The limit is checked before anything parses the body: against ``Content-Length`` when
the client states one (then nothing is read at all), and by counting the bytes as they
stream in otherwise (``Transfer-Encoding: chunked``, or a client that sends more than it
declared). Each path gets the limit of its longest matching prefix, so one middleware
serves an application whose endpoints need different sizes (the risk API's batch
endpoint; later the coordinator's model uploads). Pure ASGI: no FastAPI, no parsing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimits", "BodySizeLimit", "describe_size"]


def describe_size(n_bytes: int) -> str:
    """``65536`` -> ``'65,536 bytes (64 KiB)'``: exact, and readable."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= size:
            return f"{n_bytes:,} bytes ({n_bytes / size:.4g} {unit})"
    return f"{n_bytes:,} bytes"


@dataclass(frozen=True)
class BodyLimits:
    """Request body limits in bytes: that of the first of `routes` (regular expressions)
    the whole path matches, else that of the longest prefix in `prefixes` that matches
    the path at a segment boundary (``/v1/risk/batch`` matches ``/v1/risk/batch`` and
    ``/v1/risk/batch/x``, not ``/v1/risk/batches``), else `default`."""

    default: int
    prefixes: Mapping[str, int] = field(default_factory=dict)
    routes: Mapping[str, int] = field(default_factory=dict)
    _compiled: tuple[tuple[re.Pattern[str], int], ...] = field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(
            (re.compile(pattern), limit) for pattern, limit in self.routes.items()))
        for where, limit in [("default", self.default), *self.prefixes.items(),
                             *self.routes.items()]:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"The body limit of {where!r} must be an integer >= 0 "
                                 f"bytes; got {limit!r}.")
        for prefix in self.prefixes:
            if not prefix.startswith("/"):
                raise ValueError(f"A body limit's path prefix must start with '/'; got "
                                 f"{prefix!r}.")

    def for_path(self, path: str) -> int:
        for pattern, route_limit in self._compiled:
            if pattern.fullmatch(path):
                return route_limit
        best, limit = -1, self.default
        for prefix, prefix_limit in self.prefixes.items():
            stem = prefix.rstrip("/")
            if (path == stem or path.startswith(stem + "/")) and len(stem) > best:
                best, limit = len(stem), prefix_limit
        return limit


class _BodyTooLarge(Exception):
    """Raised into the application by `receive` once the body passes its limit."""


class BodySizeLimit:
    """ASGI middleware: a request whose body exceeds its path's limit gets
    ``413 {"detail": "..."}`` naming the limit, and the application never sees more than
    the limit of it.

    With ``Content-Length`` over the limit the application is not called. A streamed body
    is counted chunk by chunk; the chunk that passes the limit raises inside the
    application's ``receive``, and whatever the application answers to that (FastAPI
    answers 400, a plain endpoint raises) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return

        received = 0
        over = False  # the body passed the limit ...
        started = False  # ... and whether a response had started before it did

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the application's answer to a body it could not read: dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await _refuse(send, limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length; counting still applies
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"The request body exceeds this endpoint's limit of "
                                 f"{describe_size(limit)}."}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
