"""What crosses the wire: named arrays as safetensors plus a JSON manifest; no pickle.

Every payload a site sends is one of :data:`PAYLOAD_KINDS`. Arrays (model updates,
federated statistics) travel as safetensors bytes whose string metadata carries the
manifest (study, round, model version, ...); metrics travel as JSON. Decoding checks
the header before touching data and rejects non-finite values.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from cardiofed.exceptions import DataValidationError

PAYLOAD_KINDS = ("update", "statistics", "metrics")
MAX_HEADER_BYTES = 1 << 20


def encode_arrays(arrays: dict[str, np.ndarray], manifest: dict[str, str] | None = None) -> bytes:
    """Named arrays (and a string manifest) as safetensors bytes."""
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                  metadata=dict(manifest or {}))


def decode_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into arrays and their manifest; reject non-finite values."""
    if len(data) < 8:
        raise DataValidationError(f"Payload of {len(data)} bytes is too short for safetensors.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise DataValidationError(f"Payload header length {header_len} is invalid.")
    try:
        header = json.loads(data[8:8 + header_len])
        arrays = safetensors.numpy.load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise DataValidationError(f"Payload is not valid safetensors: {exc}") from None
    for name, value in arrays.items():
        if not np.isfinite(value).all():
            raise DataValidationError(f"Array {name!r} contains non-finite values.")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise DataValidationError("Payload manifest ('__metadata__') must map strings to "
                                  "strings.")
    return arrays, dict(metadata)


def encode_metrics(metrics: Mapping[str, object]) -> bytes:
    """Metrics as JSON (non-finite values become null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in metrics.items()}
    return json.dumps(clean, sort_keys=True).encode()
