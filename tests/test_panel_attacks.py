"""The panel under attack (issue #17): as an outsider, as a logged-in viewer, as a careless
admin. Each test that starts with `test_regression_` failed before its fix; the tables
after them pin what held, so that a regression in any route shows up here.

In-process over HTTP (httpx on the ASGI app raises an app's exception: a 500 fails the
test), each on SQLite and PostgreSQL.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from server.login import safe_next
from server.models import (
    CommandEvent,
    CommandTemplate,
    LogLine,
    Profile,
    Proxy,
    Service,
    utcnow,
)
from server.panel import panel_routes
from server.panel.run_files import ENTRIES_READ, list_files
from server.settings import Settings
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user, browser_for, log_in
from tests.test_panel import (  # noqa: F401 - fixtures
    add_profile,
    add_run,
    admin,
    csrf_of,
    post_form,
    profile_names,
    viewer,
)
from tests.test_panel_runs import LOG_IN_JS

HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>\u202e'
# What must never reach a page unescaped.
UNESCAPED = ("<script>alert", "<img src=x", 'href="javascript:', "onerror=alert(2)>")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No embedded runner: the runs these tests add stay as they are."""
    return settings.model_copy(update={"embedded_runner": False})


def panel_paths(**ids: int) -> list[tuple[str, str]]:
    """(method, path) of every panel route, its ids filled in (1 where not given)."""
    found = []
    for route in panel_routes(Settings()):
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:path)?\}", lambda m: str(ids.get(m.group(1), "1")), route.path)
        found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


def post_forms(page: str) -> list[str]:
    """The actions of a page's POST forms, the header's logout left out."""
    body = page.split("</header>", 1)[-1]
    return re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', body)


async def add_objects(app: Starlette, name: str) -> dict[str, int]:
    """A profile, service, proxy and template named `name` and a run, straight in the tables."""
    async with app.state.services.sessionmaker() as session:
        profile = Profile(name=name, notes=name, tags=[name], user_agent=name, headless=True)
        service = Service(name=name, kind=name, env_var="GH_TOKEN")
        proxy = Proxy(name=name, protocol="socks5", host="h", port=1)
        template = CommandTemplate(name=name, template="echo hi", description=name)
        session.add_all([profile, service, proxy, template])
        await session.commit()
        profile_id = profile.id
        ids = {"service_id": service.id, "proxy_id": proxy.id, "template_id": template.id}
    run_id = await add_run(app, "FAILED", lines=2, profile_id=profile_id, profile_name=name)
    return {"profile_id": profile_id, "command_id": run_id, **ids}


# --- what broke ------------------------------------------------------------------------


