"""Prometheus metrics of a CardioFed service (``GET /metrics``, text format).

Each application has its own registry: requests by route template, method and status,
their latency, rate-limited requests; a service adds its own counters and collectors
(the coordinator: uploads accepted and refused; gauges it reads from its database at
scrape time, rounds closed and updates buffered, right with several processes too).
Request counters are per process: with several workers, scrape each or sum them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                      "CONNECT"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)


class ServiceMetrics:
    """The registry of one service and its request metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cardiofed_http_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cardiofed_http_request_duration_seconds",
                                 "Time to answer a request", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rate_limited = Counter("cardiofed_rate_limited_requests",
                                    "Requests refused by a rate limit (429)",
                                    registry=self.registry)

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, registry=self.registry)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware counting every HTTP request by its route template (``/v1/studies/
    {study_id}/status``, never the values in the path) and timing it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._cache: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            # A client picks the method: any outside HTTP's own is one label value, so
            # made-up methods cannot grow the metrics without bound.
            method = method if method in _METHODS else "OTHER"
            requests, latency = self._children(template, method, status)
            requests.inc()
            latency.observe(time.perf_counter() - start)
            if status == 429:
                self.metrics.rate_limited.inc()

    def _children(self, template: str, method: str, status: int) -> tuple[Any, Any]:
        """The counter and histogram of one route, method and status (looked up once)."""
        key = (template, method, status)
        children = self._cache.get(key)
        if children is None:
            children = (self.metrics.requests.labels(template, method, str(status)),
                        self.metrics.latency.labels(template, method))
            self._cache[key] = children
        return children
