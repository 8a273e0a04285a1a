"""The node's local log of every outbound payload: time, type, bytes, SHA-256.

One JSON line per payload, appended and fsynced before the payload is sent, so the
site can always show what left it (``cardiofed node audit``). Payload contents are not
logged, only their size and hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path


class OutboundLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, kind: str, payload: bytes, destination: str) -> str:
        digest = hashlib.sha256(payload).hexdigest()
        line = json.dumps({"time": time.time(), "kind": kind, "bytes": len(payload),
                           "sha256": digest, "destination": destination})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return digest

    def entries(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict[str, dict[str, int]]:
        """Payload count and bytes by kind."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"payloads": 0, "bytes": 0})
        for entry in self.entries():
            kind = str(entry["kind"])
            out[kind]["payloads"] += 1
            out[kind]["bytes"] += int(entry["bytes"])  # type: ignore[call-overload]
        return dict(out)
