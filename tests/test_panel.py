"""The admin panel's pages (dashboard, profiles, runs) through the ASGI app with a logged-in
cookie session, as a browser without htmx uses them (and with the `HX-Request` header)."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette

from server.app import create_app
from server.models import AuditEvent, Command, LogLine, Profile, utcnow
from server.panel.assets import HTMX_CDN_URL, HTMX_INTEGRITY, HTMX_LOCAL_URL
from server.settings import Settings
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user, browser_for, log_in

PAGES = ["/", "/profiles", "/runs"]


@asynccontextmanager
async def logged_in(app: Starlette, name: str, role: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser (cookies, no API token) logged in as a new user `name`."""
    await add_user(app, name, role)
    async with browser_for(app) as http:
        assert (await log_in(http, name)).status_code == 303
        yield http


@pytest.fixture
async def admin(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with logged_in(app, "alice", "admin") as http:
        yield http


@pytest.fixture
async def viewer(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with logged_in(app, "victor", "viewer") as http:
        yield http


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match is not None, page.text
    return match.group(1)


async def post_form(http: httpx.AsyncClient, path: str, **fields: str) -> httpx.Response:
    """Send a form as the page's own form would (its CSRF token in the hidden field)."""
    token = csrf_of(await http.get("/profiles"))
    return await http.post(path, data={"csrf_token": token, **fields})


async def add_profile(app: Starlette, name: str, **values: object) -> int:
    async with app.state.services.sessionmaker() as session:
        profile = Profile(name=name, tags=[], headless=True, **values)
        session.add(profile)
        await session.commit()
        return profile.id


async def profile_names(app: Starlette) -> list[str]:
    async with app.state.services.sessionmaker() as session:
        return list(await session.scalars(select(Profile.name).order_by(Profile.id)))


async def add_run(app: Starlette, status: str, lines: int = 0, **values: object) -> int:
    """A finished (or running) command with `lines` stdout lines, straight into the tables."""
    now = utcnow()
    async with app.state.services.sessionmaker() as session:
        command = Command(
            source="echo hi",
            argv=["echo", "hi"],
            status=status,
            attempts=1,
            created_at=now - timedelta(seconds=5),
            started_at=now - timedelta(seconds=4),
            finished_at=now,
            last_seq=lines,
            **values,
        )
        session.add(command)
        await session.flush()
        session.add_all(
            LogLine(
                command_id=command.id,
                seq=seq,
                attempt=1,
                stream="stdout",
                ts=now,
                text=f"line {seq}",
            )
            for seq in range(1, lines + 1)
        )
        await session.commit()
        return command.id


async def audit_of(app: Starlette, action: str) -> list[AuditEvent]:
    async with app.state.services.sessionmaker() as session:
        rows = await session.scalars(select(AuditEvent).where(AuditEvent.action == action))
        return list(rows)


# --- every page, both roles ------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
async def test_pages_render_for_admin_and_viewer(
    app: Starlette, admin: httpx.AsyncClient, viewer: httpx.AsyncClient, path: str
) -> None:
    for http, who in ((admin, "alice (admin)"), (viewer, "victor (viewer)")):
        page = await http.get(path)
        assert page.status_code == 200, page.text
        assert who in page.text
        assert '<nav aria-label="Main">' in page.text
        assert f'<script src="{HTMX_LOCAL_URL}" integrity="{HTMX_INTEGRITY}">' in page.text


async def test_detail_pages_render_for_admin_and_viewer(
    app: Starlette, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    profile_id = await add_profile(app, "alpha", notes="the first")
    run_id = await add_run(app, "FAILED", lines=3, profile_id=profile_id, profile_name="alpha")
    for http in (admin, viewer):
        for path in (
            f"/profiles/{profile_id}",
            f"/runs/{run_id}",
            f"/profiles/{profile_id}/delete",
        ):
            page = await http.get(path)
            assert page.status_code == 200, (path, page.text)
    assert (await admin.get("/profiles/999999")).status_code == 404
    assert (await admin.get("/runs/nope")).status_code == 404


async def test_viewer_sees_no_edit_buttons(app: Starlette, viewer: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    listing = await viewer.get("/profiles")
    assert 'action="/profiles"' in listing.text  # the search form (GET)
    assert 'method="post" action="/profiles"' not in listing.text
    assert "Create profile" not in listing.text
    detail = await viewer.get(f"/profiles/{profile_id}")
    assert f'action="/profiles/{profile_id}"' not in detail.text
    assert "/delete" not in detail.text
    confirm = await viewer.get(f"/profiles/{profile_id}/delete")
    assert 'method="post"' not in confirm.text.split("</header>")[1]


async def test_admin_sees_the_forms(app: Starlette, admin: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    assert "Create profile" in (await admin.get("/profiles")).text
    detail = await admin.get(f"/profiles/{profile_id}")
    assert f'method="post" action="/profiles/{profile_id}"' in detail.text
    assert f'href="/profiles/{profile_id}/delete"' in detail.text


async def test_viewer_forged_posts_are_refused(app: Starlette, viewer: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    created = await post_form(viewer, "/profiles", name="forged")
    edited = await post_form(viewer, f"/profiles/{profile_id}", name="renamed")
    deleted = await post_form(viewer, f"/profiles/{profile_id}/delete")
    assert [created.status_code, edited.status_code, deleted.status_code] == [403, 403, 403]
    assert await profile_names(app) == ["alpha"]
    denied = await audit_of(app, "createProfile")
    assert [(event.outcome, event.actor) for event in denied] == [("denied", "victor")]


async def test_posts_need_the_csrf_token(app: Starlette, admin: httpx.AsyncClient) -> None:
    refused = await admin.post("/profiles", data={"name": "no-token"})
    assert refused.status_code == 403
    assert await profile_names(app) == []


# --- profiles --------------------------------------------------------------------------


async def test_create_profile_via_the_form(app: Starlette, admin: httpx.AsyncClient) -> None:
    answer = await post_form(admin, "/profiles", name="Work", notes="main account", tags="a, b,")
    assert answer.status_code == 303
    async with app.state.services.sessionmaker() as session:
        profile = await session.scalar(select(Profile))
    assert profile is not None
    assert (profile.name, profile.notes, profile.tags) == ("Work", "main account", ["a", "b"])
    assert answer.headers["location"] == f"/profiles/{profile.id}"
    page = await admin.get(answer.headers["location"])
    assert '<p class="flash" role="status">Profile Work created.</p>' in page.text
    again = await admin.get(answer.headers["location"])
    assert "flash" not in again.text  # shown once
    [event] = await audit_of(app, "createProfile")
    assert (event.outcome, event.actor) == ("ok", "alice")
    assert event.detail == {"fields": ["name", "notes", "tags"]}  # as GraphQL records it
    assert "Work" not in str(event.detail)


async def test_create_with_htmx_redirects_the_browser(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    token = csrf_of(await admin.get("/profiles"))
    answer = await admin.post(
        "/profiles", data={"name": "Swift"}, headers={"HX-Request": "true", "X-CSRF-Token": token}
    )
    assert answer.status_code == 200
    assert re.fullmatch(r"/profiles/\d+", answer.headers["hx-redirect"])


async def test_duplicate_name_is_shown_next_to_the_field(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    await add_profile(app, "Work")
    answer = await post_form(admin, "/profiles", name="work", notes="typed notes", tags="x, y")
    assert answer.status_code == 422
    form = answer.text.split('id="profile-create"')[1]
    name_field = form.split('<div class="field')[1]
    assert 'value="work"' in name_field
    assert 'aria-invalid="true"' in name_field
    assert re.search(r'<p class="field-error" id="name-error">[^<]*already', name_field)
    assert ">typed notes</textarea>" in form
    assert 'value="x, y"' in form
    assert await profile_names(app) == ["Work"]
    [event] = await audit_of(app, "createProfile")
    assert event.outcome == "error"
    assert event.detail is not None
    assert event.detail["userErrors"] == ["TAKEN"]
    # With htmx: only the form comes back, to be swapped in place.
    token = csrf_of(await admin.get("/profiles"))
    swap = await admin.post(
        "/profiles", data={"name": "WORK"}, headers={"HX-Request": "true", "X-CSRF-Token": token}
    )
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<form id="profile-create"')
    assert "<html" not in swap.text


async def test_blank_name_is_required(app: Starlette, admin: httpx.AsyncClient) -> None:
    answer = await post_form(admin, "/profiles", name="  ", notes="kept")
    assert answer.status_code == 422
    assert 'id="name-error"' in answer.text
    assert ">kept</textarea>" in answer.text


async def test_search_and_paging(app: Starlette, admin: httpx.AsyncClient) -> None:
    for number in range(30):
        await add_profile(app, f"shop-{number:02d}")
    await add_profile(app, "Mail_Account")
    first = await admin.get("/profiles")
    assert first.text.count('<a href="/profiles/') == 25
    assert "Page 1 of 2 (31)" in first.text
    second = await admin.get("/profiles", params={"page": "2"})
    assert second.text.count('<a href="/profiles/') == 6
    assert ">shop-29<" in second.text
    assert ">shop-00<" not in second.text
    found = await admin.get("/profiles", params={"q": "MAIL_"})
    assert ">Mail_Account<" in found.text
    assert "shop-" not in found.text
    none = await admin.get("/profiles", params={"q": "%"})
    assert "No profile" in none.text
    beyond = await admin.get("/profiles", params={"page": "99"})
    assert "Page 2 of 2" in beyond.text
    partial = await admin.get("/profiles", params={"q": "shop-1"}, headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith('<div id="profiles-table">')
    assert partial.text.count('<a href="/profiles/') == 10


async def test_edit_profile(app: Starlette, admin: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    answer = await post_form(
        admin,
        f"/profiles/{profile_id}",
        name="beta",
        tags="t",
        notes="",
        viewportWidth="1280",
        viewportHeight="800",
        locale="de-DE",
    )
    assert answer.status_code == 303
    async with app.state.services.sessionmaker() as session:
        profile = await session.get(Profile, profile_id)
    assert profile is not None
    assert (profile.name, profile.viewport_width, profile.locale) == ("beta", 1280, "de-DE")
    assert profile.headless is False  # the checkbox was not sent
    bad = await post_form(admin, f"/profiles/{profile_id}", name="beta", viewportWidth="wide")
    assert bad.status_code == 422
    assert 'id="viewportWidth-error"' in bad.text
    assert 'value="wide"' in bad.text


@pytest.mark.parametrize("width", ["--5", "\u00b2", "-"])
async def test_a_malformed_number_is_a_form_error(
    app: Starlette, admin: httpx.AsyncClient, width: str
) -> None:
    """Typed text that merely looks numeric (two signs, a superscript digit) is the form's
    error next to its field, not a 500 from int()."""
    profile_id = await add_profile(app, "alpha")
    bad = await post_form(admin, f"/profiles/{profile_id}", name="alpha", viewportWidth=width)
    assert bad.status_code == 422
    assert 'id="viewportWidth-error"' in bad.text


async def test_delete_profile_keeps_its_runs(app: Starlette, admin: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    await add_run(app, "SUCCEEDED", profile_id=profile_id, profile_name="alpha")
    confirm = await admin.get(f"/profiles/{profile_id}/delete")
    assert "stays on disk" in confirm.text
    assert "1 run stay" in confirm.text
    answer = await post_form(admin, f"/profiles/{profile_id}/delete")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/profiles"
    assert await profile_names(app) == []
    async with app.state.services.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Command)) == 1
    [event] = await audit_of(app, "deleteProfile")
    assert event.outcome == "ok"


async def test_a_delete_refused_for_another_reason_says_why(
    app: Starlette, admin: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not every refusal is "no such profile": the domain's reason is shown (409)."""
    from server import profiles as profile_service
    from server.errors import ErrorCode, InvalidInput

    async def in_use(*_args: object, **_kwargs: object) -> list[str]:
        raise InvalidInput.one("id", "a runner holds its browser right now", ErrorCode.IN_USE)

    profile_id = await add_profile(app, "busy")
    monkeypatch.setattr(profile_service, "delete_profile", in_use)
    answer = await post_form(admin, f"/profiles/{profile_id}/delete")
    assert answer.status_code == 409
    assert "a runner holds its browser right now" in answer.text
    assert "no such profile" not in answer.text.lower()


# --- runs and the dashboard ------------------------------------------------------------


async def test_run_page_shows_its_last_log_lines(app: Starlette, admin: httpx.AsyncClient) -> None:
    run_id = await add_run(app, "FAILED", lines=250, exit_code=3, error="it broke <badly>")
    page = await admin.get(f"/runs/{run_id}")
    assert page.status_code == 200
    assert "line 250" in page.text
    assert "line 51<" in page.text
    assert "line 50<" not in page.text
    assert "The last 200 of 250 lines." in page.text
    assert "it broke &lt;badly&gt;" in page.text
    assert 'class="status status-failed">failed<' in page.text
    assert "<code>echo</code>" in page.text


async def test_runs_list_filters_and_pages(app: Starlette, admin: httpx.AsyncClient) -> None:
    ids = [await add_run(app, "SUCCEEDED") for _ in range(26)]
    failed = await add_run(app, "FAILED")
    first = await admin.get("/runs")
    assert first.text.index(f'"/runs/{failed}"') < first.text.index(f'"/runs/{ids[-1]}"')
    assert "Page 1 of 2" in first.text
    only_failed = await admin.get("/runs", params={"status": "failed"})
    assert only_failed.text.count('<a href="/runs/') == 1
    assert f'"/runs/{failed}"' in only_failed.text
    unknown = await admin.get("/runs", params={"status": "nonsense"})
    assert unknown.status_code == 200


async def test_dashboard_counts_and_failures(app: Starlette, admin: httpx.AsyncClient) -> None:
    await add_profile(app, "alpha")
    failed = await add_run(app, "TIMED_OUT")
    page = await admin.get("/")
    text = html.unescape(page.text)
    assert re.search(r'<span class="count">1</span> profiles', text)
    assert f'href="/runs/{failed}"' in text
    assert "Nothing is running." in text


# --- assets and the CSP ----------------------------------------------------------------


async def test_vendored_htmx_matches_its_pinned_hash(admin: httpx.AsyncClient) -> None:
    script = await admin.get(HTMX_LOCAL_URL)
    assert script.status_code == 200
    digest = base64.b64encode(hashlib.sha384(script.content).digest()).decode()
    assert f"sha384-{digest}" == HTMX_INTEGRITY


async def test_local_assets_keep_the_csp_to_self(admin: httpx.AsyncClient) -> None:
    page = await admin.get("/profiles")
    directives = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert "unpkg" not in page.text
    assert '"includeIndicatorStyles": false' in page.text


async def test_cdn_assets_are_pinned_with_a_local_fallback(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"panel_assets": "cdn"}))
    async with app.router.lifespan_context(app), logged_in(app, "alice", "admin") as http:
        page = await http.get("/")
    assert (
        f'<script src="{HTMX_CDN_URL}" integrity="{HTMX_INTEGRITY}" crossorigin="anonymous" '
        f'data-local="{HTMX_LOCAL_URL}"></script>'
    ) in page.text
    assert '<script src="/static/htmx-fallback.js"></script>' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self' https://unpkg.com;" in csp


# --- in real headless Chromium ---------------------------------------------------------

ARTIFACTS = ROOT / "test-artifacts"
PANEL_BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, runPath] = process.argv.slice(2);
  const origin = new URL(base).origin;
/*LAUNCH*/
  const found = { errors: [], foreign: [], violations: [], htmxPosts: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      // Chromium logs every 4xx; the duplicate name's 422 is expected.
      if (message.type() === 'error' && !message.text().includes('status of 422')) {
        found.errors.push(message.text());
      }
    });
    page.on('response', (response) => {
      // 422: the form with its errors, expected once below.
      if (response.status() >= 400 && response.status() !== 422) {
        found.errors.push(`${response.status()} ${response.url()}`);
      }
    });
    page.on('request', (request) => {
      if (!request.url().startsWith(origin) && !request.url().startsWith('data:')) {
        found.foreign.push(request.url());
      }
      if (request.method() === 'POST' && new URL(request.url()).pathname === '/profiles') {
        found.htmxPosts.push(request.headers()['hx-request'] || 'none');
      }
    });
    /*PAGE_HELPERS*/
    const collect = async () => {
      found.violations.push(...await page.evaluate(() => window.__violations));
    };

    await logIn('/profiles');
    found.htmx = await page.evaluate(() => typeof window.htmx === 'object');
    await collect();

    await page.locator('#profile-create input[name="name"]').fill('Browser Made');
    await page.locator('#profile-create input[name="tags"]').fill('e2e, chromium');
    await page.locator('#profile-create button[type="submit"]').click();
    await page.waitForURL((target) => /^\/profiles\/\d+$/.test(target.pathname), { timeout: 20000 });
    found.flash = await page.locator('.flash').innerText();
    await collect();
    await shoot('profile');

    await page.goto(`${base}/profiles`);
    found.list = await page.locator('#profiles-table').innerText();
    // The same name again: the error appears next to the field, swapped in by htmx.
    await page.locator('#profile-create input[name="name"]').fill('browser made');
    await page.locator('#profile-create button[type="submit"]').click();
    await page.locator('#name-error').waitFor({ timeout: 20000 });
    found.duplicate = await page.locator('#name-error').innerText();
    found.kept = await page.locator('#profile-create input[name="name"]').inputValue();
    found.stayed = new URL(page.url()).pathname;
    await collect();
    await shoot('profiles');

    for (const [name, path] of [['dashboard', '/'], ['runs', '/runs'], ['run', runPath]]) {
      await page.goto(`${base}${path}`);
      await collect();
      await shoot(name);
    }
    await page.goto(`${base}/profiles`);
    await page.getByRole('link', { name: 'Browser Made' }).click();
    await page.getByRole('link', { name: 'Delete this profile…' }).click();
    await collect();
    await shoot('profile-delete');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}${runPath}`);
    await shoot('run-phone');
  /*END*/
"""
)


async def test_panel_in_chromium(settings: Settings, tmp_path: Path, backend: str) -> None:
    """Real headless Chromium, a real server: log in through the form, create a profile
    through the panel's form with htmx active, see it in the list, get the duplicate name's
    error inline; no console error, no CSP violation, nothing from another origin. Leaves
    screenshots of every page (light and dark) in test-artifacts/."""
    script = tmp_path / "panel.cjs"
    script.write_text(PANEL_BROWSER_SCRIPT)
    shots = ARTIFACTS / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        run_id = await add_run(
            live.app, "FAILED", lines=40, exit_code=1, error="exit status 1", profile_name="gone"
        )
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            f"/runs/{run_id}",
            user="grace",
            password=PASSWORD,
            timeout=120,
        )
    assert found["htmx"] is True
    assert found["htmxPosts"] == ["true", "true"]  # both form posts went through htmx
    assert found["flash"] == "Profile Browser Made created."
    assert "Browser Made" in found["list"]
    assert "already" in found["duplicate"]
    assert found["kept"] == "browser made"
    assert found["stayed"] == "/profiles"
    assert found["foreign"] == []
    assert found["violations"] == []
    assert found["errors"] == []
