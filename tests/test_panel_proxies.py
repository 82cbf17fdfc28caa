"""The panel's proxies pages (issue #17): list with health and chains, create/edit/delete with
write-only credentials, share-link import with per-link errors, and "check now" through a
real v2ray sidecar against a local upstream proxy; in-process and in real headless Chromium."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from server.models import AuditEvent, Profile, ProfileProxy, Proxy
from server.panel.proxies import ago
from server.proxies import MAX_IMPORT_LINKS
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD as LOGIN_PASSWORD
from tests.test_login import add_user
from tests.test_panel import admin, audit_of, csrf_of, viewer  # noqa: F401
from xray.binary import installed_binary
from xray.links import redact_share_link

USER, PASSWORD = "proxy-user", "panel-pr0xy-Pa55word-QRS"  # the `upstream` fixture demands these
UUID = "b35bc717-302a-4ded-a2d5-47b376cf248a"
GOOD_VLESS = f"vless://{UUID}@vl.example.com:443?type=ws&security=tls&path=%2Fws#vl-one"
GOOD_SOCKS = "socks5://bob:s0cks-Secret-77@127.0.0.1:1080#local-socks"
BAD_TROJAN = "trojan://tr0jan-Secret-99@tr.example.com:0#badport"
BAD_UUID = "vless://not-a-uuid-S3cret@vl2.example.com:443#vl-bad"


@pytest.fixture
def settings(settings: Settings, site: LocalSite) -> Settings:
    return settings.model_copy(
        update={"proxy_check_url": f"{site.url}/ip", "kill_grace_seconds": 0.5}
    )


async def add_proxy(app: Starlette, name: str, port: int = 3128, **values: object) -> int:
    """A proxy straight into the table (no credentials unless created through the domain)."""
    async with app.state.services.sessionmaker() as session:
        proxy = Proxy(name=name, protocol="http", host="127.0.0.1", port=port, settings={})
        for key, value in values.items():
            setattr(proxy, key, value)
        session.add(proxy)
        await session.commit()
        return proxy.id


async def proxy_named(app: Starlette, name: str) -> Proxy | None:
    async with app.state.services.sessionmaker() as session:
        found: Proxy | None = await session.scalar(select(Proxy).where(Proxy.name == name))
        return found


async def proxy_names(app: Starlette) -> list[str]:
    async with app.state.services.sessionmaker() as session:
        return list(await session.scalars(select(Proxy.name).order_by(Proxy.id)))


async def post(http: httpx.AsyncClient, path: str, **fields: str) -> httpx.Response:
    """Submit a panel form as a browser does (a full page comes back)."""
    return await _post(http, path, fields, htmx=False)


async def post_htmx(http: httpx.AsyncClient, path: str, **fields: str) -> httpx.Response:
    """Submit a panel form as htmx does (the partial to swap comes back)."""
    return await _post(http, path, fields, htmx=True)


async def _post(
    http: httpx.AsyncClient, path: str, fields: dict[str, str], *, htmx: bool
) -> httpx.Response:
    token = csrf_of(await http.get("/proxies"))
    headers = {"HX-Request": "true", "X-CSRF-Token": token} if htmx else {}
    return await http.post(path, data={"csrf_token": token, **fields}, headers=headers)


def main_of(page: httpx.Response) -> str:
    """The page below its header (which holds the logout form)."""
    return page.text.split("</header>", 1)[1]


async def all_audit(app: Starlette) -> list[AuditEvent]:
    async with app.state.services.sessionmaker() as session:
        return list(await session.scalars(select(AuditEvent)))


# --- pages and roles -------------------------------------------------------------------------


async def test_pages_render_for_admin_and_viewer(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    hop = await add_proxy(app, "hop")
    block = {"domains": ["keyword:ads"], "action": "BLOCK"}
    proxy_id = await add_proxy(app, "leaf", via_id=hop, routing_rules=[block])
    paths = ["/proxies", f"/proxies/{proxy_id}", f"/proxies/{proxy_id}/delete"]
    for path in paths:
        as_admin = await admin.get(path)
        as_viewer = await viewer.get(path)
        assert (as_admin.status_code, as_viewer.status_code) == (200, 200), path
        assert "victor (viewer)" in as_viewer.text
        assert 'method="post"' in main_of(as_admin), path
        assert 'method="post"' not in main_of(as_viewer), path
        assert "Check now" not in as_viewer.text
    listing = main_of(await viewer.get("/proxies"))
    assert '<a href="/proxies/' in listing
    assert f'via <a href="/proxies/{hop}">hop</a>' in listing
    assert "not checked" in listing
    page = main_of(await viewer.get(f"/proxies/{proxy_id}"))
    assert "/delete" not in page
    assert "<li><code>1. keyword:ads → blocked</code></li>" in page  # the routing table
    assert (await admin.get("/proxies/999999")).status_code == 404
    assert (await admin.get("/proxies/x1")).status_code == 404


async def test_viewer_forged_posts_are_refused(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    proxy_id = await add_proxy(app, "alpha")
    answers = [
        await post(viewer, "/proxies", name="forged", protocol="http", host="h", port="1"),
        await post(viewer, "/proxies/import", links=GOOD_SOCKS),
        await post(viewer, f"/proxies/{proxy_id}", name="renamed", protocol="http", host="h"),
        await post(viewer, f"/proxies/{proxy_id}/check", view="row"),
        await post(viewer, f"/proxies/{proxy_id}/delete"),
    ]
    assert [answer.status_code for answer in answers] == [403] * 5
    assert await proxy_names(app) == ["alpha"]
    for action in ("createProxy", "importProxies", "updateProxy", "checkProxy", "deleteProxy"):
        events = await audit_of(app, action)
        assert [(event.outcome, event.actor) for event in events] == [("denied", "victor")]


# --- create and edit ---------------------------------------------------------------------


async def test_create_with_write_only_credentials(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    answer = await post(
        admin,
        "/proxies",
        name="Office",
        protocol="http",
        host="Proxy.Example.com",
        port="3128",
        username=USER,
        password=PASSWORD,
        settings="",
        viaId="",
    )
    assert answer.status_code == 303, answer.text
    proxy = await proxy_named(app, "Office")
    assert proxy is not None
    assert (proxy.host, proxy.port, proxy.credentials_encrypted is not None) == (
        "proxy.example.com",
        3128,
        True,
    )
    assert answer.headers["location"] == f"/proxies/{proxy.id}"
    page = await admin.get(answer.headers["location"])
    assert "Proxy Office created." in page.text
    assert "user name set, password set (pane…-QRS)" in page.text  # the preview only
    as_viewer = await viewer.get(f"/proxies/{proxy.id}")
    assert "user name set, password set</dd>" in as_viewer.text  # no preview for viewers
    for path in ("/proxies", f"/proxies/{proxy.id}", f"/proxies/{proxy.id}/delete"):
        text = (await admin.get(path)).text
        assert PASSWORD not in text, path
        assert USER not in text, path
    [event] = await audit_of(app, "createProxy")
    assert (event.outcome, event.actor, event.object_type) == ("ok", "alice", "Proxy")
    assert event.detail == {
        "fields": ["host", "name", "password", "port", "protocol", "settings", "username", "viaId"]
    }


async def test_validation_errors_are_shown_next_to_their_fields(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    await add_proxy(app, "taken")
    answer = await post(
        admin,
        "/proxies",
        name="new",
        protocol="vless",
        host="vl.example.com",
        port="99999",
        password="not-a-uuid-S3cret",
        settings='{"network": ',
    )
    assert answer.status_code == 422
    form = answer.text.split('id="proxy-create"')[1]
    assert 'id="port-error"' in form
    assert 'id="settings-error"' in form
    assert 'value="new"' in form
    assert 'value="vl.example.com"' in form
    assert '<option value="vless" selected>' in form
    assert '>{"network": </textarea>' in html.unescape(form)
    assert "not-a-uuid-S3cret" not in answer.text  # but never the password
    valid = {"protocol": "http", "host": "h.example.com", "port": "8080"}
    taken = await post(admin, "/proxies", name="TAKEN", **valid)
    assert re.search(r'id="name-error">[^<]*already', taken.text)
    unknown_hop = await post(admin, "/proxies", name="n", viaId="424242", **valid)
    assert 'id="viaId-error"' in unknown_hop.text
    # The UUID rule, with htmx: the form alone comes back, to be swapped in place.
    swap = await post_htmx(
        admin,
        "/proxies",
        name="v",
        protocol="vless",
        host="vl.example.com",
        port="443",
        password="not-a-uuid-S3cret",
    )
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<form id="proxy-create"')
    assert re.search(r'id="password-error">[^<]*UUID', swap.text)
    assert "not-a-uuid-S3cret" not in swap.text
    assert await proxy_names(app) == ["taken"]
    events = await audit_of(app, "createProxy")
    assert [event.outcome for event in events] == ["error"] * 4
    assert "S3cret" not in str([event.detail for event in events])


async def test_edit_keeps_a_blank_password_and_can_clear_it(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    gql: GraphQLClient,
) -> None:
    created = await gql(
        """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
        proxy { id } userErrors { message } } }""",
        input={
            "name": "up",
            "protocol": "http",
            "host": "127.0.0.1",
            "port": 3128,
            "username": USER,
            "password": PASSWORD,
        },
    )
    assert created["createProxy"]["userErrors"] == []
    proxy = await proxy_named(app, "up")
    assert proxy is not None
    form = main_of(await admin.get(f"/proxies/{proxy.id}"))
    assert 'name="password" type="password" autocomplete="new-password" value=""' in form
    common = {"protocol": "http", "host": "127.0.0.1", "port": "3128", "settings": "", "viaId": ""}
    kept = await post(admin, f"/proxies/{proxy.id}", name="up2", **common)
    assert kept.status_code == 303
    after = await proxy_named(app, "up2")
    assert after is not None
    assert after.credentials_encrypted == proxy.credentials_encrypted
    [event] = await audit_of(app, "updateProxy")
    assert "password" not in event.detail["fields"]  # type: ignore[index]
    cleared = await post(admin, f"/proxies/{proxy.id}", name="up2", clearCredentials="on", **common)
    assert cleared.status_code == 303
    after = await proxy_named(app, "up2")
    assert after is not None
    assert after.credentials_encrypted is None
    assert "Credentials</dt><dd>none" in (await admin.get(f"/proxies/{proxy.id}")).text
    bad = await post(admin, f"/proxies/{proxy.id}", name="up2", **{**common, "port": "eighty"})
    assert bad.status_code == 422
    assert 'id="port-error"' in bad.text
    assert 'value="eighty"' in bad.text


async def test_list_pages_and_shows_health(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    from datetime import timedelta

    from server.models import utcnow

    for number in range(27):
        await add_proxy(app, f"p-{number:02d}")
    await add_proxy(
        app,
        "a-good",
        health_ok=True,
        health_latency_ms=42.4,
        health_exit_ip="203.0.113.9",
        health_checked_at=utcnow() - timedelta(minutes=3, seconds=5),
    )
    await add_proxy(
        app,
        "a-bad",
        health_ok=False,
        health_error="upstream proxy 'a-bad' is unreachable <refused>",
        health_checked_at=utcnow() - timedelta(hours=2),
    )
    first = await admin.get("/proxies")
    text = html.unescape(first.text)
    assert first.text.count('<tr id="proxy-') == 25
    assert "Page 1 of 2 (29)" in text
    good = text.split(">a-good<")[1].split("</tr>")[0]
    assert 'status-ok">ok<' in good
    assert "42 ms" in good
    assert "203.0.113.9" in good
    assert "3 min ago" in good
    bad = text.split(">a-bad<")[1].split("</tr>")[0]
    assert 'status-failed">failed<' in bad
    assert "2 h ago" in bad
    assert "unreachable &lt;refused&gt;" in first.text  # escaped
    second = await admin.get("/proxies", params={"page": "2"})
    assert second.text.count('<tr id="proxy-') == 4
    assert second.text.count('<input type="hidden" name="page" value="2">') == 4


def test_ages_read_at_a_glance() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert ago(now - timedelta(seconds=3), now) == "just now"
    assert ago(now - timedelta(seconds=45), now) == "45 s ago"
    assert ago(now - timedelta(minutes=3, seconds=59), now) == "3 min ago"
    assert ago(now - timedelta(hours=5), now) == "5 h ago"
    assert ago(now - timedelta(days=1, hours=1), now) == "1 day ago"
    assert ago((now - timedelta(days=3)).replace(tzinfo=None), now) == "3 days ago"


# --- import ------------------------------------------------------------------------------


def test_redacted_links_keep_no_secret() -> None:
    assert redact_share_link(GOOD_SOCKS) == "socks5://…@127.0.0.1:1080#local-socks"
    assert redact_share_link(GOOD_VLESS) == "vless://…@vl.example.com:443?…#vl-one"
    assert redact_share_link("vmess://eyJ2IjoiMiIsImlkIjoiYiJ9") == "vmess://…"
    assert redact_share_link("ss://YWVzLTI1Ni1nY206c3NwYXNz#x") == "ss://…#x"
    assert redact_share_link("http://127.0.0.1:3128") == "http://127.0.0.1:3128"
    assert redact_share_link("http://user:pw:127.0.0.1:1") == "http://…"
    assert redact_share_link("a-password-pasted-alone") == "…"
    assert redact_share_link("trojan://a@b@c@h:1") == "trojan://…@h:1"


async def test_import_keeps_the_good_and_shows_each_bad_link(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    pasted = "\n".join([GOOD_VLESS, "", BAD_TROJAN, "nonsense://what", GOOD_SOCKS, BAD_UUID])
    answer = await post(admin, "/proxies/import", links=pasted)
    assert answer.status_code == 422
    assert await proxy_names(app) == ["vl-one", "local-socks"]
    form = answer.text.split('id="proxy-import"')[1].split("</form>")[0]
    assert "Imported 2 proxies: vl-one, local-socks." in form
    problems = re.findall(r'<li><span class="line-no">line (\d+)</span> <code>([^<]*)</code>', form)
    assert problems == [
        ("3", "trojan://…@tr.example.com:0#badport"),
        ("4", "nonsense://…"),
        ("6", "vless://…@vl2.example.com:443#vl-bad"),
    ]
    assert "port is out of range" in form
    assert "unsupported link type" in form
    assert "not a UUID" in form
    textarea = re.search(r'<textarea id="links"[^>]*>([^<]*)</textarea>', form)
    assert textarea is not None
    assert html.unescape(textarea.group(1)).split("\n") == [BAD_TROJAN, "nonsense://what", BAD_UUID]
    assert UUID not in answer.text
    assert "s0cks-Secret-77" not in answer.text
    assert "link 3:" not in form  # the domain's index, not the line, is not shown
    [event] = await audit_of(app, "importProxies")
    # As GraphQL's importProxies records it: an error with the bad links' codes.
    assert (event.outcome, event.detail) == (
        "error",
        {"fields": ["links"], "userErrors": ["INVALID", "INVALID", "INVALID"]},
    )
    # Nothing secret in any page or any audit entry.
    pages = [await admin.get("/proxies")]
    for name in ("vl-one", "local-socks"):
        proxy = await proxy_named(app, name)
        assert proxy is not None
        assert proxy.credentials_encrypted is not None
        pages.append(await admin.get(f"/proxies/{proxy.id}"))
    for page in pages:
        assert UUID not in page.text
        assert "s0cks-Secret-77" not in page.text
        assert "bob" not in page.text
    audit = str([(event.action, event.detail) for event in await all_audit(app)])
    assert UUID not in audit
    assert "Secret" not in audit


async def test_import_with_htmx_refreshes_the_table_and_a_clean_paste_redirects(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    swap = await post_htmx(admin, "/proxies/import", links=f"{GOOD_SOCKS}\nbroken")
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<form id="proxy-import"')
    assert '<div id="proxies-table" hx-swap-oob="true">' in swap.text
    assert ">local-socks</a>" in swap.text.split("hx-swap-oob")[1]
    assert "line 2</span> <code>…</code>" in swap.text
    clean = await post(admin, "/proxies/import", links=GOOD_VLESS)
    assert clean.status_code == 303
    assert clean.headers["location"] == "/proxies"
    assert "Imported 1 proxy: vl-one." in (await admin.get("/proxies")).text
    empty = await post(admin, "/proxies/import", links="  \n ")
    assert empty.status_code == 422
    assert 'id="links-error"' in empty.text
    many = await post(
        admin, "/proxies/import", links="\n".join([GOOD_SOCKS] * (MAX_IMPORT_LINKS + 1))
    )
    assert many.status_code == 422
    assert f"at most {MAX_IMPORT_LINKS} links at once" in many.text
    assert await proxy_names(app) == ["local-socks", "vl-one"]


async def test_graphql_import_keeps_its_link_limit(gql: GraphQLClient) -> None:
    """The limit moved into the domain (one rule for GraphQL and the panel)."""
    data = await gql(
        "mutation($l: [String!]!) { importProxies(links: $l) { userErrors { field code } } }",
        l=["http://127.0.0.1:1"] * (MAX_IMPORT_LINKS + 1),
    )
    assert data["importProxies"]["userErrors"] == [{"field": ["links"], "code": "TOO_LONG"}]


async def test_panel_and_graphql_audit_an_import_alike(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    gql: GraphQLClient,
) -> None:
    await post(admin, "/proxies/import", links=f"{GOOD_SOCKS}\n{BAD_TROJAN}")
    await gql(
        "mutation($l: [String!]!) { importProxies(links: $l) { userErrors { code } } }",
        l=[GOOD_VLESS, BAD_UUID],
    )
    panel, graphql = await audit_of(app, "importProxies")
    assert (panel.outcome, panel.detail) == (graphql.outcome, graphql.detail)
    assert panel.detail == {"fields": ["links"], "userErrors": ["INVALID"]}


# --- delete ------------------------------------------------------------------------------


async def test_delete_says_what_happens_and_detaches_profiles(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    outer = await add_proxy(app, "outer")
    inner = await add_proxy(app, "inner", via_id=outer)
    async with app.state.services.sessionmaker() as session:
        profile = Profile(name="shop", tags=[], headless=True)
        session.add(profile)
        await session.flush()
        session.add(ProfileProxy(profile_id=profile.id, proxy_id=inner, is_default=True))
        await session.commit()
    blocked = await admin.get(f"/proxies/{outer}/delete")
    assert "It cannot be deleted now: it is the next hop of" in blocked.text
    refused = await post(admin, f"/proxies/{outer}/delete")
    assert refused.status_code == 409
    assert "is the next hop of inner" in html.unescape(refused.text)
    confirm = html.unescape((await admin.get(f"/proxies/{inner}/delete")).text)
    assert "It is detached from 1 profile:" in confirm
    assert "shop</a> (its default" in confirm
    answer = await post(admin, f"/proxies/{inner}/delete")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/proxies"
    flash = html.unescape((await admin.get("/proxies")).text)
    assert "Proxy 'inner' deleted; detached from profile(s): shop." in flash
    assert await proxy_names(app) == ["outer"]
    assert [event.outcome for event in await audit_of(app, "deleteProxy")] == ["error", "ok"]
    assert (await post(admin, f"/proxies/{inner}/delete")).status_code == 404


# --- check now ---------------------------------------------------------------------------


async def test_check_now_with_and_without_htmx(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    upstream: UpstreamHttpProxy,
    site: LocalSite,
) -> None:
    box = app.state.services.secret_box
    from server import proxies as proxy_service

    async with app.state.services.sessionmaker() as session:
        values = {"name": "up", "protocol": "http", "host": "127.0.0.1", "port": upstream.port}
        proxy = await proxy_service.create_proxy(
            session,
            box,
            {**values, "username": USER, "password": PASSWORD},
            routing_rules=[],
            binary=None,
        )
        await session.commit()
        proxy_id = proxy.id
    plain = await post(admin, f"/proxies/{proxy_id}/check", view="detail")
    assert plain.status_code == 303
    assert plain.headers["location"] == f"/proxies/{proxy_id}"
    page = await admin.get(f"/proxies/{proxy_id}")
    assert re.search(r"Proxy up is ok \(\d+ ms\)\.", page.text)
    binary = installed_binary(None)  # which binary and version checks use (issue 12, item 4)
    assert binary is not None
    assert f'<span class="proxy-binary">{binary.label}</span>' in page.text
    assert upstream.connects == [f"127.0.0.1:{site.port}"]
    row = await post_htmx(admin, f"/proxies/{proxy_id}/check", view="row")
    assert row.status_code == 200
    assert row.text.lstrip().startswith(f'<tr id="proxy-{proxy_id}">')
    assert 'status-ok">ok<' in row.text
    assert "exit IP <code>127.0.0.1</code>" in row.text
    health = await post_htmx(admin, f"/proxies/{proxy_id}/check", view="detail")
    assert health.text.lstrip().startswith('<div id="proxy-health"')
    assert PASSWORD not in row.text + health.text + page.text
    events = await audit_of(app, "checkProxy")
    assert [(event.outcome, event.object_type) for event in events] == [("ok", "Proxy")] * 3
    # A proxy that is down: failed, with the reason, in the flash and the list.
    down = await add_proxy(app, "down", port=1)
    await post(admin, f"/proxies/{down}/check", view="row")
    listing = html.unescape((await admin.get("/proxies")).text)
    assert "Proxy down failed its check: upstream proxy 'down'" in listing
    back = await post(admin, f"/proxies/{down}/check", view="row", page="2")
    assert back.headers["location"] == "/proxies?page=2"  # the list page it was pressed on
    assert 'status-failed">failed<' in listing.split(">down<")[1]


# --- in real headless Chromium ---------------------------------------------------------

ARTIFACTS = ROOT / "test-artifacts"
BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, links, checkName] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [], loads: 0 };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      // Chromium logs every 4xx; the import with a bad link answers 422 by design.
      if (message.type() === 'error' && !message.text().includes('status of 422')) {
        found.errors.push(message.text());
      }
    });
    page.on('load', () => { found.loads += 1; });
    /*PAGE_HELPERS*/
    await logIn('/proxies');
    found.htmx = await page.evaluate(() => typeof window.htmx === 'object');

    await page.getByLabel('Share links, one a line').fill(links);
    await page.getByRole('button', { name: 'Import' }).click();
    await page.locator('.import-problems').waitFor({ timeout: 20000 });
    found.problems = await page.locator('.import-problems li').allInnerTexts();
    found.kept = await page.getByLabel('Share links, one a line').inputValue();
    found.table = await page.locator('#proxies-table').innerText();
    await shoot('proxies-import');

    const loadsBefore = found.loads;
    const row = page.locator('tr', { has: page.getByRole('link', { name: checkName, exact: true }) });
    found.before = await row.locator('.health').innerText();
    const button = row.getByRole('button', { name: `Check ${checkName} now` });
    await button.click();
    found.disabledWhileChecking = await page.evaluate(
      (name) => document.querySelector(`button[aria-label="Check ${name} now"]`).disabled, checkName);
    await row.locator('.status-ok').waitFor({ timeout: 30000 });
    found.after = await row.locator('.health').innerText();
    found.loadsDuringCheck = found.loads - loadsBefore;
    found.violations.push(...await page.evaluate(() => window.__violations));
    await shoot('proxies');

    await row.getByRole('link', { name: checkName, exact: true }).click();
    await page.locator('#proxy-health').waitFor();
    await shoot('proxy');
    await page.getByRole('link', { name: 'Delete this proxy…' }).click();
    await page.locator('h1').waitFor();
    await shoot('proxy-delete');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}/proxies`);
    await shoot('proxies-phone');
    found.violations.push(...await page.evaluate(() => window.__violations));
  /*END*/
"""
)


