"""The panel's templates editor (live preview) and composer (issue #17): in-process with a
logged-in cookie session on both databases, and in real headless Chromium."""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from starlette.applications import Starlette

from graphql_schema.relay import encode_id
from server import services as service_domain
from server import templates as template_domain
from server.models import AuditEvent, Command, CommandTemplate, LogLine
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_compose import SIDECAR_NOTE, UPSTREAM_PASSWORD, proxied_profile
from tests.test_login import PASSWORD, add_user
from tests.test_panel import add_profile, admin, audit_of, csrf_of, viewer  # noqa: F401
from tests.test_supervisor import pk

TOKEN = "svc-secret-token-0123456789abcdef"
GREETING = {
    "name": "greet",
    "description": "says hello",
    "template": "echo hello {{ params.who }} x{{ params.times }}",
    "parameters": [
        {"name": "who", "type": "string", "default": "world"},
        {"name": "times", "type": "int", "default": 2},
        {"name": "loud", "type": "bool", "default": False},
    ],
}


async def add_template(app: Starlette, values: dict[str, Any] | None = None) -> int:
    async with app.state.services.sessionmaker() as session:
        template = await template_domain.create_template(session, dict(values or GREETING))
        await session.commit()
        return template.id


async def add_service(app: Starlette, name: str, profile_id: int | None = None) -> int:
    """A service with a shared token (and linked to `profile_id`, when given)."""
    box = app.state.services.secret_box
    async with app.state.services.sessionmaker() as session:
        service = await service_domain.create_service(
            session, box, {"name": name, "envVar": "SVC_TOKEN", "token": TOKEN}
        )
        if profile_id is not None:
            await service_domain.link_service(session, box, profile_id, service.id, {})
        await session.commit()
        return service.id


async def post(http: httpx.AsyncClient, path: str, **fields: str) -> httpx.Response:
    token = csrf_of(await http.get("/templates"))
    return await http.post(path, data={"csrf_token": token, **fields})


async def count(app: Starlette, model: type[Any]) -> int:
    async with app.state.services.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def main_of(page: httpx.Response) -> str:
    return page.text.split("<main>", 1)[1]


def preview_of(page: httpx.Response) -> str:
    return page.text.split('<section id="preview"', 1)[1].split("</section>", 1)[0]


# --- pages, roles, CSRF ----------------------------------------------------------------


