"""The risk calculator page of the risk API and /metrics of the risk API."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from test_serving import PATIENT, Api, _trained  # type: ignore[import-not-found]

from cardiofed.serving.model import RiskModel


@pytest.fixture(scope="module")
def model() -> RiskModel:
    return _trained()


@pytest.fixture
def api(tmp_path: Path, model: RiskModel) -> Api:
    return Api(tmp_path, model)


def _form(api: Api, **extra: str) -> dict[str, str]:
    form = {"api_key": api.score_key, **extra}
    for name, value in PATIENT.items():
        form[f"f.{name}"] = str(int(value)) if isinstance(value, bool) else str(value)
    return form


def test_calculator_form_lists_the_model_features_and_units(api: Api,
                                                            model: RiskModel) -> None:
    r = api.client.get("/calculator")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    for name in model.card.features:
        assert f'name="f.{name}"' in r.text
    assert "<option>mmol/L</option>" in r.text  # cholesterol in the API's other unit


def test_calculator_answers_what_the_api_answers(api: Api,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    page = api.client.post("/calculator", data=_form(api))
    assert page.status_code == 200, page.text
    expected = api.post("/v1/risk", {"features": PATIENT}).json()
    shown = re.search(r'data-risk="([^"]+)"', page.text)
    assert shown and float(shown.group(1)) == pytest.approx(expected["risk"], abs=1e-12)
    assert f'<span id="category">{expected["category"]}</span>' in page.text
    assert expected["model_version"] in page.text and "<rect" in page.text
    assert api.score_key not in page.text  # the key is never echoed
    logged = caplog.text
    assert api.score_key not in logged and "213.0" not in logged  # nothing typed is logged


def test_calculator_converts_units_like_the_api(api: Api) -> None:
    mmol = 213.0 / 38.67
    form = {**_form(api), "f.total_cholesterol": str(mmol), "u.total_cholesterol": "mmol/L"}
    page = api.client.post("/calculator", data=form)
    expected = api.post("/v1/risk", {"features": {**PATIENT, "total_cholesterol": mmol},
                                     "units": {"total_cholesterol": "mmol/L"}}).json()
    shown = re.search(r'data-risk="([^"]+)"', page.text)
    assert shown and float(shown.group(1)) == pytest.approx(expected["risk"], abs=1e-12)


def test_calculator_names_each_problem_and_keeps_what_was_typed(api: Api) -> None:
    page = api.client.post("/calculator", data={**_form(api), "f.age": "300",
                                                "f.systolic_bp": ""})
    assert page.status_code == 422
    assert "features.age" in page.text and "features.systolic_bp" in page.text
    assert 'value="300"' in page.text
    refused = api.client.post("/calculator", data={**_form(api), "api_key": "nope"})
    assert refused.status_code == 401 and "API key" in refused.text


def test_risk_api_metrics_need_an_admin_key(api: Api) -> None:
    api.post("/v1/risk", {"features": PATIENT})
    assert api.get("/metrics", key=api.score_key).status_code == 403
    r = api.get("/metrics", key=api.admin_key)
    assert r.status_code == 200
    assert 'cardiofed_http_requests_total{method="POST",route="/v1/risk",status="200"}' in r.text


def test_made_up_methods_share_one_metrics_label(api: Api) -> None:
    """A client picks the method: any outside HTTP's own is counted as OTHER, so a
    stream of invented methods cannot grow the metrics without bound."""
    for method in ("BREW", "WHEN", "X-1", "BREW"):
        assert api.client.request(method, "/v1/risk").status_code == 405
    text = api.get("/metrics", key=api.admin_key).text
    assert 'method="OTHER",route="/v1/risk",status="405"} 4.0' in text
    assert "BREW" not in text and "WHEN" not in text


def test_a_header_the_application_sets_itself_wins_and_is_not_repeated() -> None:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from fastapi.testclient import TestClient

    from cardiofed.web.security import SecurityHeaders

    app = FastAPI()

    @app.get("/framed")
    def framed() -> PlainTextResponse:
        return PlainTextResponse("x", headers={"X-Frame-Options": "SAMEORIGIN"})

    app.add_middleware(SecurityHeaders)
    r = TestClient(app).get("/framed")
    assert r.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_the_risk_api_sends_security_headers(api: Api) -> None:
    for path in ("/calculator", "/healthz"):
        r = api.client.get(path)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "content-security-policy" not in api.client.get("/docs").headers  # CDN bundles
