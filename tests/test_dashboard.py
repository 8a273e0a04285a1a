"""The operator dashboard and /metrics of the coordinator, in-process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_coordinator import SITES, Federation, _until_done  # type: ignore[import-not-found]

from cardiofed.coordinator import administration
from cardiofed.store import session_factory


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def _login(fed: Federation, credential: str) -> TestClient:
    client = TestClient(fed.app, base_url="https://testserver")  # cookies marked Secure
    r = client.post("/ui/login", data={"credential": credential}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui", r.text
    return client


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert match, page[:500]
    return match.group(1)


def test_login_sets_a_strict_httponly_cookie_and_only_its_hash_is_stored(
        fed: Federation) -> None:
    client = TestClient(fed.app, base_url="https://testserver")
    r = client.post("/ui/login", data={"credential": fed.admin}, follow_redirects=False)

    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    db_bytes = b"".join(p.read_bytes() for p in fed.tmp.glob("coord.db*"))
    assert token.encode() not in db_bytes and fed.admin.encode() not in db_bytes
    assert client.get("/ui").status_code == 200
    plain = TestClient(fed.app).post("/ui/login", data={"credential": fed.admin},
                                     follow_redirects=False)
    assert "Secure" not in plain.headers["set-cookie"]  # plain HTTP (a test machine)


def test_pages_need_a_login_and_a_wrong_credential_is_refused(fed: Federation) -> None:
    anonymous = TestClient(fed.app)
    for page in ("/ui", "/ui/studies/s1", "/ui/audit"):
        r = anonymous.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    r = anonymous.post("/ui/login", data={"credential": "nope"})
    assert r.status_code == 401 and "Unknown credential" in r.text
    forged = TestClient(fed.app, cookies={"cardiofed_session": "forged"})
    assert forged.get("/ui", follow_redirects=False).status_code == 303


def test_study_page_follows_a_run_to_done(fed: Federation) -> None:
    client = _login(fed, fed.admin)
    page = client.get("/ui/studies/s1").text
    assert "waiting" in page and all(s in page for s in SITES)
    assert 'http-equiv="refresh"' in page  # it refreshes itself while the study runs

    _until_done(fed, [fed.agent(s) for s in SITES])

    page = client.get("/ui/studies/s1").text
    assert ">done<" in page and 'http-equiv="refresh"' not in page
    assert "AUC per site" in page and "<svg" in page and "<rect" in page
    for site in SITES:
        assert f'data-site="{site}"' in page
    # Calibration beside AUC, judged as the report judges it.
    table = page[page.index('<table class="calibration">'):]
    table = table[:table.index("</table>")]
    assert all(f"<td>{site}</td>" in table for site in SITES)
    assert table.count("<tr>") == len(SITES) + 1
    assert sum(table.count(f"<td>{v}</td>") for v in (
        "acceptable", "not acceptable", "insufficient evidence")) == len(SITES)
    studies = client.get("/ui").text
    assert 'href="/ui/studies/s1"' in studies and ">done<" in studies


def test_revoke_through_the_dashboard_needs_the_csrf_token_and_is_audited(
        fed: Federation) -> None:
    client = _login(fed, fed.admin)
    csrf = _csrf(client.get("/ui/studies/s1").text)
    target = f"/ui/studies/s1/sites/{SITES[2]}/revoke"

    for token in ("", "0" * 64):
        r = client.post(target, data={"csrf": token} if token else {})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert fed.status()["revoked"] == []

    asked = client.post(target, data={"csrf": csrf}, follow_redirects=False)
    assert asked.status_code == 200 and f"Revoke site {SITES[2]} of study s1?" in asked.text
    assert fed.status()["revoked"] == []  # the first press only asks
    r = client.post(target, data={"csrf": csrf, "confirm": "yes"}, follow_redirects=False)
    assert r.status_code == 303
    assert fed.status()["revoked"] == [SITES[2]]
    audit = client.get("/ui/audit").text
    assert "revoke site" in audit and SITES[2] in audit and "(dashboard)" in audit
    assert "log in" in audit

    # Fewer than min_sites (every site, by default) are left: the study pauses and the
    # page says why.
    assert "waiting for sites: 2 active of the 3 required" in client.get("/ui/studies/s1").text


def test_a_viewer_sees_everything_and_changes_nothing(fed: Federation) -> None:
    with session_factory(fed.settings.database_url)() as db:
        viewer = administration.create_admin_key(db, administration.VIEWER)
    client = _login(fed, viewer)
    page = client.get("/ui/studies/s1").text
    assert SITES[0] in page and "Revoke" not in page
    csrf = _csrf(page)  # the logout form's
    r = client.post(f"/ui/studies/s1/sites/{SITES[0]}/revoke", data={"csrf": csrf})
    assert r.status_code == 403 and "viewer" in r.json()["detail"]
    api = fed.client.post(f"/v1/studies/s1/sites/{SITES[0]}/revoke", headers=fed.auth(viewer))
    assert api.status_code == 403
    assert fed.client.get("/v1/studies/s1/status", headers=fed.auth(viewer)).status_code == 200
    assert fed.status()["revoked"] == []


def test_logout_ends_the_session(fed: Federation) -> None:
    client = _login(fed, fed.admin)
    csrf = _csrf(client.get("/ui").text)
    cookie = client.cookies.get("cardiofed_session")
    r = client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    again = TestClient(fed.app, base_url="https://testserver",
                       cookies={"cardiofed_session": str(cookie)})
    assert again.get("/ui", follow_redirects=False).status_code == 303


def test_metrics_count_requests_uploads_and_rounds(fed: Federation) -> None:
    assert fed.client.get("/metrics").status_code == 401
    _until_done(fed, [fed.agent(s) for s in SITES])

    r = fed.client.get("/metrics", headers=fed.auth(fed.admin))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    upload_route = "/v1/studies/{study_id}/rounds/{round_number}/updates"
    answered = f'cardiofed_http_requests_total{{method="POST",route="{upload_route}",status="200"}}'
    assert answered in text
    assert 'cardiofed_uploads_total{outcome="accepted"}' in text
    assert "cardiofed_http_request_duration_seconds_bucket" in text
    closed = re.search(r"^cardiofed_rounds_closed (\S+)$", text, re.M)
    assert closed and float(closed.group(1)) == 1 + 3 + 1  # statistics, 3 training, evaluation
    assert "s1" not in text  # route templates, never the values in a path


def test_viewer_keys_are_made_by_role_and_bad_requests_are_refused(
        fed: Federation, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app
    from cardiofed.exceptions import ConfigurationError

    with session_factory(fed.settings.database_url)() as db, \
            pytest.raises(ConfigurationError, match="role must be 'admin' or 'viewer'"):
        administration.create_admin_key(db, "owner")
    key_file = tmp_path / "viewer.key"
    args = ["admin", "new-key", "--key-file", str(key_file), "--database-url",
            fed.settings.database_url]
    made = CliRunner().invoke(app, args)
    assert made.exit_code == 0, made.output
    assert fed.client.get("/v1/studies/s1/status",
                          headers=fed.auth(key_file.read_text())).status_code == 200
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad = CliRunner().invoke(app, [*args[:2], "--key-file", str(tmp_path / "x.key"),
                                   "--role", "owner", *args[4:]])
    assert bad.exit_code == 2 and "--role must be admin or viewer" in bad.output


@pytest.mark.parametrize("header", [{"Origin": "https://evil.example"},
                                    {"Origin": "null"},
                                    {"Referer": "https://evil.example/page"}])
def test_a_form_posted_from_another_site_is_refused_login_included(
        fed: Federation, header: dict[str, str]) -> None:
    # Issue 29: the login form had no CSRF/Origin check (login CSRF).
    client = TestClient(fed.app, base_url="https://testserver")
    r = client.post("/ui/login", data={"credential": fed.admin}, headers=header,
                    follow_redirects=False)
    assert r.status_code == 403 and "posted from another site" in r.json()["detail"]
    assert "set-cookie" not in r.headers
    same = client.post("/ui/login", data={"credential": fed.admin},
                       headers={"Origin": "https://testserver"}, follow_redirects=False)
    assert same.status_code == 303


@pytest.mark.parametrize("path", ["/ui/login", "/healthz", "/v1/studies/s1/status",
                                  "/ui/static/style.css", "/nope"])
def test_every_answer_carries_the_security_headers(fed: Federation, path: str) -> None:
    r = fed.client.get(path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "same-origin"
    policy = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert "'unsafe-inline'" not in policy


def test_a_revoked_key_stops_working_and_its_sessions_end(fed: Federation) -> None:
    # Issue 29: admin and viewer credentials could not be revoked, and a dashboard
    # session never re-checked its key.
    from typer.testing import CliRunner

    from cardiofed.cli import app
    from cardiofed.store import AdminKey, hash_secret

    with session_factory(fed.settings.database_url)() as db:
        viewer = administration.create_admin_key(db, administration.VIEWER)
        second = administration.create_admin_key(db)
        ids = {k.role: k.id for k in db.query(AdminKey)}
    client = _login(fed, viewer)
    assert client.get("/ui/studies/s1").status_code == 200
    url = ["--database-url", fed.settings.database_url]
    runner = CliRunner()
    listed = runner.invoke(app, ["admin", "keys", *url])
    assert listed.exit_code == 0 and f"#{ids['viewer']}  viewer" in listed.output
    done = runner.invoke(app, ["admin", "revoke-key", "--id", str(ids["viewer"]), *url])
    assert done.exit_code == 0, done.output

    assert client.get("/ui/studies/s1", follow_redirects=False).status_code == 303  # to login
    assert fed.client.get("/v1/studies/s1/status",
                          headers=fed.auth(viewer)).status_code == 401
    again = runner.invoke(app, ["admin", "revoke-key", "--id", str(ids["viewer"]), *url])
    assert again.exit_code != 0 and "was revoked" in again.output
    with session_factory(fed.settings.database_url)() as db:
        administration.revoke_admin_key(db, db.query(AdminKey).filter(
            AdminKey.key_hash == hash_secret(second)).one().id)
        admin_id = db.query(AdminKey).filter(
            AdminKey.key_hash == hash_secret(fed.admin)).one().id
    last = runner.invoke(app, ["admin", "revoke-key", "--id", str(admin_id), *url])
    assert last.exit_code != 0 and "last admin key" in last.output
    assert fed.status()["study"] == "s1"  # the remaining admin still works
