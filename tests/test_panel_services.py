"""The panel's services pages and the profile page's service and proxy links (issue #17):
in-process through a logged-in cookie session, and in real headless Chromium."""

# The `admin` and `viewer` fixtures come from tests/test_panel.py (as in test_panel_runs.py).
# ruff: noqa: F811

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import select
from starlette.applications import Starlette

from server.models import AuditEvent, ProfileProxy, ProfileService, Proxy, Service
from server.settings import Settings
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user
from tests.test_panel import add_profile, admin, audit_of, csrf_of, post_form, viewer  # noqa: F401

SECRET = "ghp_SuperSecretShared0123456789abcd"
OWN_SECRET = "ghp_ProfileOwnToken9876543210wxyz"


async def add_service(app: Starlette, name: str, token: str | None = None) -> int:
    """A service through the domain (its token encrypted as the panel would store it)."""
    from server import services as service_domain

    async with app.state.services.sessionmaker() as session:
        values: dict[str, object] = {"name": name, "envVar": f"{name.upper()}_TOKEN"}
        if token is not None:
            values["token"] = token
        service = await service_domain.create_service(
            session, app.state.services.secret_box, values
        )
        await session.commit()
        return service.id


async def add_proxy(app: Starlette, name: str) -> int:
    async with app.state.services.sessionmaker() as session:
        proxy = Proxy(name=name, protocol="socks5", host="127.0.0.1", port=1080, settings={})
        session.add(proxy)
        await session.commit()
        return proxy.id


async def service_row(app: Starlette, name: str) -> Service | None:
    async with app.state.services.sessionmaker() as session:
        found: Service | None = await session.scalar(select(Service).where(Service.name == name))
        return found


