"""The panel's admin pages (issue #17): the audit log, API tokens, the dashboard's waiting
runs, and how flashes and form errors look; in-process over HTTP with a cookie session,
and once in real headless Chromium."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request

from server.models import ApiToken, AuditEvent, Service, ServiceUsage
from server.panel.common import FLASH_COOKIE, redirect_with_flash
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user, browser_for
from tests.test_panel import (  # noqa: F401 - fixtures
    add_profile,
    add_run,
    admin,
    audit_of,
    csrf_of,
    post_form,
    viewer,
)

CREATE_PROFILE = "mutation { createProfile(input: {name: %s}) { profile { id } } }"
ME = "{ me { name role kind } }"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No embedded runner: the queued runs these tests add must stay queued."""
    return settings.model_copy(update={"embedded_runner": False})


def form_posts(page: str) -> list[str]:
    """The actions of the page's POST forms, the header's logout left out."""
    body = page.split("</header>", 1)[1]
    return re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', body)


async def audit_rows(app: Starlette) -> list[AuditEvent]:
    async with app.state.services.sessionmaker() as session:
        return list(await session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


async def add_events(app: Starlette, count: int, **values: object) -> None:
    """`count` audit events straight into the table (what a busy installation has)."""
    async with app.state.services.sessionmaker() as session:
        session.add_all(
            AuditEvent(
                actor=f"user-{number % 3}",
                actor_kind="user",
                action="updateProfile" if number % 2 else "createProfile",
                outcome="ok",
                detail={"fields": ["name"]},
                **values,
            )
            for number in range(count)
        )
        await session.commit()


def plaintext_of(page: str) -> str:
    match = re.search(r'id="new-token"[^>]*value="(crl_[^"]+)"', page)
    assert match is not None, page
    return match.group(1)


def token_id_of(page: str) -> int:
    match = re.search(r'href="/tokens/(\d+)/revoke"', page)
    assert match is not None, page
    return int(match.group(1))


# --- every page, both roles ------------------------------------------------------------


async def test_pages_for_admin_and_viewer(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    """An admin gets each page with its forms; a viewer gets the dashboard with no form
    and a 403 (with no form either) for the admin pages."""
    async with app.state.services.sessionmaker() as session:
        token_id = await session.scalar(select(ApiToken.id))  # the app fixture's
    for path, forms in (
        ("/", []),
        ("/audit", []),
        ("/tokens", ["/tokens"]),
        (f"/tokens/{token_id}/revoke", [f"/tokens/{token_id}/revoke"]),
    ):
        page = await admin.get(path)
        assert page.status_code == 200, (path, page.text)
        assert form_posts(page.text) == forms, path
        seen = await viewer.get(path)
        assert seen.status_code == (200 if path == "/" else 403), path
        assert "victor (viewer)" in seen.text
        assert form_posts(seen.text) == [], path
        assert 'href="/audit"' not in seen.text  # the menu hides the admin pages
    assert (await admin.get("/tokens/999999/revoke")).status_code == 404
    assert (await admin.get("/tokens/x/revoke")).status_code == 404


# --- the audit log ---------------------------------------------------------------------


async def test_audit_lists_graphql_and_panel_changes(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    gql = GraphQLClient(browser_for(app))
    gql.http.headers.update(bearer(app.state.admin_token))
    async with gql.http:
        await gql(CREATE_PROFILE % '"from-graphql"')
    answer = await post_form(admin, "/profiles", name="from-panel", notes="secret-ish notes")
    assert answer.status_code == 303
    panel_id = int(answer.headers["location"].rsplit("/", 1)[1])
    page = await admin.get("/audit")
    assert page.status_code == 200
    table = page.text.split('<div id="audit-table">')[1]
    rows = table.split("<tbody>")[1].split("<tr>")[1:]
    assert "from-panel" not in table  # no values
    assert "secret-ish" not in table
    # Newest first: the panel's form, then the mutation (by the token's maker, `tests`).
    assert "<code>createProfile</code>" in rows[0]
    assert f'<a href="/profiles/{panel_id}">Profile {panel_id}</a>' in rows[0]
    assert "alice" in rows[0]
    assert "<code>name</code> <code>notes</code> <code>tags</code>" in rows[0]
    assert "127.0.0.1" in rows[0]
    assert 'class="status outcome-ok">ok<' in rows[0]
    assert "<code>createProfile</code>" in rows[1]
    assert "via token “tests”" in html.unescape(rows[1])
    assert "<code>name</code>" in rows[1]
    assert "login" in rows[2]


async def test_audit_filters(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    await post_form(admin, "/profiles", name="taken")
    await post_form(admin, "/profiles", name="TAKEN")  # an error: the name is taken
    await post_form(viewer, "/profiles", name="forged")  # denied
    by_outcome = {}
    for outcome in ("ok", "error", "denied"):
        page = await admin.get("/audit", params={"outcome": outcome})
        by_outcome[outcome] = re.findall(r'outcome-(\w+)">', page.text)
    assert by_outcome["error"] == ["error"]
    assert by_outcome["denied"] == ["denied"]
    assert by_outcome["ok"] == ["ok"] * 3  # 2 logins, 1 create
    assert "<code>TAKEN</code>" in (await admin.get("/audit?outcome=error")).text
    # GraphQL filters the same way.
    gql = GraphQLClient(browser_for(app))
    gql.http.headers.update(bearer(app.state.admin_token))
    async with gql.http:
        denied = await gql('{ auditEvents(outcome: "denied") { edges { node { actor } } } }')
    assert [edge["node"]["actor"] for edge in denied["auditEvents"]["edges"]] == ["victor"]
    victor = await admin.get("/audit", params={"user": "victor"})
    assert re.findall(r"<td><code>(\w+)</code></td>", victor.text) == ["createProfile", "login"]
    both = await admin.get("/audit", params={"user": "alice", "action": "createProfile"})
    assert len(re.findall(r'outcome-(\w+)">', both.text)) == 2
    for nobody in ("nobody", "victor" + "x" * 300):
        none = await admin.get("/audit", params={"user": nobody, "action": "y" * 100})
        assert "No audit events match these filters." in none.text
    swap = await admin.get("/audit", params={"outcome": "denied"}, headers={"HX-Request": "true"})
    assert swap.text.lstrip().startswith('<div id="audit-table">')
    assert (
        await admin.get("/audit", params={"outcome": "bogus", "before": "x"})
    ).status_code == 200


async def test_audit_pages_by_keyset(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    await add_events(app, 60)
    ids = [event.id for event in await audit_rows(app)]  # 60 and alice's login, oldest first
    first = await admin.get("/audit")
    assert first.text.count("<tr>") == 1 + 25
    assert "← Newer" not in first.text
    older = re.search(r'href="(/audit\?before=\d+)" rel="next"', first.text)
    assert older is not None
    assert older.group(1) == f"/audit?before={ids[-25]}"
    second = await admin.get(older.group(1))
    assert second.text.count("<tr>") == 1 + 25
    newer = re.search(r'href="(/audit\?after=\d+)" rel="prev"', second.text)
    assert newer is not None
    back = await admin.get(newer.group(1))
    # The newer page of the second is the first again (without its "newer" link).
    assert back.text.split("<tbody>")[1] == first.text.split("<tbody>")[1]
    third_link = re.search(r'href="(/audit\?before=\d+)" rel="next"', second.text)
    assert third_link is not None
    third = await admin.get(third_link.group(1))
    assert third.text.count("<tr>") == 1 + 11
    assert 'rel="next"' not in third.text
    # Filters ride along in the pager's links.
    filtered = await admin.get("/audit", params={"action": "updateProfile"})
    link = re.search(r'href="(/audit\?[^"]+)" rel="next"', filtered.text)
    assert link is not None
    assert "action=updateProfile" in link.group(1)
    rest = await admin.get(html.unescape(link.group(1)))
    assert rest.text.count("<code>updateProfile</code>") == 5
    assert "<code>createProfile</code>" not in rest.text


# --- API tokens ------------------------------------------------------------------------


async def test_token_made_in_the_panel_works_once_shown_and_revoked(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    token = csrf_of(await admin.get("/tokens"))
    made = await admin.post(
        "/tokens", data={"csrf_token": token, "name": "ci", "role": "viewer", "expiresAt": ""}
    )
    assert made.status_code == 200  # the answer itself, no redirect
    plaintext = plaintext_of(made.text)
    assert "shown this once" in made.text
    assert plaintext not in str(made.headers)  # not in a cookie, not in a Location
    async with browser_for(app) as api:
        me = await api.post("/graphql", json={"query": ME}, headers=bearer(plaintext))
        assert me.json()["data"]["me"] == {"name": "alice", "role": "VIEWER", "kind": "token"}
        # Shown once: no page shows it again.
        for path in ("/tokens", "/", "/audit"):
            assert plaintext not in (await admin.get(path)).text
        listing = (await admin.get("/tokens")).text
        assert f"{plaintext[:8]}…{plaintext[-4:]}" in listing  # its preview
        token_id = token_id_of(listing)
        confirm = await admin.get(f"/tokens/{token_id}/revoke")
        assert "Revoke token “ci”?" in html.unescape(confirm.text)
        revoked = await post_form(admin, f"/tokens/{token_id}/revoke")
        assert revoked.status_code == 303
        assert revoked.headers["location"] == "/tokens"
        after = await admin.get("/tokens")
        assert '<p class="flash" role="status">API token ci revoked.</p>' in after.text
        assert ">revoked</span>" in after.text
        refused = await api.post("/graphql", json={"query": ME}, headers=bearer(plaintext))
        assert refused.status_code == 401
    events = await audit_rows(app)
    assert plaintext not in str([vars(event) for event in events])
    assert plaintext not in caplog.text
    [created] = [event for event in events if event.action == "createApiToken"]
    [gone] = [event for event in events if event.action == "revokeApiToken"]
    assert (created.outcome, created.actor, created.object_type) == ("ok", "alice", "ApiToken")
    assert created.detail == {"fields": ["name", "role"]}
    assert gone.object_id == created.object_id  # the same token, by its global ID


async def test_token_form_errors_stay_next_to_their_fields(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    blank = await post_form(admin, "/tokens", name=" ", role="admin", expiresAt="2031-02-03")
    assert blank.status_code == 422
    form = blank.text.split('id="token-create"')[1]
    assert re.search(r'aria-invalid="true"\s+aria-describedby="name-hint name-error"', form)
    assert '<p class="field-error" id="name-error">' in form
    assert '<option value="admin" selected>' in form  # what was typed is kept
    assert 'value="2031-02-03"' in form
    assert 'id="new-token"' not in blank.text
    past = await post_form(admin, "/tokens", name="old", role="viewer", expiresAt="2001-01-01")
    assert past.status_code == 422
    assert re.search(r'id="expiresAt-error">[^<]*future', past.text)
    garbled = await post_form(admin, "/tokens", name="x", role="root", expiresAt="soon")
    assert garbled.status_code == 422
    assert re.search(r'id="expiresAt-error">[^<]*date like', garbled.text)
    async with app.state.services.sessionmaker() as session:
        names = list(await session.scalars(select(ApiToken.name)))
    assert names == ["tests"]  # the app fixture's, no other
    codes = [
        (event.detail or {}).get("userErrors") for event in await audit_of(app, "createApiToken")
    ]
    assert codes == [["BLANK"], ["OUT_OF_RANGE"], ["INVALID"]]


async def test_viewer_and_csrf_less_posts_are_refused(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    made = await post_form(viewer, "/tokens", name="mine", role="admin")
    revoke = await post_form(viewer, "/tokens/1/revoke")
    assert [made.status_code, revoke.status_code] == [403, 403]
    no_csrf = await admin.post("/tokens", data={"name": "sneaky", "role": "admin"})
    no_csrf_revoke = await admin.post("/tokens/1/revoke")
    assert [no_csrf.status_code, no_csrf_revoke.status_code] == [403, 403]
    async with app.state.services.sessionmaker() as session:
        tokens = list(await session.scalars(select(ApiToken)))
    assert [(token.name, token.revoked_at) for token in tokens] == [("tests", None)]
    denied = [(event.action, event.outcome, event.actor) for event in await audit_rows(app)]
    assert ("createApiToken", "denied", "victor") in denied
    assert ("revokeApiToken", "denied", "victor") in denied


# --- dashboard and flashes -------------------------------------------------------------


async def test_dashboard_says_what_waits_and_why(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    busy = await add_run(app, "WAITING", wait_reason="profile 'alpha' is busy with command 1")
    queued = await add_run(app, "QUEUED")
    await add_run(app, "FAILED")
    page = html.unescape((await admin.get("/")).text)
    waiting = page.split('id="waiting-h"')[1].split("</section>")[0]
    assert waiting.index(f'href="/runs/{busy}"') < waiting.index(f'href="/runs/{queued}"')
    assert "profile 'alpha' is busy with command 1" in waiting
    assert "next when a runner has a free slot" in waiting
    assert 'href="/runs?status=FAILED"' in page
    assert '<a href="/profiles"><span class="count">0</span> profiles</a>' in page
    assert '<a href="/runs?status=QUEUED"><span class="count">1</span>' in page


async def test_dashboard_lists_tokens_near_their_limit(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The latest budget of each token counts: an old low reading superseded by a fresh
    one is not listed; a nearly spent shared token and a refused profile token are."""
    profile_id = await add_profile(app, "alpha")
    async with app.state.services.sessionmaker() as session:
        github, openai = Service(name="GitHub", env_var="GH"), Service(name="OpenAI", env_var="OA")
        session.add_all([github, openai])
        await session.flush()
        session.add_all(
            [
                ServiceUsage(service_id=openai.id, remaining=1, limit=100),
                ServiceUsage(service_id=openai.id, remaining=99, limit=100),  # reset since
                ServiceUsage(service_id=github.id, remaining=400, limit=5000),
                ServiceUsage(service_id=github.id, profile_id=profile_id, token_valid=False),
            ]
        )
        await session.commit()
        github_id = github.id
    page = html.unescape((await admin.get("/")).text)
    limits = page.split('id="limits-h"')[1].split("</section>")[0]
    assert "OpenAI" not in limits
    assert f'<a href="/services/{github_id}">GitHub</a>' in limits
    assert "400 of 5000" in limits
    assert f'<a href="/profiles/{profile_id}">alpha</a>\'s own' in limits
    assert ">refused</span>" in limits


async def test_error_flash_is_an_alert(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    scope = {"type": "http", "app": app, "method": "POST", "path": "/", "headers": []}
    scope |= {"scheme": "http", "server": ("localhost", 80), "query_string": b""}
    answer = redirect_with_flash(Request(scope), "/", "Could not do it.", kind="error")
    cookie = answer.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    admin.cookies.set(FLASH_COOKIE, cookie)
    page = await admin.get("/")
    assert '<p class="flash flash-error" role="alert">Could not do it.</p>' in page.text
    assert page.headers["set-cookie"].startswith(f'{FLASH_COOKIE}="";')  # shown once
    admin.cookies.set(FLASH_COOKIE, cookie.replace("error:", "success:"))  # signature broken
    assert "Could not" not in (await admin.get("/")).text


# --- in real headless Chromium ---------------------------------------------------------

ARTIFACTS = ROOT / "test-artifacts"
ADMIN_BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error' && !message.text().includes('status of 422')) {
        found.errors.push(message.text());
      }
    });
    /*PAGE_HELPERS*/
    const collect = async () => {
      found.violations.push(...await page.evaluate(() => window.__violations));
    };
    await logIn('/tokens');
    await shoot('tokens-first');

    // A blank name: the error next to its field.
    await page.getByLabel('Name').fill('  ');
    await page.getByRole('button', { name: 'Create token' }).click();
    await page.locator('#name-error').waitFor({ timeout: 20000 });
    found.blankError = await page.locator('#name-error').innerText();
    found.nameDescribedBy = await page.getByLabel('Name').getAttribute('aria-describedby');
    await shoot('tokens-error');

    await page.getByLabel('Name').fill('browser-ci');
    await page.getByLabel('Role').selectOption('admin');
    await page.getByRole('button', { name: 'Create token' }).click();
    await page.locator('#new-token').waitFor({ timeout: 20000 });
    found.plaintext = await page.locator('#new-token').inputValue();
    found.newTokenLabel = await page.getByLabel(/Your new admin token/).inputValue();
    await collect();
    await shoot('tokens-created');

    await page.goto(`${base}/tokens`);
    found.shownAgain = (await page.content()).includes(found.plaintext);
    await page.getByRole('link', { name: /^Revoke browser-ci/ }).click();
    await page.waitForURL((target) => /^\/tokens\/\d+\/revoke$/.test(target.pathname));
    await collect();
    await shoot('token-revoke');
    await page.getByRole('button', { name: 'Revoke this token' }).click();
    await page.waitForURL((target) => target.pathname === '/tokens', { timeout: 20000 });
    found.flash = await page.locator('.flash').innerText();
    found.flashRole = await page.locator('.flash').getAttribute('role');
    found.flashBefore = await page.locator('.flash').evaluate(
      (el) => getComputedStyle(el, '::before').content);
    await collect();
    await shoot('tokens');

    await page.goto(`${base}/audit`);
    found.audit = await page.locator('#audit-table').innerText();
    await collect();
    await shoot('audit');
    await page.getByLabel('Outcome').selectOption('error');
    await page.waitForURL((target) => target.search.includes('outcome=error'));
    await page.waitForFunction(() => !document.querySelector('#audit-table')
      .innerText.includes('revokeApiToken'));
    found.auditErrors = await page.locator('#audit-table').innerText();
    await page.goto(`${base}/`);
    await collect();
    await shoot('dashboard');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/audit`);
    await shoot('audit-phone');
  /*END*/
"""
)


async def test_tokens_and_audit_in_chromium(
    settings: Settings,
    tmp_path: Path,
    backend: str,
) -> None:
    """An admin makes a token (seeing it once), revokes it, and finds both in the audit
    log; the blank name's error sits by its field; htmx filters the log in place."""
    script = tmp_path / "admin.cjs"
    script.write_text(ADMIN_BROWSER_SCRIPT)
    shots = ARTIFACTS / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        await add_run(live.app, "WAITING", wait_reason="profile 'alpha' is busy with command 1")
        await add_run(live.app, "QUEUED")
        await add_run(live.app, "FAILED", error="exit status 1")
        async with live.app.state.services.sessionmaker() as session:
            service = Service(name="GitHub", env_var="GITHUB_TOKEN")
            session.add(service)
            await session.flush()
            session.add(ServiceUsage(service_id=service.id, remaining=12, limit=5000))
            await session.commit()
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            user="grace",
            password=PASSWORD,
            timeout=120,
        )
        async with live.app.state.services.sessionmaker() as session:
            made = await session.scalar(select(ApiToken).where(ApiToken.name == "browser-ci"))
    assert found["errors"] == []
    assert found["violations"] == []
    assert "blank" in found["blankError"]
    assert found["nameDescribedBy"] == "name-hint name-error"
    assert found["plaintext"].startswith("crl_")
    assert found["newTokenLabel"] == found["plaintext"]
    assert found["shownAgain"] is False
    assert made is not None
    assert (made.role, made.revoked_at is not None) == ("admin", True)
    assert found["flash"] == "API token browser-ci revoked."
    assert found["flashRole"] == "status"
    assert "Done" in found["flashBefore"]
    audit = found["audit"]
    assert audit.index("revokeApiToken") < audit.index("createApiToken")
    assert found["plaintext"] not in audit
    assert "createApiToken" in found["auditErrors"]  # the blank name's
    assert "revokeApiToken" not in found["auditErrors"]