async def test_regression_a_flash_with_any_unicode_name_is_no_500(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The flash travels in a cookie (a latin-1 header): a name beyond latin-1 made the
    redirect after a committed change a 500."""
    names = ["Café ☕ 日本", "\u202eevil", '50% off; a=b, "c"', "x" * 200]
    for name in names:
        created = await post_form(admin, "/profiles", name=name)
        assert created.status_code == 303, created.text
        page = await admin.get(created.headers["location"])
        flash = re.search(r'<p class="flash" role="status">(.*?)</p>', page.text)
        assert flash is not None
        assert html.unescape(flash.group(1)) == f"Profile {name} created."
    assert sorted(await profile_names(app)) == sorted(names)


async def test_regression_a_long_flash_is_cut_to_fit_a_cookie(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    profile_id = await add_profile(app, "日" * 200)
    deleted = await post_form(admin, f"/profiles/{profile_id}/delete")
    cookie = deleted.headers["set-cookie"]
    assert len(cookie.encode()) < 4000, len(cookie)  # browsers drop a cookie over 4 KB


async def test_regression_a_viewer_previews_an_unsaved_template(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    """A viewer may preview (a read); without a saved template the page was a 500."""
    for template_id in ("", "999999"):
        page = await post_form(
            viewer, "/templates/preview", templateId=template_id, template="echo {{ 1 + 1 }}"
        )
        assert page.status_code == 200, page.text
        assert "<li><code>2</code></li>" in page.text
        assert post_forms(page.text) == []


async def test_regression_a_forged_htmx_get_shows_a_viewer_no_edit_form(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    """With `HX-Request` a detail page answers its form partial: a viewer got the edit form."""
    ids = await add_objects(app, "alpha")
    for method, path in panel_paths(**ids):
        if method != "GET" or path.endswith(("/tail", "/statuses")) or "/files/" in path:
            continue
        page = await viewer.get(path, headers={"HX-Request": "true"})
        assert page.status_code in (200, 403), (path, page.status_code)
        assert post_forms(page.text) in ([], ["/compose/preview"]), path


async def test_regression_a_token_with_a_control_character_is_refused(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """A NUL in a token was stored, and every run given it crashed (`embedded null byte`)."""
    ids = await add_objects(app, "alpha")
    service_id = ids["service_id"]
    for token in ("abc\x00def", "abc\x07def", "abc\u200bdef"):
        answer = await post_form(admin, f"/services/{service_id}/token", token=token)
        assert answer.status_code == 422
        assert "token must not contain control characters" in answer.text
    async with app.state.services.sessionmaker() as session:
        service = await session.get(Service, service_id)
        assert service is not None
        assert service.token_encrypted is None


async def test_regression_a_limit_that_is_no_number_is_refused(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The composer passes what was typed to the domain; a text limit was a TypeError (500)."""
    typed = {"timeoutSeconds": "abc", "maxAttempts": "1e400", "priority": "9" * 30}
    for path in ("/compose/preview", "/compose/run"):
        answer = await post_form(admin, path, commandString="echo hi", **typed)
        assert answer.status_code in (200, 422), (path, answer.status_code)
        for field in typed:
            assert f"{field} must be between" in answer.text, (path, field)


async def test_regression_a_run_cannot_reorder_the_page_with_bidi_controls(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """U+202E in a file name showed "invoice\u202egpj.exe" as "invoiceexe.jpg"; in an event
    it reversed the panel's own text after it."""
    run_id = await add_run(app, "SUCCEEDED")
    run_dir: Path = app.state.services.settings.commands_dir / str(run_id)
    run_dir.mkdir(parents=True)
    (run_dir / "invoice\u202egpj.exe").write_text("MZ")
    async with app.state.services.sessionmaker() as session:
        data = {"type": "progress", "note\u202e": "\u2067done"}
        session.add(CommandEvent(command_id=run_id, attempt=1, seq=0, type="progress", data=data))
        await session.commit()
    page = (await admin.get(f"/runs/{run_id}")).text
    files, events = page.split('id="run-files"')[1], page.split('id="run-events"')[1]
    assert "invoice[U+202E]gpj.exe</a>" in files
    assert "note[U+202E]" in events
    assert "[U+2067]done" in events
    assert "\u202e" not in page
    download = await admin.get(f"/runs/{run_id}/files/invoice%E2%80%AEgpj.exe")
    assert download.status_code == 200  # the file itself keeps its name


async def test_regression_a_run_leaving_many_files_keeps_its_page_fast(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """The listing read and sorted every entry of the run's directory on each view: 300,000
    files made the page take seconds (20,000 empty folders: one)."""
    run_id = await add_run(app, "SUCCEEDED")
    run_dir: Path = app.state.services.settings.commands_dir / str(run_id)
    for number in range(ENTRIES_READ + 10):
        (run_dir / f"empty{number:05d}").mkdir(parents=True)
    (run_dir / "zz-result.txt").write_text("done")
    listing = list_files(run_dir)
    assert listing.more  # stopped (in whatever order the folder was read), and says so
    assert len(listing.files) <= 1
    page = await admin.get(f"/runs/{run_id}")
    assert "(there are more)" in page.text
    (run_dir / "small").mkdir()
    (run_dir / "small" / "b.txt").write_text("b")
    (run_dir / "small" / "a.txt").write_text("a")
    small = list_files(run_dir / "small")
    assert ([file.path for file in small.files], small.more) == (["a.txt", "b.txt"], False)


# --- what held -------------------------------------------------------------------------


async def test_every_route_refuses_outsiders_viewers_and_missing_csrf(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    ids = await add_objects(app, "alpha")
    viewer_token = csrf_of(await viewer.get("/"))
    reads = {"/templates/preview", "/compose/preview"}  # a viewer may preview
    admin_pages = ("/audit", "/tokens", "/templates/new", "/files/")
    async with browser_for(app) as outsider:
        for method, path in panel_paths(**ids):
            for headers in ({}, {"HX-Request": "true"}, {"Accept": "text/html"}):
                answer = await outsider.request(method, path, headers=headers)
                expected = 303 if method == "GET" and "Accept" in headers else 401
                assert answer.status_code == expected, (method, path, headers)
            if method == "POST":
                forged = await viewer.post(path, data={"csrf_token": viewer_token, "name": "x"})
                assert forged.status_code == (200 if path in reads else 403), path
                for bad in ({}, {"csrf_token": "x" + viewer_token}):
                    assert (await admin.post(path, data=bad)).status_code == 403, path
            elif any(part in path for part in admin_pages) or path.endswith("/revoke"):
                assert (await viewer.get(path)).status_code == 403, path
    assert await profile_names(app) == ["alpha"]


async def test_hostile_names_are_escaped_everywhere_under_a_strict_csp(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    ids = await add_objects(app, HOSTILE)
    run_dir: Path = app.state.services.settings.commands_dir / str(ids["command_id"])
    run_dir.mkdir(parents=True)
    (run_dir / f"{HOSTILE.replace('/', '')}.html").write_text("<script>alert(3)</script>")
    for http in (admin, viewer):
        for method, path in panel_paths(**ids):
            if method != "GET" or path.endswith(("/tail", "/statuses")) or "/files/" in path:
                continue
            for headers in ({}, {"HX-Request": "true"}):
                page = await http.get(path, headers=headers)
                assert not [bad for bad in UNESCAPED if bad in page.text], (path, headers)
                policy = page.headers["content-security-policy"]
                assert "script-src 'self';" in policy, path
                assert "unsafe" not in policy, path


FILE_PATHS = [
    ("x.html", 200),
    ("%3Cimg%20src%3Dx%3E.svg", 200),
    ("..%2F..%2Fetc%2Fpasswd", 404),
    ("%252e%252e%252fetc%252fpasswd", 404),
    ("d//x", 404),
    ("%2Fetc%2Fpasswd", 404),
    ("x.html%00.txt", 404),
    ("link", 404),
    ("a/" * 2000 + "b", 404),
]


async def test_run_files_never_leave_the_run_nor_render_inline(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "SUCCEEDED")
    run_dir: Path = app.state.services.settings.commands_dir / str(run_id)
    run_dir.mkdir(parents=True)
    (run_dir / "x.html").write_text("<script>alert(1)</script>")
    (run_dir / "<img src=x>.svg").write_text('<svg onload="alert(1)"/>')
    (run_dir / "link").symlink_to("/etc/passwd")
    for path, status in FILE_PATHS:
        answer = await admin.get(f"/runs/{run_id}/files/{path}")
        assert answer.status_code == status, path
        if status == 200:
            assert answer.headers["content-type"] == "application/octet-stream"
            assert answer.headers["content-disposition"].startswith("attachment;")
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert b"root:" not in answer.content
    assert (await viewer.get(f"/runs/{run_id}/files/x.html")).status_code == 403


async def test_garbage_in_ids_paging_filters_and_streams_is_no_500(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    ids = await add_objects(app, "alpha")
    many = ",".join(str(n) for n in range(10_000))
    for path in (
        "/profiles/-1",
        "/profiles/1e9",
        "/profiles/%00",
        "/profiles/%EF%BC%91",
        "/runs/99999999999999999999",
        "/tokens/-1/revoke",
        "/runs?page=99999999&status=%00&profile=abc&template=%27",
        "/profiles?page=-1&q=" + "%25" * 3000,
        "/profiles?q=a%00b",
        "/audit?outcome=zzz&user=%00&before=99999999999999999999",
        "/audit?action=a%00",  # was a 500 on PostgreSQL (it refuses NUL in text)
        f"/runs/{ids['command_id']}/log?before=-5",
        "/compose?template=abc&profile=%00&proxy=-1",
        f"/runs/{ids['command_id']}/tail?after=abc",
        f"/runs/statuses?ids={many}",
        "/runs/statuses?ids=a,-1",
    ):
        answer = await admin.get(path)
        assert answer.status_code in (200, 400, 404), (path, answer.status_code)
        assert "Traceback" not in answer.text
    form = {f"p{n}.name": f"n{n}" for n in range(5_000)} | {"template": "echo hi", "name": "t"}
    token = csrf_of(await admin.get("/"))
    for path in ("/templates", "/templates/preview", "/compose/preview", "/profiles"):
        answer = await admin.post(path, data=form, headers={"X-CSRF-Token": token})
        assert answer.status_code in (200, 422), (path, answer.status_code)


OFF_SITE = ["//evil.example", "https://evil.example", "/\\evil.example", "\\\\evil.example",
            " //evil.example", "/\t/evil.example", "javascript:alert(1)", "http:evil.example"]  # fmt: skip


async def test_login_never_redirects_off_site(app: Starlette) -> None:
    for target in OFF_SITE:
        assert safe_next(target) == "/", target
    assert safe_next("/profiles?q=a") == "/profiles?q=a"
    await add_user(app, "mallory", "viewer")
    async with browser_for(app) as http:  # one real login, the rule applied
        answer = await log_in(http, "mallory", next="//evil.example")
        assert (answer.status_code, answer.headers["location"]) == (303, "/")


NUL = "a\x00b"


NUL_FORMS = [
        ("/profiles", {"name": NUL, "notes": NUL, "tags": NUL, "userAgent": NUL, "locale": NUL}),
        ("/profiles", {"name": "ok", "notes": NUL, "userAgent": NUL, "runnerAffinity": NUL}),
        ("/services", {"name": "s", "envVar": "E", "kind": NUL, "settings": '{"a": "\\u0000"}'}),
        ("/services", {"name": "s", "envVar": "E", "baseUrl": "https://x/" + NUL}),
        ("/proxies", {"name": "p", "protocol": "socks5", "host": NUL, "port": "1"}),
        ("/proxies", {"name": "p", "protocol": "socks5", "host": "h", "port": "1",
                      "username": NUL, "password": NUL, "settings": '{"a": "\\u0000"}'}),
        ("/proxies/import", {"links": "socks5://u:p@h:1#" + NUL}),
        ("/proxies/import", {"links": "socks5://u%00:p%00@h:1#%00"}),
        ("/templates", {"name": "t", "template": "echo " + NUL, "description": NUL}),
        ("/templates", {"name": "t", "template": "echo {{ params.x }}", "p0.name": "x",
                        "p0.default": NUL, "p0.description": NUL}),
        ("/templates/preview", {"template": "echo " + NUL}),
        ("/compose/preview", {"commandString": "echo " + NUL}),
        ("/compose/run", {"commandString": "echo {{ params.x }}", "param.x": NUL}),
        ("/tokens", {"name": NUL, "role": "viewer"}),
]  # fmt: skip


async def test_nul_characters_in_forms_are_refused_never_a_500(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    """PostgreSQL refuses NUL in text and `\\u0000` in JSON: the domain must refuse it first."""
    for path, fields in NUL_FORMS:
        answer = await post_form(admin, path, **fields)
        assert answer.status_code in (200, 303, 422), (path, answer.status_code)


# --- in real headless Chromium ---------------------------------------------------------

HOSTILE_BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, pathsJson, newName] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], dialogs: [], statuses: {}, texts: {} };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('dialog', async (dialog) => { found.dialogs.push(dialog.message()); await dialog.dismiss(); });
    /*PAGE_HELPERS*/
    /*LOG_IN*/
    for (const path of JSON.parse(pathsJson)) {
      const response = await page.goto(`${base}${path}`);
      await page.waitForLoadState('networkidle');
      found.statuses[path] = response.status();
      found.texts[path] = await page.locator('main').innerText();
      await shoot(`hostile${path}`.replace(/[^a-z0-9]+/gi, '-').replace(/-$/, ''));
    }
    // A careless admin names a profile with markup and emoji, through the form.
    await page.goto(`${base}/profiles`);
    await page.locator('#name').fill(newName);
    await page.locator('#profile-create button[type="submit"]').click();
    await page.locator('.flash').waitFor({ timeout: 20000 });
    found.flash = await page.locator('.flash').innerText();
    found.heading = await page.locator('h1').innerText();
    await shoot('hostile-created');
    found.violations = await page.evaluate(() => window.__violations);
  /*END*/
""".replace("/*LOG_IN*/", LOG_IN_JS)
)


async def test_hostile_data_in_chromium_runs_no_script(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """Hostile names, log lines, events and file names on every page of a real browser: no
    dialog opens, no CSP violation, no console error, the markup shows as text; a profile
    named with markup and emoji through the form lands on its page with its flash.
    Screenshots (light and dark) go to test-artifacts/attacks-<backend>/."""
    script = tmp_path / "hostile.cjs"
    script.write_text(HOSTILE_BROWSER_SCRIPT)
    shots = ROOT / "test-artifacts" / f"attacks-{backend}"
    shots.mkdir(parents=True, exist_ok=True)
    new_name = '<img src=x onerror=alert("form")> Café ☕'
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        ids = await add_objects(live.app, HOSTILE)
        run_id = ids["command_id"]
        async with live.app.state.services.sessionmaker() as session:
            session.add_all(
                [
                    LogLine(command_id=run_id, seq=3, attempt=1, stream="stderr", ts=utcnow(),
                            text=HOSTILE),
                    CommandEvent(command_id=run_id, attempt=1, seq=3, type="artifact",
                                 data={"type": "artifact", "path": HOSTILE}),
                    CommandEvent(command_id=run_id, attempt=1, seq=3, type=HOSTILE[:60],
                                 data={HOSTILE: "javascript:alert(5)"}),
                ]
            )  # fmt: skip
            await session.commit()
        run_dir: Path = settings.commands_dir / str(run_id)
        run_dir.mkdir(parents=True)
        (run_dir / f"{HOSTILE.replace('/', '')}.html").write_text("<script>alert(3)</script>")
        paths = [
            "/",
            "/profiles",
            f"/profiles/{ids['profile_id']}",
            f"/services/{ids['service_id']}",
            "/proxies",
            f"/templates/{ids['template_id']}",
            f"/compose?template={ids['template_id']}&profile={ids['profile_id']}",
            "/runs",
            f"/runs/{run_id}",
            "/audit",
        ]
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            json.dumps(paths),
            new_name,
            user="grace",
            password=PASSWORD,
            timeout=120,
        )
    assert found["dialogs"] == []
    assert found["violations"] == []
    assert found["errors"] == []
    assert all(status == 200 for status in found["statuses"].values()), found["statuses"]
    assert "<script>alert(1)</script>" in found["texts"][f"/profiles/{ids['profile_id']}"]
    assert "<script>alert(1)</script>" in found["texts"][f"/runs/{run_id}"]  # log, events
    assert found["heading"] == new_name
    assert found["flash"] == f"Profile {new_name} created."
