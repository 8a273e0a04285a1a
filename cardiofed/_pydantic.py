"""Turn a pydantic ValidationError into one line that names each bad field."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(exc: ValidationError, root: str) -> str:
    """``field.path: message; ...`` (``root`` names errors of the whole object)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or root}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in exc.errors())