async def test_pages_render_for_admin_and_viewer(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    template_id = await add_template(app)
    paths = [
        "/templates",
        f"/templates/{template_id}",
        f"/templates/{template_id}/delete",
        "/compose",
        f"/compose?template={template_id}",
    ]
    for path in [*paths, "/templates/new"]:
        page = await admin.get(path)
        assert page.status_code == 200, (path, page.text)
    assert 'id="template-editor"' in (await admin.get(f"/templates/{template_id}")).text
    assert 'id="compose-run"' in (await admin.get("/compose")).text
    for path in paths:
        page = await viewer.get(path)
        assert page.status_code == 200, (path, page.text)
        forms = re.findall(r'<form[^>]*method="post"[^>]*>', main_of(page))
        # The composer's preview form is a read; no form of a viewer's page changes anything.
        assert all('action="/compose/preview"' in form for form in forms), (path, forms)
        assert "/delete" not in main_of(page) or path.endswith("/delete")
        assert 'id="compose-run"' not in page.text
        assert 'id="template-editor"' not in page.text
    shown = await viewer.get(f"/templates/{template_id}")
    assert "echo hello {{ params.who }}" in shown.text  # read-only
    assert "<li><code>hello</code></li>" in preview_of(shown)
    assert (await viewer.get("/templates/new")).status_code == 403
    assert (await admin.get("/templates/999999")).status_code == 404


async def test_viewer_posts_are_refused(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    template_id = await add_template(app)
    answers = [
        await post(viewer, "/templates", name="forged", template="echo x"),
        await post(viewer, f"/templates/{template_id}", name="renamed", template="echo x"),
        await post(viewer, f"/templates/{template_id}/delete"),
        await post(viewer, "/compose/run", template=str(template_id)),
    ]
    assert [answer.status_code for answer in answers] == [403] * 4
    assert await count(app, Command) == 0
    async with app.state.services.sessionmaker() as session:
        names = list(await session.scalars(select(CommandTemplate.name)))
    assert names == ["greet"]
    for action in ("createCommandTemplate", "deleteCommandTemplate", "runCommand"):
        events = await audit_of(app, action)
        assert [(e.outcome, e.actor) for e in events] == [("denied", "victor")], action
    # A preview is a read: a viewer may compose one.
    previewed = await post(viewer, "/compose/preview", template=str(template_id))
    assert previewed.status_code == 200
    assert "<li><code>x2</code></li>" in preview_of(previewed)


async def test_posts_need_the_csrf_token(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    template_id = await add_template(app)
    for path in ("/templates", f"/templates/{template_id}", "/compose/run", "/templates/preview"):
        refused = await admin.post(path, data={"name": "x", "template": "echo x"})
        assert refused.status_code == 403, path
    assert await count(app, CommandTemplate) == 1
    assert await count(app, Command) == 0


# --- the editor ------------------------------------------------------------------------


async def test_create_edit_and_delete_a_template(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    created = await post(
        admin,
        "/templates",
        name="fetch",
        description="gets a page",
        template="curl {{ params.url }} --retry {{ params.tries }}",
        timeoutSeconds="60",
        maxAttempts="2",
        backoffSeconds="1.5",
        env="LANG=C\nMODE=fast",
        **{
            "p0.name": "url",
            "p0.type": "string",
            "p0.required": "on",
            "p1.name": "tries",
            "p1.type": "int",
            "p1.default": "3",
            "p2.name": "mode",
            "p2.type": "choice",
            "p2.choices": "a, b",
            "p2.default": "b",
            "p3.name": "",  # a blank row: ignored
        },
    )
    assert created.status_code == 303, created.text
    template_id = int(created.headers["location"].rsplit("/", 1)[1])
    async with app.state.services.sessionmaker() as session:
        template = await session.get(CommandTemplate, template_id)
        assert template is not None
        assert (template.timeout_seconds, template.max_attempts) == (60, 2)
        assert template.backoff_seconds == 1.5
        assert template.env == {"LANG": "C", "MODE": "fast"}
        assert [
            (p["name"], p["type"], p["default"], p["required"]) for p in template.parameters
        ] == [
            ("url", "string", None, True),
            ("tries", "int", 3, False),
            ("mode", "choice", "b", False),
        ]
    page = await admin.get(created.headers["location"])
    assert "Template fetch created." in page.text
    assert 'value="tries"' in page.text
    assert 'value="3"' in page.text
    assert "<li><code>&lt;url&gt;</code></li>" in preview_of(page)  # a sample value
    [event] = await audit_of(app, "createCommandTemplate")
    assert (event.outcome, event.actor, event.object_type) == ("ok", "alice", "CommandTemplate")
    assert event.object_id == encode_id("CommandTemplate", template_id)
    assert "curl" not in str(event.detail)

    edited = await post(
        admin,
        f"/templates/{template_id}",
        name="fetch2",
        template="wget {{ params.url }}",
        maxAttempts="1",
        **{"p0.name": "url", "p0.type": "string", "p0.default": "http://x"},
    )
    assert edited.status_code == 303
    async with app.state.services.sessionmaker() as session:
        template = await session.get(CommandTemplate, template_id)
        assert template is not None
        assert (template.name, template.template, template.timeout_seconds) == (
            "fetch2",
            "wget {{ params.url }}",
            None,
        )
        assert [p["name"] for p in template.parameters] == ["url"]
    [event] = await audit_of(app, "updateCommandTemplate")
    assert event.outcome == "ok"

    deleted = await post(admin, f"/templates/{template_id}/delete")
    assert deleted.status_code == 303
    assert deleted.headers["location"] == "/templates"
    assert await count(app, CommandTemplate) == 0
    listing = await admin.get("/templates")
    assert "Command template &#39;fetch2&#39; deleted" in listing.text
    [event] = await audit_of(app, "deleteCommandTemplate")
    assert event.outcome == "ok"


async def test_bad_source_is_shown_next_to_the_field(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    answer = await post(
        admin,
        "/templates",
        name="broken",
        template="echo {{ oops",
        **{"p0.name": "bad name", "p0.type": "int", "p0.default": "x"},
    )
    assert answer.status_code == 422
    form = answer.text.split('id="template-editor"', 1)[1]
    assert re.search(r'<p class="field-error" id="template-error">template does not parse', form)
    assert ">echo {{ oops</textarea>" in form  # kept as typed
    assert 'id="parameters-error"' in form
    assert 'value="bad name"' in form
    assert 'value="broken"' in form
    assert await count(app, CommandTemplate) == 0
    [event] = await audit_of(app, "createCommandTemplate")
    assert event.outcome == "error"
    # A wrong-typed default is refused by the domain, next to the parameters.
    answer = await post(
        admin,
        "/templates",
        name="typed",
        template="echo {{ params.n }}",
        **{"p0.name": "n", "p0.type": "int", "p0.default": "many"},
    )
    assert answer.status_code == 422
    assert re.search(
        r'id="parameters-error">n: default &#39;many&#39; is not a valid int', answer.text
    )


async def test_preview_shows_errors_inline_and_writes_nothing(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    profile_id = await add_profile(app, "alpha")
    await add_service(app, "mail", profile_id)
    before = (await count(app, AuditEvent), await count(app, CommandTemplate))
    token = csrf_of(await admin.get("/templates"))
    headers = {"HX-Request": "true", "X-CSRF-Token": token}

    async def preview(source: str, **fields: str) -> str:
        answer = await admin.post(
            "/templates/preview",
            data={"template": source, "previewProfile": str(profile_id), **fields},
            headers=headers,
        )
        assert answer.status_code == 200, answer.text
        assert answer.text.lstrip().startswith('<section id="preview"')  # the box alone
        return answer.text

    shown = await preview(
        "run {{ profile.name }} {{ params.n }} {{ services | map(attribute='env_var') | join(',') }}"
        " {{ services }}",
        **{"p0.name": "n", "p0.type": "int", "p0.default": "7"},
    )
    assert "<li><code>alpha</code></li>" in shown
    assert "<li><code>7</code></li>" in shown
    assert "<code>SVC_TOKEN</code>" in shown  # the variable's name only
    assert TOKEN not in shown
    assert TOKEN[:12] not in shown
    assert "cannot compose" in await preview("echo {% if %}")
    assert "template does not parse" in await preview("echo {{ oops")
    assert "not a declared parameter" in await preview("echo {{ params.nope }}")
    assert "cannot be split into arguments" in await preview("echo 'unbalanced")
    assert "placeholder" in await preview("sh -c 'echo {{ profile.name }}'")
    # Without htmx: the editor page, the preview filled, the form as typed.
    page = await admin.post(
        "/templates/preview", data={"csrf_token": token, "template": "echo {{ oops", "name": "n1"}
    )
    assert page.status_code == 200
    assert 'id="template-editor"' in page.text
    assert ">echo {{ oops</textarea>" in page.text
    assert "template does not parse" in preview_of(page)
    assert (await count(app, AuditEvent), await count(app, CommandTemplate)) == before


# --- the composer ----------------------------------------------------------------------


async def test_composer_renders_typed_fields(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    template_id = await add_template(
        app,
        {
            "name": "typed",
            "template": "echo {{ params.n }} {{ params.flag }} {{ params.pick }} {{ params.s }}",
            "parameters": [
                {"name": "n", "type": "int", "default": 5},
                {"name": "flag", "type": "bool", "default": True},
                {"name": "pick", "type": "choice", "choices": ["red", "blue"], "default": "blue"},
                {"name": "s", "type": "string", "required": True},
            ],
        },
    )
    page = await admin.get(f"/compose?template={template_id}")
    assert re.search(r'<input id="param-n" name="param.n" type="number" value="5"', page.text)
    assert re.search(
        r'<input id="param-flag" name="param.flag" type="checkbox" checked>', page.text
    )
    assert re.search(r'<select id="param-pick" name="param.pick">', page.text)
    assert "<option selected>blue</option>" in page.text
    assert re.search(r'<input id="param-s" name="param.s" type="text" value=""', page.text)
    assert "commandString" not in page.text
    # The htmx swap when the template select changes: the second form alone.
    swap = await admin.get(f"/compose?template={template_id}", headers={"HX-Request": "true"})
    assert swap.text.lstrip().startswith('<form id="compose-form"')
    assert 'name="param.n"' in swap.text
    adhoc = await admin.get("/compose")
    assert 'name="commandString"' in adhoc.text
    assert "param." not in adhoc.text


async def test_a_wrong_typed_parameter_is_refused_next_to_its_field(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    template_id = await add_template(app)
    answer = await post(
        admin,
        "/compose/run",
        template=str(template_id),
        **{"param.times": "lots", "param.who": "x"},
    )
    assert answer.status_code == 422
    field = answer.text.split('id="param-times"', 1)[1].split("</div>", 1)[0]
    assert 'value="lots"' in field
    assert re.search(
        r'class="field-error" id="param.times-error">parameter &#39;times&#39; must be an integer',
        field,
    )
    assert await count(app, Command) == 0
    [event] = await audit_of(app, "runCommand")
    assert event.outcome == "error"
    # An ad-hoc command that does not render: next to its textarea.
    answer = await post(admin, "/compose/run", commandString="echo {{ nope }}")
    assert answer.status_code == 422
    assert re.search(r'id="commandString-error">template uses an unknown variable', answer.text)
    assert ">echo {{ nope }}</textarea>" in answer.text


async def test_a_panel_run_is_audited_and_runs(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    profile_id = await add_profile(app, "alpha")
    service_id = await add_service(app, "mail", profile_id)
    template_id = await add_template(app)
    fields = {
        "template": str(template_id),
        "profile": str(profile_id),
        f"service.{service_id}": "on",
        "param.who": "panel; rm -rf ~",
        "param.times": "3",
    }
    preview = await post(admin, "/compose/preview", **fields)
    assert "<li><code>panel; rm -rf ~</code></li>" in preview_of(preview)
    assert "<code>SVC_TOKEN</code>" in preview_of(preview)
    assert TOKEN not in preview.text
    answer = await post(admin, "/compose/run", **fields)
    assert answer.status_code == 303, answer.text
    run_id = int(answer.headers["location"].rsplit("/", 1)[1])
    assert answer.headers["location"] == f"/runs/{run_id}"
    [event] = await audit_of(app, "runCommand")
    assert (event.outcome, event.actor, event.object_type) == ("ok", "alice", "Command")
    assert event.object_id == encode_id("Command", run_id)
    assert event.detail == {"fields": ["params", "profileId", "serviceIds", "templateId"]}
    # The runner heard of it (announced on commit, as GraphQL's runCommand does).
    async with asyncio.timeout(30):
        while True:
            async with app.state.services.sessionmaker() as session:
                command = await session.get(Command, run_id)
                assert command is not None
                if command.status == "SUCCEEDED":
                    break
            await asyncio.sleep(0.05)
    assert command.argv == ["echo", "hello", "panel; rm -rf ~", "x3"]
    assert (command.template_id, command.profile_id) == (template_id, profile_id)
    async with app.state.services.sessionmaker() as session:
        texts = list(
            await session.scalars(select(LogLine.text).where(LogLine.command_id == run_id))
        )
    assert "hello panel; rm -rf ~ x3" in texts
    page = await admin.get(answer.headers["location"])
    assert f"Run #{run_id} queued." in page.text


# --- in real headless Chromium ---------------------------------------------------------

BROWSER_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, templateId] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') found.errors.push(message.text());
    });
    /*PAGE_HELPERS*/
    await logIn();
    await page.goto(`${base}/templates`);
    await shoot('templates');
    await page.goto(`${base}/templates/${templateId}`);
    found.before = await page.locator('#preview-argv').innerText();
    // Type into the source: the preview follows once the typing pauses.
    const source = page.locator('#template');
    await source.fill('');
    await source.pressSequentially('printf %s-%s {{ params.who }} typed', { delay: 10 });
    await page.locator('#preview-argv', { hasText: 'typed' }).waitFor({ timeout: 10000 });
    found.after = await page.locator('#preview-argv').innerText();
    await source.pressSequentially(' {{ oops');
    await page.locator('#preview .preview-errors').waitFor({ timeout: 10000 });
    found.error = await page.locator('#preview .preview-errors').innerText();
    await shoot('template-editor-error');
    await source.fill('echo hello {{ params.who }} x{{ params.times }}');
    await page.locator('#preview-argv', { hasText: 'x2' }).waitFor({ timeout: 10000 });
    await shoot('template-editor');
    await page.goto(`${base}/templates/${templateId}/delete`);
    await shoot('template-delete');
    await page.goto(`${base}/templates/new`);
    await shoot('template-new');
    // Compose: pick the template (htmx swaps the typed fields in), fill, preview, run.
    await page.goto(`${base}/compose`);
    await page.locator('#pick-template').selectOption(templateId);
    await page.locator('#param-who').waitFor({ timeout: 10000 });
    found.pushed = new URL(page.url()).search;
    await page.locator('#param-who').fill('chromium');
    await page.locator('#param-times').fill('7');
    await page.locator('button', { hasText: 'Preview' }).click();
    await page.locator('#preview-argv', { hasText: 'chromium' }).waitFor({ timeout: 10000 });
    found.composed = await page.locator('#preview-argv').innerText();
    await shoot('compose');
    await page.locator('#compose-run').click();
    await page.waitForURL((target) => /^\/runs\/\d+$/.test(target.pathname), { timeout: 20000 });
    await page.locator('#log-lines', { hasText: 'hello chromium x7' }).waitFor({ timeout: 20000 });
    found.log = await page.locator('#log-lines').innerText();
    found.runPath = new URL(page.url()).pathname;
    await shoot('compose-run');
    found.violations = await page.evaluate(() => window.__violations);
  /*END*/
"""
)


async def test_editor_and_composer_in_chromium(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """Real Chromium: typing in the editor changes the preview (debounced, errors inline);
    the composer's typed fields arrive by htmx, preview, run, and the run page shows the
    line live. Leaves screenshots in test-artifacts/."""
    script = tmp_path / "templates.cjs"
    script.write_text(BROWSER_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        template_id = await add_template(live.app)
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            str(template_id),
            user="grace",
            password=PASSWORD,
            timeout=120,
        )
    assert found["before"].split() == ["echo", "hello", "world", "x2"]
    assert found["after"].split() == ["printf", "%s-%s", "world", "typed"]
    assert "template does not parse" in found["error"]
    assert found["pushed"] == f"?template={template_id}&profile="
    assert found["composed"].split() == ["echo", "hello", "chromium", "x7"]
    assert "hello chromium x7" in found["log"]
    assert found["violations"] == []
    assert found["errors"] == []


async def test_composer_preview_shows_the_sidecar_note_and_no_password(
    gql: GraphQLClient,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    profile_id = await proxied_profile(gql)
    fields = {"profile": str(pk(profile_id)), "commandString": "echo {{ proxy.url }}"}

    preview = preview_of(await post(admin, "/compose/preview", **fields))

    assert "<li><code>socks5://127.0.0.1:&lt;sidecar&gt;</code></li>" in preview
    note = preview.split('id="preview-note">', 1)[1].split("</p>", 1)[0]
    assert html.unescape(note) == SIDECAR_NOTE
    assert UPSTREAM_PASSWORD not in preview
