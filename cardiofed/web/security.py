"""Security headers on every response: an ASGI middleware (no parsing, no FastAPI).

Every page and API answer says: do not sniff types (``nosniff``), never frame me
(``frame-ancestors 'none'``, ``X-Frame-Options: DENY``), send the referrer to this
origin only (with none at all, a browser posts forms as ``Origin: null``, which the
dashboard refuses), and, as its content security policy, load scripts, styles and
forms from this origin only. The
interactive API docs (``/docs``, ``/redoc``) load FastAPI's Swagger and ReDoc bundles
from their CDN and keep the other headers without the policy.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SecurityHeaders", "STRICT_POLICY"]

STRICT_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                 "script-src 'self'; object-src 'none'; base-uri 'none'; "
                 "form-action 'self'; frame-ancestors 'none'")
_DOCS = ("/docs", "/redoc")


class SecurityHeaders:
    """Adds the headers above to every HTTP response of `app`; `policy` is the
    ``Content-Security-Policy`` (e.g. one that allows a page's inline styles)."""

    def __init__(self, app: ASGIApp, policy: str = STRICT_POLICY) -> None:
        self.app = app
        common = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"same-origin")]
        self._docs = common
        self._pages = [*common, (b"content-security-policy", policy.encode("latin-1"))]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ours = self._docs if str(scope.get("path", "")).startswith(_DOCS) else self._pages

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in ours if h[0] not in present]  # the app's own win
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
