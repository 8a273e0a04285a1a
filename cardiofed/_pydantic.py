"""Reading settings files: TOML files and pydantic errors, each turned into one clear line."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def validation_problems(exc: ValidationError, root: str, *, values: bool = False) -> str:
    """``field.path: message; ...`` (``root`` names errors of the whole object);
    `values`: each field's error ends with the value given."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or root}: "
                     f"{err['msg'].removeprefix('Value error, ')}"
                     + (f" (got {err['input']!r})" if values and err["loc"] else "")
                     for err in exc.errors())


def read_toml(path: Path, label: str, error: type[Exception]) -> dict[str, Any]:
    """The parsed file, or `error` saying "<label> <path> does not exist / is not valid TOML"."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{label} {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{label} {path} is not valid TOML: {exc}") from None
