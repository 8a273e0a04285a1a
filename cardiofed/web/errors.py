"""The risk API's refusals: their bodies, their OpenAPI declarations, the 422 handler.

Every refusal is JSON with a ``detail`` string (:class:`ErrorBody`); a 422 adds one entry
per bad field (:class:`ValidationErrorBody`). A 422 body is bounded whatever was sent: it
names at most :data:`MAX_LISTED_ERRORS` fields and counts the rest, cuts long field names
and messages, and never carries the input back (FastAPI's default handler echoes each bad
value, for a list too long the whole list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cardiofed.exceptions import CoordinatorError, InvalidUpdate

MAX_LISTED_ERRORS = 20
MAX_FIELD_CHARS = 120
MAX_MESSAGE_CHARS = 240


class ErrorBody(BaseModel):
    """The body of every refusal (401, 403, 404, 409, 413, 429)."""

    detail: str = Field(description="What was refused and why.")
    code: str | None = Field(None, description="A machine-readable kind, where a client "
                                               "acts on it.")


class FieldError(BaseModel):
    field: str = Field(description="The bad field, e.g. `patients[3].features.age`.")
    message: str = Field(description="What is wrong, with the allowed range or values.")


class ValidationErrorBody(ErrorBody):
    """The body of a 422: the first bad fields, and how many more there are (none listed
    when a payload is refused as a whole: `detail` says why)."""

    errors: list[FieldError] = Field(max_length=MAX_LISTED_ERRORS)
    more_errors: int = Field(0, ge=0, description="Bad fields not listed in `errors`.")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validation_body(problems: Sequence[tuple[str, str]]) -> dict[str, object]:
    """The 422 body of `problems` (field, message): bounded in size, see the module."""
    shown = [(_cut(f, MAX_FIELD_CHARS), _cut(m, MAX_MESSAGE_CHARS))
             for f, m in problems[:MAX_LISTED_ERRORS]]
    more = len(problems) - len(shown)
    detail = "; ".join(f"{f}: {m}" for f, m in shown)
    if more:
        detail += f" (and {more:,} more invalid field{'s' if more > 1 else ''})"
    return {"detail": detail, "errors": [{"field": f, "message": m} for f, m in shown],
            "more_errors": more}


class InvalidPatient(InvalidUpdate):
    """422 listing each invalid field of the patients."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(str(validation_body(problems)["detail"]))

    def body(self) -> dict[str, object]:
        return validation_body(self.problems)


class RateLimited(CoordinatorError):
    status_code = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


def _field(loc: Sequence[int | str]) -> str:
    """``("body", "patients", 3, "features", "age")`` -> ``patients[3].features.age``."""
    where = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    out = ""
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "body"


def _problem(error: dict[str, Any]) -> tuple[str, str]:
    if error["type"] == "json_invalid":  # loc is ("body", character offset)
        reason = (error.get("ctx") or {}).get("error", "")
        return "body", f"is not valid JSON ({reason} at character {error['loc'][-1]})"
    return _field(error["loc"]), str(error["msg"])


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """The 422 of a request pydantic refuses: field and message, never the input."""
    return JSONResponse(status_code=422,
                        content=validation_body([_problem(e) for e in exc.errors()]))


async def unreadable_body(request: Request, exc: StarletteHTTPException) -> Response:
    """A JSON body that is not even text (not UTF-8) is invalid JSON like any other: 422,
    as documented, instead of FastAPI's undocumented 400. Other HTTP errors of the
    framework (405, ...) are answered as FastAPI does."""
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        return JSONResponse(status_code=422, content=validation_body(
            [("body", "is not valid JSON (not UTF-8 text)")]))
    return await http_exception_handler(request, exc)


def refusal_body(exc: CoordinatorError) -> dict[str, object]:
    """The body of a refusal; a 422 always has the fields of :class:`ValidationErrorBody`
    (`errors` is empty when a payload is refused as a whole: `detail` says why)."""
    body = exc.body()
    if exc.status_code == 422 and "errors" not in body:
        body = {**body, "errors": [], "more_errors": 0}
    return body


async def refused(_: Request, exc: CoordinatorError) -> JSONResponse:
    """The exception handler of every CardioFed service for its refusals."""
    return JSONResponse(status_code=exc.status_code, content=refusal_body(exc),
                        headers=exc.headers())


# OpenAPI: every status an endpoint answers, each with its body.
_DESCRIPTIONS: dict[int, tuple[str, type[BaseModel]]] = {
    401: ("Missing, unknown or revoked API key", ErrorBody),
    403: ("The key lacks the scope, may not use this study's models, or pins a version "
          "other than the promoted one without `score:any-version`", ErrorBody),
    404: ("No such model version (or none promoted)", ErrorBody),
    409: ("Clashes with what was already accepted (see `detail`; `code` names the kind "
          "where a client acts on it)", ErrorBody),
    413: ("Request body over this endpoint's size limit (see `detail`)", ErrorBody),
    422: ("Invalid fields, each named with its allowed range (at most 20 listed)",
          ValidationErrorBody),
    429: ("Rate limit exceeded (see Retry-After)", ErrorBody),
}


def responses(*codes: int, descriptions: Mapping[int, str] | None = None
              ) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of an endpoint answering `codes` besides its success, each
    with its body (:class:`ErrorBody`, for 422 :class:`ValidationErrorBody`); the risk
    API's descriptions unless `descriptions` gives others (the coordinator's)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description, model = _DESCRIPTIONS[code]
        out[code] = {"description": (descriptions or {}).get(code, description),
                     "model": model}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {
            "description": "Seconds until the key may send the next request.",
            "schema": {"type": "integer", "minimum": 1}}}
    return out
