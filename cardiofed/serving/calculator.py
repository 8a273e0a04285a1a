"""The risk calculator page of ``cardiofed serve`` (``/calculator``).

A form for one patient (each feature in the units the API accepts), answered with the
risk, its category, each feature's contribution as a chart, and the model's version and
card. The answer comes from :func:`cardiofed.serving.api.risk`, the code of
``POST /v1/risk``, with the API key typed in the form; nothing typed is stored or logged,
and the pages are sent ``no-store``.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import ValidationError

from cardiofed.exceptions import CoordinatorError
from cardiofed.schema import FeatureKind
from cardiofed.serving import registry
from cardiofed.serving.api import ServingState, caller_of, risk
from cardiofed.serving.model import RiskModel
from cardiofed.serving.schemas import RiskRequest
from cardiofed.web.errors import InvalidPatient

router = APIRouter(include_in_schema=False)
_templates = Environment(loader=PackageLoader("cardiofed.serving", "templates"),
                         autoescape=select_autoescape(["html"]))
NO_STORE = {"Cache-Control": "no-store"}
_SCRIPT = (files("cardiofed.serving") / "templates" / "calculator.js").read_text("utf-8")


def _ranges(feature: Any) -> list[tuple[str, str]]:
    """The plausible range in every unit the form offers, e.g. ``[("years", "18-110
    years"), ("months", "216-1320 months")]``: the page shows the chosen unit's (all of
    them without JavaScript)."""
    if feature.low is None or feature.high is None or not feature.unit:
        return []
    return [(unit, f"{feature.low / factor:.4g}-{feature.high / factor:.4g} {unit}")
            for unit, factor in [(feature.unit, 1.0), *feature.unit_factors.items()]]


def _fields(model: RiskModel) -> list[dict[str, Any]]:
    """The form's inputs: one per feature of the model, with its units or codes."""
    out = []
    for name in model.card.features:
        f = model.catalogue.feature(name)
        out.append({"name": name, "kind": f.kind.value, "description": f.description,
                    "units": [f.unit, *f.unit_factors] if f.unit else [],
                    "codes": list(f.codes), "low": f.low, "high": f.high,
                    "ranges": _ranges(f)})
    return out


def _page(state: ServingState, status_code: int = 200, **context: Any) -> HTMLResponse:
    version = state.promoted()
    model = state._load(version) if version else None
    html = _templates.get_template("calculator.html").render(
        model=model, fields=_fields(model) if model else [], **{"values": {}, **context})
    return HTMLResponse(html, status_code=status_code, headers=NO_STORE)


@router.get("/calculator.js")
def calculator_script() -> Response:
    """The page's one script, from this origin (the security policy refuses inline
    scripts): each plausible range follows the unit chosen."""
    return Response(_SCRIPT, media_type="text/javascript")


@router.get("/calculator", response_class=HTMLResponse)
def calculator(request: Request) -> HTMLResponse:
    return _page(request.app.state.serving)


def _patient(model: RiskModel, form: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    features: dict[str, Any] = {}
    units: dict[str, str] = {}
    for name in model.card.features:
        raw = form.get(f"f.{name}", "").strip()
        if not raw:
            continue
        kind = model.catalogue.feature(name).kind
        if kind is FeatureKind.CONTINUOUS:
            try:
                features[name] = float(raw)
            except ValueError:
                features[name] = raw  # refused by the API's checks, with the reason
            unit = form.get(f"u.{name}", "")
            if unit and unit != model.catalogue.feature(name).unit:
                units[name] = unit
        elif kind is FeatureKind.BINARY:
            features[name] = int(raw) if raw in ("0", "1") else raw
        else:
            features[name] = raw
    return features, units


@router.post("/calculator", response_class=HTMLResponse)
async def calculate(request: Request) -> HTMLResponse:
    state: ServingState = request.app.state.serving
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace"),
                                          keep_blank_values=True).items()}
    values = {k: v for k, v in form.items() if k != "api_key"}  # the key is never echoed
    try:
        caller = caller_of(state, form.get("api_key", "").strip() or None, "score")
        model = caller.model(None)
        features, units = _patient(model, form)
        if not features:
            raise InvalidPatient([("features", "enter at least one feature")])
        body = RiskRequest(features=features, units=units, model=None,
                           site=form.get("site") or None,
                           impute_missing=form.get("impute_missing") == "1")
        answer = json.loads(bytes((await risk(body, caller)).body))
    except InvalidPatient as exc:
        return _page(state, 422, values=values,
                     problems=[f"{field}: {message}" for field, message in exc.problems])
    except ValidationError as exc:
        return _page(state, 422, values=values,
                     problems=[f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                               for e in exc.errors()])
    except CoordinatorError as exc:
        return _page(state, exc.status_code, values=values, problems=[str(exc)])
    with state.sessions() as db:
        card = registry.card(db, answer["model_version"])
    parts = sorted((answer.get("contributions") or {}).items(), key=lambda kv: -abs(kv[1]))
    scale = max((abs(v) for _, v in parts), default=1.0) or 1.0
    return _page(state, values=values, answer=answer, card=card, parts=parts, scale=scale,
                 learnt_from=model.learnt_from)