async def test_import_and_check_now_in_chromium(
    settings: Settings, tmp_path: Path, backend: str, upstream: UpstreamHttpProxy
) -> None:
    """Log in, paste share links with a bad one (the good ones join the list, the bad one's
    error is shown next to it, redacted), then "check now" on a proxy pointing at a local
    upstream: its row turns ok in place, with no page load. Screenshots in test-artifacts/."""
    script = tmp_path / "proxies.cjs"
    script.write_text(BROWSER_SCRIPT)
    shots = ARTIFACTS / backend
    shots.mkdir(parents=True, exist_ok=True)
    good_http = f"http://{USER}:{PASSWORD}@127.0.0.1:{upstream.port}#local-up"
    links = "\n".join([GOOD_VLESS, BAD_TROJAN, good_http])
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            links,
            "local-up",
            user="grace",
            password=LOGIN_PASSWORD,
            timeout=120,
        )
        assert await proxy_names(live.app) == ["vl-one", "local-up"]
    assert found["htmx"] is True
    assert found["problems"] == [
        "line 2 trojan://…@tr.example.com:0#badport: the port is out of range (1-65535)"
    ]
    assert found["kept"] == BAD_TROJAN
    assert "vl-one" in found["table"]
    assert "local-up" in found["table"]
    assert "not checked" in found["before"]
    assert found["disabledWhileChecking"] is True
    assert found["after"].startswith("ok")
    assert "127.0.0.1" in found["after"]
    assert found["loadsDuringCheck"] == 0
    assert upstream.connects, "the check went through the upstream proxy"
    assert found["violations"] == []
    assert found["errors"] == []
