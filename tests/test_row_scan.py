"""The payload scan finds a dumped row whose values are all integers (ages, codes)."""

from __future__ import annotations

import numpy as np

from cardiofed.experiments.privacy_audit import scan_payloads


def test_a_row_of_integers_dumped_as_floats_is_found() -> None:
    row = np.array([[63.0, 1.0, 145.0, 233.0]])
    leaked = b"header" + row.astype("<f4").tobytes() + b"tail"

    matches = scan_payloads([("site_a", "update", leaked)], row)

    assert [(m.kind, m.feature, m.encoding) for m in matches] == [
        ("update", -1, "row float32 raw")]


def test_the_same_integers_apart_are_not_a_row() -> None:
    row = np.array([[63.0, 1.0, 145.0, 233.0]])
    scattered = b"".join(np.float32(v).tobytes() + b"\x00" * 4 for v in row[0])

    assert scan_payloads([("site_a", "update", scattered)], row) == []
