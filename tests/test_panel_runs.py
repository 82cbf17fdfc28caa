"""The run page's live log tail (`/runs/{id}/tail`), and its cancel and retry buttons
(issue #17): through a real server for the SSE stream, in-process for the forms, and in
real headless Chromium for the page following a running command."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from sqlalchemy import select
from starlette.applications import Starlette

from graphql_schema.relay import encode_id
from server.models import Command, LogLine
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.commands import run, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.test_login import PASSWORD, add_user, log_in
from tests.test_panel import add_run, admin, audit_of, csrf_of, viewer  # noqa: F401
from tests.test_streams import SseEvent, pk, sse_events

STREAM_TIMEOUT = 30.0
SLOW_LINES = "sh -c 'for i in 1 2 3; do echo tail-$i; sleep 0.3; done'"


@contextlib.asynccontextmanager
async def live_admin(settings: Settings) -> AsyncIterator[tuple[LiveServer, httpx.AsyncClient]]:
    """A real server and a browser-like client logged in to it as the admin grace."""
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        async with httpx.AsyncClient(base_url=live.base_url, timeout=STREAM_TIMEOUT) as http:
            assert (await log_in(http, "grace")).status_code == 303
            yield live, http


async def read_tail(
    http: httpx.AsyncClient, run_id: int, after: int, last_event_id: str | None = None
) -> list[SseEvent]:
    """Every event of the run's tail until the server ends it."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events: list[SseEvent] = []
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        http.stream("GET", f"/runs/{run_id}/tail?after={after}", headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            events.append(event)
    return events


def texts_of(events: list[SseEvent]) -> list[str]:
    """The log lines' texts the `lines` events carry, as a browser shows them."""
    fragments = "".join(event.data for event in events if event.event == "lines")
    spans = re.findall(r'<span class="line[^"]*" data-seq="\d+">(.*?)</span>\n', fragments)
    return [html.unescape(re.sub(r"<[^>]+>", "", span)).split(" ", 1)[1] for span in spans]


async def stored_lines(app: Starlette, run_id: int) -> list[tuple[int, str]]:
    """(seq, text as the page shows it) of the run's stored lines."""
    async with app.state.services.sessionmaker() as session:
        rows = await session.scalars(
            select(LogLine).where(LogLine.command_id == run_id).order_by(LogLine.seq)
        )
        return [
            (row.seq, row.text if row.stream == "stdout" else f"[{row.stream}] {row.text}")
            for row in rows
        ]


async def wait_line(app: Starlette, run_id: int, text: str, timeout: float = 20.0) -> None:
    """Until the run has stored a line `text`."""
    async with asyncio.timeout(timeout):
        for _poll in iter(int, 1):
            if text in [shown for _seq, shown in await stored_lines(app, run_id)]:
                return
            await asyncio.sleep(0.05)


# --- the tail --------------------------------------------------------------------------


# The rest of its lines wait for the test (a file `go` in its working directory): whatever
# the machine's load, the page is read while tail-2 and tail-3 are still to come.
GATED_LINES = (
    "sh -c 'echo tail-1; while [ ! -e go ]; do sleep 0.05; done;"
    " for i in 2 3; do echo tail-$i; sleep 0.3; done'"
)


async def test_tail_follows_a_running_command_then_stops(settings: Settings) -> None:
    async with live_admin(settings) as (live, http):
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            command_id = await run(gql, commandString=GATED_LINES)
            run_id = pk(command_id)
            await wait_status(gql, command_id, {"RUNNING"})
            page = await http.get(f"/runs/{run_id}")
            match = re.search(r'data-tail="/runs/\d+/tail\?after=(\d+)"', page.text)
            assert match is not None, page.text
            after = int(match.group(1))
            assert after < 3
            (settings.commands_dir / str(run_id) / "go").touch()
            events = await read_tail(http, run_id, after)
        kinds = [event.event for event in events]
        assert kinds[-1] == "end"
        assert "status-succeeded" in events[-1].data
        assert "status" in kinds
        stored = await stored_lines(live.app, run_id)
        texts = texts_of(events)
        assert "tail-3" in texts
        assert texts == [shown for seq, shown in stored if seq > after]  # each line once
        last_id = [event.id for event in events if event.event == "lines"][-1]
        assert last_id == str(stored[-1][0])
        # The browser's EventSource reconnects when a stream ends: 204 stops it.
        again = await http.get(f"/runs/{run_id}/tail?after=0", headers={"Last-Event-ID": last_id})
        assert again.status_code == 204
        # A finished run's page does not follow at all.
        assert "data-tail" not in (await http.get(f"/runs/{run_id}")).text


async def test_tail_sends_escaped_lines_of_each_stream(settings: Settings) -> None:
    script = 'sh -c \'echo "<script>x</script>"; echo "a & b" >&2\''
    async with live_admin(settings) as (live, http):
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            command_id = await run(gql, commandString=script)
            await wait_status(gql, command_id, {"SUCCEEDED"})
        events = await read_tail(http, pk(command_id), 0)
        stored = await stored_lines(live.app, pk(command_id))
    fragments = "".join(event.data for event in events if event.event == "lines")
    assert "<script>" not in fragments
    assert "&lt;script&gt;x&lt;/script&gt;" in fragments
    assert '<span class="stream">[stderr]</span> a &amp; b' in fragments
    assert 'class="line stream-stderr"' in fragments
    texts = texts_of(events)
    assert texts == [shown for _seq, shown in stored]
    assert {"<script>x</script>", "[stderr] a & b"} <= set(texts)
    assert events[-1].event == "end"


async def test_tail_refuses_bad_requests(app: Starlette, admin: httpx.AsyncClient) -> None:  # noqa: F811
    run_id = await add_run(app, "SUCCEEDED", lines=2)
    assert (await admin.get(f"/runs/{run_id}/tail?after=x")).status_code == 400
    assert (await admin.get("/runs/999999/tail")).status_code == 404
    # A first connection to a finished run's tail gets its end (see the race test); a
    # reconnect after it gets 204.
    resumed = await admin.get(f"/runs/{run_id}/tail?after=0", headers={"Last-Event-ID": "2"})
    assert resumed.status_code == 204
    anonymous = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    )
    async with anonymous:
        refused = await anonymous.get(f"/runs/{run_id}/tail?after=0")
    assert refused.status_code in (303, 401), refused.status_code
    assert "line 1" not in refused.text


