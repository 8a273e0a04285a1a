"""The dashboard and the risk calculator in a real browser: Playwright driving the
distribution's Chromium (``.ci/run`` installs it when missing), against a coordinator and
nodes running as processes on loopback. Set ``CARDIOFED_SCREENSHOTS`` to a folder to
keep a screenshot of each page (the README's come from here)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402
from test_network_loopback import (  # type: ignore[import-not-found]  # noqa: E402
    HOST,
    STUDY_S,
    SYN_PLAN,
    SYN_SITES,
    Coordinator,
    Federation,
    Processes,
    free_port,
    procs,  # noqa: F401, F811  (the fixture)
)
from test_serving import PATIENT, Api, _trained  # type: ignore[import-not-found]  # noqa: E402

CHROMIUM = next((p for p in (os.environ.get("CARDIOFED_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=(
    "no Chromium on PATH (.ci/run installs the distribution's; or set CARDIOFED_CHROMIUM)"))
SHOTS = os.environ.get("CARDIOFED_SCREENSHOTS")
# A loaded machine answers slower than the browser expects by default (5 s).
expect.set_options(timeout=60_000)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """The browser for this module only: Playwright's sync API keeps an event loop
    running while it is open, which later tests calling asyncio.run must not meet."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context()
    yield context.new_page()
    context.close()


def _shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def test_dashboard_follows_a_study_revokes_a_site_and_refuses_a_forged_form(
        page: Page, procs: Processes) -> None:  # noqa: F811
    coordinator = Coordinator(procs, "ui").ready()
    fed = Federation(procs, coordinator, "browser", "synthetic", SYN_SITES,
                     {**SYN_PLAN, "rounds": 3}, min_sites=2)
    page.goto(f"{coordinator.url}/ui")
    expect(page).to_have_url(f"{coordinator.url}/ui/login")
    _shot(page, "login")
    page.fill("#credential", "not-the-key")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("Unknown credential")
    page.fill("#credential", coordinator.key_file.read_text().strip())
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{coordinator.url}/ui")
    page.click("text=browser")

    absent = SYN_SITES[2]  # never started: the study waits for it
    fed.start(*SYN_SITES[:2])
    row = page.locator(f'tr[data-site="{absent}"]')
    expect(page.locator("#waiting")).to_contain_text(absent)
    forged = page.request.post(f"{coordinator.url}/ui/studies/browser/sites/{absent}/revoke",
                               form={"csrf": "0" * 64})
    assert forged.status == 403 and "CSRF" in forged.text()
    expect(row).not_to_contain_text("revoked")

    row.get_by_role("button", name=f"Revoke {absent}").click()
    expect(page.locator("h1")).to_contain_text(f"Revoke site {absent} of study browser?")
    _shot(page, "confirm-revoke")
    page.get_by_role("button", name=f"Revoke {absent}").click()
    expect(page.locator(f'tr[data-site="{absent}"]')).to_contain_text("revoked")
    # The page refreshes itself; the study goes on without the revoked site.
    expect(page.locator("h1 .phase")).to_have_text("done", timeout=STUDY_S * 1000)
    expect(page.locator("svg.chart rect")).to_have_count(2)  # the final model's AUC per site
    _shot(page, "study")
    codes = procs.wait([f"browser-{s}" for s in SYN_SITES[:2]], STUDY_S)
    assert set(codes.values()) == {0}
    page.click("text=Audit log")
    expect(page.locator("table")).to_contain_text("revoke site")
    _shot(page, "audit")
    page.click("text=Studies")
    _shot(page, "studies")
    page.click("text=Log out")
    expect(page).to_have_url(f"{coordinator.url}/ui/login")


def test_calculator_in_the_browser_equals_the_api(page: Page, tmp_path: Path) -> None:
    import uvicorn

    from cardiofed.serving.app import create_serving_app
    from cardiofed.serving.settings import ServingSettings

    api = Api(tmp_path, _trained())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_serving_app(ServingSettings(database_url=api.url)), host=HOST, port=port,
        log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        give_up = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < give_up and thread.is_alive()
            time.sleep(0.05)
        page.goto(f"http://{HOST}:{port}/calculator")
        page.fill("#api_key", api.score_key)
        for name, value in PATIENT.items():
            field = f'[name="f.{name}"]'
            if isinstance(value, bool):
                page.select_option(field, "1" if value else "0")
            elif isinstance(value, str):
                page.select_option(field, value)
            else:
                page.fill(field, str(value))
        page.click("button[type=submit]")
        expect(page.locator("#risk")).to_be_visible()
        shown = float(page.locator("#risk").get_attribute("data-risk") or "nan")
        expected = api.post("/v1/risk", {"features": PATIENT}).json()
        assert shown == pytest.approx(expected["risk"], abs=1e-12)
        expect(page.locator("#category")).to_have_text(expected["category"])
        expect(page.locator("#model-version")).to_have_text(expected["model_version"])
        _shot(page, "calculator")
        # At phone width the page is one column, nothing wider than the screen.
        page.set_viewport_size({"width": 400, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
        expect(page.locator("#risk")).to_be_visible()
        # The plausible range follows the unit chosen.
        hint = page.locator('select[name="u.age"] + .desc')
        expect(hint).to_have_text("plausible: 18-110 years", use_inner_text=True)
        page.select_option('select[name="u.age"]', "months")
        expect(hint).to_have_text("plausible: 216-1320 months", use_inner_text=True)
        expect(page.get_by_text("Learnt from:")).to_contain_text("sites")
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_report_opens_with_each_sites_answer_readable_at_1366_px(
        page: Page, tmp_path: Path) -> None:
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.experiments.clinical_value import clinical_value
    from cardiofed.experiments.summary import write_experiment_report
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import run_experiment

    data = synthetic_federation(n_sites=6, seed=1, size_scale=0.3)
    result = run_experiment(data, SimulationConfig.create(rounds=3, eval_every=0))
    report = write_experiment_report(result, tmp_path, title="A federation",
                                     value=clinical_value(result, {}))
    page.set_viewport_size({"width": 1366, "height": 768})
    page.goto(report.resolve().as_uri())
    answer = page.locator("h2").first
    expect(answer).to_have_text("What each site gets from the federation")
    assert (answer.bounding_box() or {"y": 1e9})["y"] < 200  # first on the page
    assert page.evaluate("document.documentElement.scrollWidth") <= 1366  # no page scroll
    # Every site's verdict is on the first screen, beside its name.
    for site in [s.name for s in data.sites]:
        row = page.locator("tr", has=page.locator("td", has_text=site)).first
        expect(row).to_be_visible()
        assert (row.bounding_box() or {"y": 1e9})["y"] < 768
    _shot(page, "report")
