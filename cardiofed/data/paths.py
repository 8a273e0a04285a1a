"""Where the reference data sets live: ``$CARDIOFED_DATA_DIR`` or ``../shared/data``.

The UCI Heart Disease files (CC BY 4.0, 50 KB) also ship inside the package
(``cardiofed/data/reference/uci_heart``, with their licence and citation): they are used
when no data folder holds them, so ``--dataset uci-heart`` works from a fresh install.
Framingham has no such licence and is only read from a data folder.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGED = Path(__file__).resolve().parent / "reference"
_PACKAGED_SETS = ("uci_heart",)


def data_dir() -> Path:
    """``$CARDIOFED_DATA_DIR`` if set, else ``shared/data`` beside the project root."""
    env = os.environ.get("CARDIOFED_DATA_DIR")
    return Path(env) if env else _REPO_ROOT.parent / "shared" / "data"


def require(relative: str, base: str | Path | None = None) -> Path:
    """``base / relative`` (``base`` defaults to :func:`data_dir`; when that holds no
    copy, the packaged one of a set that ships with CardioFed), or an error saying how to
    provide it."""
    path = Path(base if base is not None else data_dir()) / relative
    if not path.exists() and base is None and relative.split("/")[0] in _PACKAGED_SETS:
        path = PACKAGED / relative
    if not path.exists():
        raise FileNotFoundError(
            f"Reference data {relative!r} not found at {path}. Set CARDIOFED_DATA_DIR to the "
            f"folder holding uci_heart/ and framingham/, or pass data_dir explicitly."
        )
    return path