async def test_tail_of_a_run_final_before_it_connected_ends_with_its_badge(
    settings: Settings,
) -> None:
    """The race of a run that becomes final between the page's render and the tail's first
    connection: that connection still gets a stream with the final badge (it used to get
    204, and the page's badge stayed stale); only a reconnect after it gets 204."""
    async with live_admin(settings) as (live, http):
        run_id = await add_run(live.app, "RUNNING", lines=2)
        page = await http.get(f"/runs/{run_id}")
        assert f'data-tail="/runs/{run_id}/tail?after=2"' in page.text
        async with live.app.state.services.sessionmaker() as session:
            command = await session.get(Command, run_id)
            assert command is not None
            command.status = "SUCCEEDED"
            await session.commit()
        events = await read_tail(http, run_id, 2)
        assert [event.event for event in events] == ["status", "end"]
        assert "status-succeeded" in events[-1].data
        assert events[-1].id == "2"  # a reconnect carries it as Last-Event-ID
        again = await http.get(f"/runs/{run_id}/tail?after=2", headers={"Last-Event-ID": "2"})
        assert again.status_code == 204


async def test_attempts_are_separated(app: Starlette, admin: httpx.AsyncClient) -> None:  # noqa: F811
    from server.panel.tail import TailLine, render_lines

    lines = [TailLine(1, 1, "stdout", "one"), TailLine(2, 2, "system", "two")]
    rendered = render_lines(lines, previous_attempt=1)
    assert rendered.count('role="separator"') == 1
    assert "Attempt 2</span>" in rendered
    assert '<span class="stream">[system]</span> two' in rendered
    assert "Attempt 2" in render_lines(lines[1:], previous_attempt=1)
    assert "separator" not in render_lines(lines[1:], previous_attempt=2)


# --- cancel and retry ------------------------------------------------------------------


