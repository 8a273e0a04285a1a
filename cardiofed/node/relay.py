"""A region's node: one site of the national study that relays each national task to its
regional coordinator's relay study (:mod:`cardiofed.protocol.relay`).

For the statistics task it waits for the regional round 0 (opened with the study) and
sends its sums; for a training or evaluation task it hands the national preprocessor
and model to the relay study, opens the round of the same number there, and once that
round closes sends its aggregate as the region's update (or evaluation). Every step is
idempotent, so a restarted region's node picks up where it was.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from typing import Any

import httpx

from cardiofed.exceptions import ConfigurationError, TaskRefused
from cardiofed.node.config import RegionSettings
from cardiofed.node.transport import send
from cardiofed.protocol.relay import plan_differences
from cardiofed.protocol.schemas import TaskResponse
from cardiofed.wire import decode_arrays, encode_arrays

Fetch = Callable[[str], bytes]  # GET on the national coordinator, the region's credential


class RegionRelay:
    """Drives relay study ``settings.study`` on the regional coordinator. ``client`` may
    be any ``httpx.Client`` (tests pass one over an in-process ASGI transport)."""

    def __init__(self, settings: RegionSettings, client: httpx.Client | None = None,
                 max_delay_s: float = 10.0) -> None:
        try:
            key = settings.admin_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(f"region.admin_key_file {settings.admin_key_file} cannot "
                                     f"be read: {exc.strerror}.") from None
        self.settings, self.max_delay_s = settings, max_delay_s
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = client or httpx.Client(
            base_url=settings.coordinator_url, timeout=120,
            verify=ssl.create_default_context(cafile=str(settings.ca_file))
            if settings.ca_file else True)
        self.base = f"/v1/studies/{settings.study}/relay"
        self._opened: set[tuple[str, int]] = set()  # (national study, round) handed down

    def _call(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        return send(self.client, method, self.base + url, headers=self.headers, retries=30,
                    max_delay_s=self.max_delay_s, **kwargs)

    def check(self, task: TaskResponse) -> dict[str, Any]:
        """The relay study's state; refused unless it runs the national task's plan on
        the same columns and outcome."""
        info: dict[str, Any] = self._call("GET", "").json()
        where = f"regional study {self.settings.study!r}"
        differ = plan_differences(task.plan, info["plan"])
        if differ:
            raise TaskRefused(f"The {where} runs another plan than the national study: "
                              f"{', '.join(differ[:10])} differ.")
        if (info["feature_names"], info["feature_ranges"], info["outcome"]) != (
                task.feature_names, task.feature_ranges, task.outcome):
            raise TaskRefused(f"The {where} has other feature columns, ranges or outcome "
                              f"than the national study.")
        return info

    def payload(self, task: TaskResponse, national: Fetch, manifest: dict[str, str]
                ) -> bytes | None:
        """The region's payload for `task` (with the national `manifest`), or None while
        the regional round waits for its sites."""
        if (task.study, task.round) not in self._opened:
            info = self.check(task)
            if task.kind != "statistics":
                self._hand_down(task, info, national)
            self._opened.add((task.study, task.round))
        response = self._call("GET", f"/rounds/{0 if task.kind == 'statistics' else task.round}")
        if response.status_code == 204:
            return None
        if task.kind == "evaluate":
            return response.content  # the regional summary (JSON metrics)
        arrays, own = decode_arrays(response.content)
        return encode_arrays(arrays, {**own, **manifest})

    def _hand_down(self, task: TaskResponse, info: dict[str, Any], national: Fetch) -> None:
        study = task.study
        pre = national(f"/v1/studies/{study}/preprocessor")
        if info["preprocessor_sha256"] != hashlib.sha256(pre).hexdigest():
            self._call("PUT", "/preprocessor", content=pre)
        if task.model_version not in info["model_versions"]:
            self._call("PUT", f"/models/{task.model_version}",
                       content=national(f"/v1/studies/{study}/models/{task.model_version}"))
        self._call("POST", "/rounds", json={"number": task.round, "kind": task.kind,
                                            "model_version": task.model_version})