async def all_audit(app: Starlette) -> list[AuditEvent]:
    async with app.state.services.sessionmaker() as session:
        return list(await session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def main_of(page: httpx.Response) -> str:
    """The page without its header (whose logout form every page has)."""
    return page.text.split("</header>", 1)[1]


async def secret_free_audit(app: Starlette) -> list[AuditEvent]:
    """Every audit event, asserting that no token value is in any of them."""
    events = await all_audit(app)
    for event in events:
        assert SECRET not in str(event.detail)
        assert OWN_SECRET not in str(event.detail)
        assert SECRET[4:20] not in repr(vars(event))
        assert OWN_SECRET[4:20] not in repr(vars(event))
    return events


# --- every page, both roles ------------------------------------------------------------


async def test_pages_render_for_admin_and_viewer(
    app: Starlette, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    service_id = await add_service(app, "github", token=SECRET)
    profile_id = await add_profile(app, "alpha")
    await add_service(app, "openai")
    await add_proxy(app, "exit-1")
    pages = [
        "/services",
        f"/services/{service_id}",
        f"/services/{service_id}/delete",
        f"/profiles/{profile_id}",
    ]
    for path in pages:
        shown = await admin.get(path)
        assert shown.status_code == 200, (path, shown.text)
        assert 'method="post"' in main_of(shown), path
        seen = await viewer.get(path)
        assert seen.status_code == 200, (path, seen.text)
        assert "victor (viewer)" in seen.text
        body = main_of(seen)
        for form_part in ('method="post"', "hx-post", "<input", "<select", "<textarea"):
            assert form_part not in body, (path, form_part)
        assert SECRET not in seen.text
        assert "ghp_…abcd" not in seen.text
    assert "Link service" in (await admin.get(f"/profiles/{profile_id}")).text
    assert (await admin.get("/services/999999")).status_code == 404
    assert (await admin.get("/services/x1")).status_code == 404


# --- services --------------------------------------------------------------------------


async def test_create_a_service_and_its_write_only_token(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    answer = await post_form(
        admin,
        "/services",
        name="GitHub",
        kind="",
        envVar="GITHUB_TOKEN",
        baseUrl="https://api.github.com",
        settings='{"org": "acme"}',
        rateLimitPolicy="",
        token=SECRET,
    )
    assert answer.status_code == 303, answer.text
    service = await service_row(app, "GitHub")
    assert service is not None
    assert (service.kind, service.settings, service.base_url) == (
        "generic",
        {"org": "acme"},
        "https://api.github.com",
    )
    assert answer.headers["location"] == f"/services/{service.id}"
    page = await admin.get(answer.headers["location"])
    assert "Service GitHub created." in page.text
    assert "<code>ghp_…abcd</code>" in page.text
    assert SECRET not in page.text
    listing = await admin.get("/services")
    assert "<code>ghp_…abcd</code>" in listing.text
    assert SECRET not in listing.text

    rotated = await post_form(admin, f"/services/{service.id}/token", token="sk-rotated-000000wxyz")
    assert rotated.status_code == 303
    page = await admin.get(f"/services/{service.id}")
    assert "Shared token saved." in page.text
    assert "<code>sk-r…wxyz</code>" in page.text
    assert "ghp_…abcd" not in page.text
    cleared = await post_form(admin, f"/services/{service.id}/token", clear="1")
    assert cleared.status_code == 303
    page = await admin.get(f"/services/{service.id}")
    assert "Shared token cleared." in page.text
    assert '<span class="token-state token-unset">not set</span>' in page.text
    assert (await service_row(app, "GitHub")).token_encrypted is None  # type: ignore[union-attr]

    events = await secret_free_audit(app)
    assert [(e.action, e.outcome, e.detail) for e in events if e.action != "login"] == [
        (
            "createService",
            "ok",
            {"fields": ["baseUrl", "envVar", "name", "rateLimitPolicy", "settings", "token"]},
        ),
        ("updateService", "ok", {"fields": ["token"]}),
        ("updateService", "ok", {"fields": ["token"]}),
    ]
    assert len({event.object_id for event in events if event.action != "login"}) == 1


async def test_a_bad_token_is_an_error_that_does_not_quote_it(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    service_id = await add_service(app, "github", token=SECRET)
    bad = "ghp_with space inside"
    answer = await post_form(admin, f"/services/{service_id}/token", token=bad)
    assert answer.status_code == 422
    assert re.search(r'<p class="field-error" id="token-error">[^<]*whitespace', answer.text)
    assert "with space" not in answer.text
    assert "<code>ghp_…abcd</code>" in answer.text  # unchanged
    token = csrf_of(await admin.get("/services"))
    swap = await admin.post(
        f"/services/{service_id}/token",
        data={"token": " "},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<div id="service-token"')
    assert 'id="token-error"' in swap.text
    [first, second] = await audit_of(app, "updateService")
    assert (first.outcome, first.detail) == (
        "error",
        {"fields": ["token"], "userErrors": ["INVALID"]},
    )
    assert second.detail == {"fields": ["token"], "userErrors": ["BLANK"]}


async def test_form_errors_are_inline_and_keep_what_was_typed(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    """A duplicate name on create; bad values on edit (each next to its field)."""
    await add_service(app, "GitHub")
    answer = await post_form(
        admin, "/services", name="github", envVar="GH_TOKEN", settings='{"a": 1}', token=SECRET
    )
    assert answer.status_code == 422
    form = answer.text.split('id="service-create"')[1]
    name_field = form.split('<div class="field')[1]
    assert 'value="github"' in name_field
    assert 'aria-invalid="true"' in name_field
    assert re.search(r'<p class="field-error" id="name-error">[^<]*already', name_field)
    assert 'value="GH_TOKEN"' in form
    assert '{"a": 1}</textarea>' in form.replace("&#34;", '"')
    assert SECRET not in answer.text  # the typed token is not rendered back
    assert "Type it again" not in answer.text  # (only said when the token itself was wrong)
    [event] = await audit_of(app, "createService")
    assert (event.outcome, event.detail["userErrors"]) == ("error", ["TAKEN"])  # type: ignore[index]
    await secret_free_audit(app)
    token = csrf_of(await admin.get("/services"))
    swap = await admin.post(
        "/services",
        data={"name": "GITHUB", "envVar": "X"},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<form id="service-create"')
    service_id = await add_service(app, "gitlab", token=SECRET)
    typed = {"name": "GitHub Enterprise", "kind": "github", "settings": "{not json"}
    bad = await post_form(
        admin,
        f"/services/{service_id}",
        **typed,
        envVar="9LIVES",
        baseUrl="ftp://nope",
        rateLimitPolicy="[1, 2]",
    )
    assert bad.status_code == 422
    for name in ("envVar", "baseUrl", "settings", "rateLimitPolicy"):
        assert f'id="{name}-error"' in bad.text, name
    assert 'value="GitHub Enterprise"' in bad.text
    assert "{not json</textarea>" in bad.text
    fixed = {
        **typed,
        "settings": "",
        "envVar": "GHE_TOKEN",
        "rateLimitPolicy": '{"concurrency": 30}',
    }
    good = await post_form(admin, f"/services/{service_id}", **fixed)
    assert good.status_code == 303
    service = await service_row(app, "GitHub Enterprise")
    assert service is not None
    assert (service.kind, service.env_var, service.rate_limit_policy) == (
        "github",
        "GHE_TOKEN",
        {"concurrency": 30},
    )
    assert service.token_encrypted is not None  # editing leaves the token alone


async def test_services_list_pages(app: Starlette, admin: httpx.AsyncClient) -> None:
    for number in range(27):
        await add_service(app, f"svc{number:02d}")
    profile_id = await add_profile(app, "alpha")
    async with app.state.services.sessionmaker() as session:
        session.add(ProfileService(profile_id=profile_id, service_id=1))
        await session.commit()
    first = await admin.get("/services")
    assert first.text.count('<a href="/services/') == 25
    assert "Page 1 of 2 (27)" in first.text
    row = first.text.split('<a href="/services/1">svc00</a>')[1].split("</tr>")[0]
    assert row.rstrip().endswith("<td>1</td>")  # one profile links it
    second = await admin.get("/services", params={"page": "2"})
    assert second.text.count('<a href="/services/') == 2
    assert ">svc26<" in second.text
    assert ">svc00<" not in second.text


async def test_delete_a_service_says_what_happens_to_its_profiles(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    service_id = await add_service(app, "GitHub", token=SECRET)  # the flash keeps its case
    profile_id = await add_profile(app, "alpha")
    async with app.state.services.sessionmaker() as session:
        session.add(ProfileService(profile_id=profile_id, service_id=service_id))
        await session.commit()
    confirm = await admin.get(f"/services/{service_id}/delete")
    assert "1 linked profile loses the link" in confirm.text
    answer = await post_form(admin, f"/services/{service_id}/delete")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/services"
    listing = await admin.get("/services")
    assert "Service &#39;GitHub&#39; deleted; unlinked from 1 profile(s)." in listing.text
    assert await service_row(app, "GitHub") is None
    assert (await admin.get(f"/profiles/{profile_id}")).status_code == 200
    [event] = await audit_of(app, "deleteService")
    assert (event.outcome, event.detail) == ("ok", {"fields": ["id"]})
    assert (await post_form(admin, f"/services/{service_id}/delete")).status_code == 404


# --- a profile's links -----------------------------------------------------------------


async def links_of(app: Starlette, profile_id: int) -> tuple[dict[int, bool], dict[int, bool]]:
    """{service id: has own token}, {proxy id: is default} of the profile."""
    async with app.state.services.sessionmaker() as session:
        services = await session.scalars(
            select(ProfileService).where(ProfileService.profile_id == profile_id)
        )
        proxies = await session.scalars(
            select(ProfileProxy).where(ProfileProxy.profile_id == profile_id)
        )
        return (
            {link.service_id: link.token_encrypted is not None for link in services},
            {link.proxy_id: link.is_default for link in proxies},
        )


async def test_link_services_and_their_own_tokens(app: Starlette, admin: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    github = await add_service(app, "github", token=SECRET)
    openai = await add_service(app, "openai")
    base = f"/profiles/{profile_id}"
    page = await admin.get(base)
    assert f'<option value="{github}">github (GITHUB_TOKEN)</option>' in page.text
    linked = await post_form(admin, f"{base}/services", serviceId=str(github), token=OWN_SECRET)
    assert (linked.status_code, linked.headers["location"]) == (303, base)
    assert (await post_form(admin, f"{base}/services", serviceId=str(openai))).status_code == 303
    assert (await links_of(app, profile_id))[0] == {github: True, openai: False}
    page = await admin.get(base)
    section = page.text.split('id="profile-services"')[1].split("</section>")[0]
    assert "<code>ghp_…wxyz</code>" in section
    assert OWN_SECRET not in page.text
    assert SECRET not in page.text
    assert f'<option value="{github}">' not in page.text  # linked: no longer offered
    assert "Every service is linked" in section

    rotate = await post_form(
        admin, f"{base}/services/{openai}/token", token="sk-own-token-00001234"
    )
    assert rotate.status_code == 303
    assert "<code>sk-o…1234</code>" in (await admin.get(base)).text
    clear = await post_form(admin, f"{base}/services/{github}/token", clear="1")
    assert clear.status_code == 303
    assert (await links_of(app, profile_id))[0] == {github: False, openai: True}
    unlinked = await post_form(admin, f"{base}/services/{openai}/unlink")
    assert unlinked.status_code == 303
    assert "Service unlinked" in (await admin.get(base)).text
    assert (await links_of(app, profile_id))[0] == {github: False}

    events = [event for event in await secret_free_audit(app) if event.action != "login"]
    assert [(e.action, e.outcome, e.object_id, e.detail) for e in events] == [
        ("linkService", "ok", events[0].object_id, {"fields": fields})
        for fields in (
            ["profileId", "serviceId", "token"],
            ["profileId", "serviceId"],
            ["profileId", "serviceId", "token"],
            ["profileId", "serviceId", "token"],
        )
    ] + [("unlinkService", "ok", events[0].object_id, {"fields": ["profileId", "serviceId"]})]
    assert events[0].object_id is not None
    assert events[0].object_type == "Profile"


async def test_link_errors_are_shown_in_their_section(
    app: Starlette, admin: httpx.AsyncClient
) -> None:
    profile_id = await add_profile(app, "alpha")
    github = await add_service(app, "github")
    base = f"/profiles/{profile_id}"
    none = await post_form(admin, f"{base}/services", serviceId="")
    assert none.status_code == 422
    assert re.search(r'id="serviceId-error">choose a service<', none.text)
    spaced = await post_form(admin, f"{base}/services", serviceId=str(github), token="a b")
    assert spaced.status_code == 422
    assert re.search(r'id="token-error">[^<]*whitespace', spaced.text)
    assert (await links_of(app, profile_id))[0] == {}
    await post_form(admin, f"{base}/services", serviceId=str(github))
    token = csrf_of(await admin.get(base))
    swap = await admin.post(
        f"{base}/services/{github}/token",
        data={"token": "x y"},
        headers={"HX-Request": "true", "X-CSRF-Token": token},
    )
    assert swap.status_code == 422
    assert swap.text.lstrip().startswith('<section id="profile-services"')
    assert f'id="token-{github}-error"' in swap.text
    gone = await post_form(admin, f"{base}/proxies/999/detach")
    assert gone.status_code == 422
    assert '<div role="alert"><p>no such proxy</p></div>' in gone.text
    missing = await post_form(admin, "/profiles/999/services", serviceId=str(github))
    assert missing.status_code == 404


async def test_attach_detach_and_default_proxies(app: Starlette, admin: httpx.AsyncClient) -> None:
    profile_id = await add_profile(app, "alpha")
    first, second, third = [await add_proxy(app, name) for name in ("exit-1", "exit-2", "exit-3")]
    base = f"/profiles/{profile_id}"
    assert (await post_form(admin, f"{base}/proxies", proxyId=str(first))).status_code == 303
    assert (await post_form(admin, f"{base}/proxies", proxyId=str(second))).status_code == 303
    assert (await links_of(app, profile_id))[1] == {first: True, second: False}
    ticked = await post_form(admin, f"{base}/proxies", proxyId=str(third), isDefault="on")
    assert ticked.status_code == 303
    assert (await links_of(app, profile_id))[1] == {first: False, second: False, third: True}
    made = await post_form(admin, f"{base}/proxies/{second}/default")
    assert made.status_code == 303
    assert (await links_of(app, profile_id))[1] == {first: False, second: True, third: False}
    page = await admin.get(base)
    row = page.text.split("<td>exit-2</td>")[1].split("</tr>")[0]
    assert '<span class="status status-default">default</span>' in row
    assert "Make default" not in row
    detached = await post_form(admin, f"{base}/proxies/{third}/detach")
    assert detached.status_code == 303
    assert (await links_of(app, profile_id))[1] == {first: False, second: True}
    actions = [(e.action, e.detail) for e in await all_audit(app) if e.action != "login"]
    assert actions == [
        ("attachProxy", {"fields": ["profileId", "proxyId"]}),
        ("attachProxy", {"fields": ["profileId", "proxyId"]}),
        ("attachProxy", {"fields": ["profileId", "proxyId", "isDefault"]}),
        ("attachProxy", {"fields": ["profileId", "proxyId", "isDefault"]}),
        ("detachProxy", {"fields": ["profileId", "proxyId"]}),
    ]


# --- who may post ----------------------------------------------------------------------


async def test_forged_posts_are_refused(
    app: Starlette, viewer: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    """A viewer's posts (with its CSRF token) are 403 and audited as denied; an admin's
    without the CSRF token are 403 too."""
    service_id = await add_service(app, "github", token=SECRET)
    profile_id = await add_profile(app, "alpha")
    proxy_id = await add_proxy(app, "exit-1")
    async with app.state.services.sessionmaker() as session:
        session.add(ProfileService(profile_id=profile_id, service_id=service_id))
        session.add(ProfileProxy(profile_id=profile_id, proxy_id=proxy_id, is_default=False))
        await session.commit()
    base = f"/profiles/{profile_id}"
    forged = {
        "/services": {"name": "forged", "envVar": "FORGED"},
        f"/services/{service_id}": {"name": "renamed", "envVar": "X"},
        f"/services/{service_id}/token": {"clear": "1"},
        f"/services/{service_id}/delete": {},
        f"{base}/services": {"serviceId": str(service_id), "token": OWN_SECRET},
        f"{base}/services/{service_id}/token": {"token": OWN_SECRET},
        f"{base}/services/{service_id}/unlink": {},
        f"{base}/proxies": {"proxyId": str(proxy_id)},
        f"{base}/proxies/{proxy_id}/default": {},
        f"{base}/proxies/{proxy_id}/detach": {},
    }
    for path, fields in forged.items():
        answer = await post_form(viewer, path, **fields)
        assert answer.status_code == 403, path
        assert "Only an admin can change this." in answer.text
    for path, fields in (
        ("/services", {"name": "no-token", "envVar": "NO_TOKEN"}),
        (f"/services/{service_id}/token", {"clear": "1"}),
        (f"{base}/services/{service_id}/unlink", {}),
    ):
        refused = await admin.post(path, data=fields)  # no csrf_token
        assert refused.status_code == 403, path
    service = await service_row(app, "github")
    assert service is not None
    assert service.token_encrypted is not None
    assert await service_row(app, "forged") is None
    assert await service_row(app, "no-token") is None
    assert await links_of(app, profile_id) == ({service_id: False}, {proxy_id: False})
    denied = [(e.action, e.outcome, e.actor) for e in await secret_free_audit(app)]
    assert [event for event in denied if event[0] != "login"] == [
        (action, "denied", "victor")
        for action in (
            "createService",
            "updateService",
            "updateService",
            "deleteService",
            "linkService",
            "linkService",
            "unlinkService",
            "attachProxy",
            "attachProxy",
            "detachProxy",
        )
    ]


# --- in real headless Chromium ---------------------------------------------------------

ROTATED = "ghp_RotatedShared5555555555555555efgh"
OWN_ROTATED = "sk-ProfileRotated77777777777777ijkl"
SERVICES_BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, profilePath, ...secrets] = process.argv.slice(2);
  const [secret, rotated, own, ownRotated] = secrets;
  const origin = new URL(base).origin;
/*LAUNCH*/
  const found = { errors: [], foreign: [], violations: [], posts: [], leaks: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') found.errors.push(message.text());
    });
    page.on('response', (response) => {
      if (response.status() >= 400) found.errors.push(`${response.status()} ${response.url()}`);
    });
    page.on('request', (request) => {
      if (!request.url().startsWith(origin) && !request.url().startsWith('data:')) {
        found.foreign.push(request.url());
      }
      if (request.method() === 'POST') {
        found.posts.push(`${new URL(request.url()).pathname} ${request.headers()['hx-request'] || 'plain'}`);
      }
    });
    /*PAGE_HELPERS*/
    const check = async (where) => {
      found.violations.push(...await page.evaluate(() => window.__violations));
      const html = await page.content();
      for (const value of secrets) if (html.includes(value)) found.leaks.push(where);
    };
    const flash = async (text) => {
      await page.locator('.flash', { hasText: text }).waitFor({ timeout: 20000 });
      return page.locator('.flash').innerText();
    };

    await logIn('/services');

    await page.getByLabel('Name', { exact: true }).fill('Browser Service');
    await page.getByLabel('Env var name').fill('BROWSER_TOKEN');
    await page.getByLabel('Shared token').fill(secret);
    await page.getByRole('button', { name: 'Create service' }).click();
    await page.waitForURL((target) => /^\/services\/\d+$/.test(target.pathname), { timeout: 20000 });
    const servicePath = new URL(page.url()).pathname;
    found.created = await flash('created');
    found.preview = await page.locator('#service-token code').innerText();
    await check('created');

    await page.getByLabel('New token (rotate)').fill(rotated);
    await page.getByRole('button', { name: 'Rotate token' }).click();
    found.rotatedFlash = await flash('Shared token saved.');
    found.rotatedPreview = await page.locator('#service-token code').innerText();
    await check('rotated');
    await shoot('service');
    await page.goto(`${base}/services`);
    found.list = await page.locator('#services-table').innerText();
    await check('list');
    await shoot('services');
    await page.goto(`${base}${servicePath}/delete`);
    await check('delete');
    await shoot('service-delete');

    await page.goto(`${base}${profilePath}`);
    await page.getByLabel('Link a service').selectOption({ label: 'Browser Service (BROWSER_TOKEN)' });
    await page.getByLabel("The profile's own token").fill(own);
    await page.getByRole('button', { name: 'Link service' }).click();
    found.linked = await flash('Service linked.');
    found.ownPreview = await page.locator('#profile-services tbody code').nth(1).innerText();
    await check('linked');
    await page.getByLabel('New own token for Browser Service').fill(ownRotated);
    await page.getByRole('button', { name: 'Rotate' }).click();
    found.ownRotated = await flash("The profile's own token saved.");
    found.ownRotatedPreview = await page.locator('#profile-services tbody code').nth(1).innerText();
    await check('own rotated');

    await page.getByLabel('Attach a proxy').selectOption({ label: 'exit-1 (socks5://127.0.0.1:1080)' });
    await page.getByRole('button', { name: 'Attach proxy' }).click();
    found.attached = await flash('Proxy attached.');
    found.proxies = await page.locator('#profile-proxies tbody').innerText();
    await check('attached');
    await shoot('profile-links');
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}${profilePath}`);
    await shoot('profile-links-phone');
  /*END*/
"""
)


async def test_services_and_links_in_chromium(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """Real headless Chromium, a real server: create a service through the form, set and
    rotate its token and see only previews (no token in any page's HTML), link it to a
    profile with the profile's own token, rotate that, attach a proxy. No console error,
    no CSP violation, nothing from another origin; screenshots in test-artifacts/."""
    script = tmp_path / "services.cjs"
    script.write_text(SERVICES_BROWSER_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        profile_id = await add_profile(live.app, "alpha")
        proxy_id = await add_proxy(live.app, "exit-1")
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            f"/profiles/{profile_id}",
            SECRET,
            ROTATED,
            OWN_SECRET,
            OWN_ROTATED,
            user="grace",
            password=PASSWORD,
            timeout=120,
        )
        service = await service_row(live.app, "Browser Service")
        assert service is not None
        links = await links_of(live.app, profile_id)
        box = live.app.state.services.secret_box
        assert service.token_encrypted is not None
        assert box.decrypt(service.token_encrypted) == ROTATED
        async with live.app.state.services.sessionmaker() as session:
            link = await session.get(ProfileService, (profile_id, service.id))
        assert link is not None
        assert link.token_encrypted is not None
        assert box.decrypt(link.token_encrypted) == OWN_ROTATED
        await secret_free_audit(live.app)
    assert found["created"] == "Service Browser Service created."
    assert (found["preview"], found["rotatedPreview"]) == ("ghp_…abcd", "ghp_…efgh")
    assert found["rotatedFlash"] == "Shared token saved."
    assert "Browser Service" in found["list"]
    assert "ghp_…efgh" in found["list"]
    assert found["linked"] == "Service linked."
    assert (found["ownPreview"], found["ownRotatedPreview"]) == ("ghp_…wxyz", "sk-P…ijkl")
    assert found["attached"] == "Proxy attached."
    assert "exit-1" in found["proxies"]
    assert "default" in found["proxies"]
    assert links == ({service.id: True}, {proxy_id: True})
    assert found["leaks"] == []
    assert all(post.endswith(" true") for post in found["posts"][1:]), found["posts"]
    assert len(found["posts"]) == 6  # login (plain), then five htmx form posts
    assert found["foreign"] == []
    assert found["violations"] == []
    assert found["errors"] == []
