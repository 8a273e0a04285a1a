"""The risk API's request log: one line per request, never a body.

A line holds the request id (also sent back as ``X-Request-ID``), method, path, status,
bytes in and out, and latency, so no patient value reaches a log.
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cardiofed.serving")


class RequestLog:
    """ASGI middleware: a request id header and one log line per request, no bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        sizes = {"in": 0, "out": 0, "status": 500}

        async def counting_receive() -> Message:
            message = await receive()
            sizes["in"] += len(message.get("body", b""))
            return message

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sizes["status"] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagged_send)
        finally:
            log.info("request_id=%s method=%s path=%s status=%d bytes_in=%d bytes_out=%d "
                     "latency_ms=%.2f", request_id, scope["method"], scope["path"],
                     sizes["status"], sizes["in"], sizes["out"],
                     (time.perf_counter() - started) * 1000)
