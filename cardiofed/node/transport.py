"""A node's requests to a coordinator: retried while it is unreachable or answers 5xx,
refusals (4xx) raised with the coordinator's reason."""

from __future__ import annotations

import logging
import time

import httpx

from cardiofed.exceptions import CardioFedError

log = logging.getLogger("cardiofed.node")


class NodeError(CardioFedError):
    """The coordinator refused the node's request, or the node cannot go on."""

    def __init__(self, message: str, status_code: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code  # the coordinator's kind of refusal, e.g. "stale_update"


def send(client: httpx.Client, method: str, url: str, *, headers: dict[str, str],
         retries: int, max_delay_s: float, **kwargs: object) -> httpx.Response:
    """`method` `url` through `client`; waits double from 0.5 s up to `max_delay_s`
    between attempts."""
    delay = 0.5
    for attempt in range(retries):
        try:
            response = client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            log.warning("coordinator unreachable (%s); retry %d", type(exc).__name__, attempt)
        else:
            if response.status_code < 500:
                if response.status_code >= 400:
                    body = response.json()
                    raise NodeError(f"Coordinator refused {method} {url}: "
                                    f"{response.status_code} "
                                    f"{body.get('detail', response.text)}",
                                    response.status_code, body.get("code"))
                return response
            log.warning("coordinator error %d; retry %d", response.status_code, attempt)
        time.sleep(delay)
        delay = min(delay * 2, max_delay_s)
    raise NodeError(f"Coordinator unreachable after {retries} attempts: {method} {url}.")