async def test_buttons_for_admins_only(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    running = await add_run(app, "RUNNING", lines=1)
    failed = await add_run(app, "FAILED", lines=1)
    page = (await admin.get(f"/runs/{running}")).text
    assert f'action="/runs/{running}/cancel"' in page
    assert "/retry" not in page
    assert f'data-tail="/runs/{running}/tail?after=1"' in page
    assert '<script src="/static/run-tail.js" defer></script>' in page
    page = (await admin.get(f"/runs/{failed}")).text
    assert f'action="/runs/{failed}/retry"' in page
    assert "/cancel" not in page
    assert "run-tail.js" not in page
    for run_id in (running, failed):
        page = (await viewer.get(f"/runs/{run_id}")).text
        assert "/cancel" not in page
        assert "/retry" not in page


async def test_viewer_posts_are_refused(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "FAILED")
    token = csrf_of(await viewer.get(f"/runs/{run_id}"))
    for action in ("cancel", "retry"):
        refused = await viewer.post(f"/runs/{run_id}/{action}", data={"csrf_token": token})
        assert refused.status_code == 403
    async with app.state.services.sessionmaker() as session:
        command = await session.get(Command, run_id)
        assert command is not None
        assert command.status == "FAILED"
    for action in ("cancelCommand", "retryCommand"):
        events = await audit_of(app, action)
        assert [(event.outcome, event.actor) for event in events] == [("denied", "victor")]


async def test_cancel_a_long_run_from_its_page(
    app: Starlette,
    gql: GraphQLClient,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    command_id = await run(gql, commandString="sleep 30")
    await wait_status(gql, command_id, {"RUNNING"})
    run_id = pk(command_id)
    token = csrf_of(await admin.get(f"/runs/{run_id}"))
    answer = await admin.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/runs/{run_id}"
    await wait_status(gql, command_id, {"CANCELLED"})
    page = await admin.get(f"/runs/{run_id}")
    assert f"Cancel requested: run #{run_id} stops in a moment." in page.text
    [event] = await audit_of(app, "cancelCommand")
    assert (event.outcome, event.actor, event.actor_kind) == ("ok", "alice", "user")
    assert (event.object_type, event.object_id) == ("Command", encode_id("Command", run_id))
    assert event.detail == {"fields": ["id"]}
    # Cancelling it again: the reason, on the run page, not a 500.
    again = await admin.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
    assert again.status_code == 303
    page = await admin.get(f"/runs/{run_id}")
    assert "Could not cancel this run: the command has already finished (CANCELLED)." in page.text


async def test_retry_a_failed_run(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "FAILED", lines=1, exit_code=1)
    token = csrf_of(await admin.get(f"/runs/{run_id}"))
    answer = await admin.post(f"/runs/{run_id}/retry", data={"csrf_token": token})
    assert answer.status_code == 303
    page = await admin.get(f"/runs/{run_id}")
    assert f"Run #{run_id} is queued again." in page.text
    async with app.state.services.sessionmaker() as session:
        command = await session.get(Command, run_id)
        assert command is not None
        assert command.max_attempts == 2
        assert command.status != "FAILED"  # queued (a runner may hold it already)
    [event] = await audit_of(app, "retryCommand")
    assert (event.outcome, event.actor) == ("ok", "alice")


async def test_retry_of_an_unfinished_run_says_why(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "RUNNING")
    token = csrf_of(await admin.get(f"/runs/{run_id}"))
    answer = await admin.post(f"/runs/{run_id}/retry", data={"csrf_token": token})
    assert answer.status_code == 303
    page = await admin.get(f"/runs/{run_id}")
    assert "Could not retry this run: only a finished command can be retried" in page.text
    missing = await admin.post("/runs/999999/retry", data={"csrf_token": token})
    assert missing.status_code == 404
    events = await audit_of(app, "retryCommand")
    assert [event.outcome for event in events] == ["error", "error"]


# --- in real headless Chromium ---------------------------------------------------------

# The run pages' browser scripts: collect page errors and console errors in `found.errors`,
# then log in (in place of a `/*LOG_IN*/` line, after PAGE_HELPERS_JS, where `page` exists).
LOG_IN_JS = r"""
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') found.errors.push(message.text());
    });
    await logIn();
"""

LIVE_BROWSER_SCRIPT = browser_script(
    r"""
const fs = require('fs');
(async () => {
  const [base, chromiumPath, shots, runPath, runDir] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    /*PAGE_HELPERS*/
    /*LOG_IN*/
    await page.goto(`${base}${runPath}`);
    found.atLoad = await page.locator('#log-lines').innerText();
    fs.writeFileSync(`${runDir}/go`, '');  // the run prints its late lines now
    // Printed after the page loaded: it arrives through the tail.
    await page.locator('#log-lines', { hasText: 'late line' }).waitFor({ timeout: 20000 });
    found.afterLoad = await page.locator('#log-lines').innerText();
    found.state = await page.locator('#log-state').innerText();
    await shoot('run-live');
    await page.locator('#run-cancel button').click();
    await page.waitForURL((target) => target.pathname === runPath, { timeout: 20000 });
    found.flash = await page.locator('.flash').innerText();
    // Even when the run ended before the reloaded page's tail connected, the tail sends
    // its final badge (no reload needed).
    await page.locator('#run-status .status-cancelled').waitFor({ timeout: 20000 });
    found.status = await page.locator('#run-status').innerText();
    await shoot('run-cancelled');
    found.violations = await page.evaluate(() => window.__violations);
  /*END*/
""".replace("/*LOG_IN*/", LOG_IN_JS)
)


async def test_run_page_follows_live_and_cancels_in_chromium(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """Real Chromium on a running command's page: a line printed after the page loaded
    appears through the tail (no CSP violation, no console error); Cancel stops the run
    and the badge turns to cancelled. Leaves screenshots in test-artifacts/."""
    script = tmp_path / "live.cjs"
    script.write_text(LIVE_BROWSER_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    slow = 'sh -c \'echo before-load; while [ ! -e go ]; do sleep 0.1; done; printf "late %s\\n" line; echo "<b>bold?</b>"; sleep 60\''
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            command_id = await run(gql, commandString=slow)
            await wait_status(gql, command_id, {"RUNNING"})
            await wait_line(live.app, pk(command_id), "before-load")
            found = await run_browser_script(
                script,
                live.base_url,
                settings.chromium_path,
                str(shots),
                f"/runs/{pk(command_id)}",
                str(settings.commands_dir / str(pk(command_id))),
                user="grace",
                password=PASSWORD,
                timeout=120,
            )
            await wait_status(gql, command_id, {"CANCELLED"})
    assert "before-load" in found["atLoad"]
    assert "late line" not in found["atLoad"]
    assert "late line" in found["afterLoad"]
    assert "<b>bold?</b>" in found["afterLoad"]  # shown as text, not markup
    assert found["state"] == "Following live…"
    assert "Cancel requested" in found["flash"]
    assert found["status"] == "cancelled"
    assert found["violations"] == []
    assert found["errors"] == []
