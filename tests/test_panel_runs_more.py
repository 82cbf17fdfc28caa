"""The runs list's filters and live statuses, and a run page's events, files (downloads,
no path traversal) and older log lines (issue #17): in-process, through a real server for
the SSE stream, and in real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import httpx
from starlette.applications import Starlette

from server.models import CommandEvent, CommandTemplate, utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient, StatementCounter
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.commands import run, wait_status
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user
from tests.test_panel import add_profile, add_run, admin, viewer  # noqa: F401
from tests.test_panel_runs import LOG_IN_JS, STREAM_TIMEOUT, live_admin
from tests.test_streams import SseEvent, pk, sse_events


async def add_template(app: Starlette, name: str) -> int:
    async with app.state.services.sessionmaker() as session:
        template = CommandTemplate(name=name, template="echo hi", parameters=[], env={})
        session.add(template)
        await session.commit()
        return template.id


def listed(page: httpx.Response) -> list[int]:
    """The run ids a runs list shows, in order."""
    return [int(found) for found in re.findall(r'<td><a href="/runs/(\d+)">#', page.text)]


def run_dir(app: Starlette, run_id: int) -> Path:
    path: Path = app.state.services.settings.commands_dir / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- every page, both roles ------------------------------------------------------------


async def test_run_pages_render_for_admin_and_viewer(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "FAILED", lines=450)
    (run_dir(app, run_id) / "out.txt").write_text("hello")
    for path in ("/runs?status=failed", f"/runs/{run_id}", f"/runs/{run_id}/log?before=251"):
        for http, who in ((admin, "alice (admin)"), (viewer, "victor (viewer)")):
            page = await http.get(path)
            assert page.status_code == 200, (path, page.text)
            assert who in page.text
        body = page.text.split("</header>")[1]  # the viewer's render
        assert 'method="post"' not in body, path
        assert "/files/out.txt" not in body
    page = await admin.get(f"/runs/{run_id}")
    assert f'method="post" action="/runs/{run_id}/retry"' in page.text
    assert f'href="/runs/{run_id}/files/out.txt"' in page.text


# --- the list --------------------------------------------------------------------------


async def test_runs_list_filters_by_status_profile_and_template(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    alpha, beta = await add_profile(app, "alpha"), await add_profile(app, "beta")
    nightly = await add_template(app, "nightly")
    a_nightly = await add_run(app, "SUCCEEDED", profile_id=alpha, template_id=nightly)
    b_ad_hoc = await add_run(app, "FAILED", profile_id=beta)
    a_running = await add_run(app, "RUNNING", profile_id=alpha)
    assert listed(await admin.get("/runs")) == [a_running, b_ad_hoc, a_nightly]
    assert listed(await admin.get(f"/runs?profile={alpha}")) == [a_running, a_nightly]
    assert listed(await admin.get(f"/runs?template={nightly}")) == [a_nightly]
    assert listed(await admin.get("/runs?template=ad-hoc")) == [a_running, b_ad_hoc]
    assert listed(await admin.get(f"/runs?status=failed&profile={alpha}")) == []
    page = await admin.get(f"/runs?status=running&profile={alpha}&template=ad-hoc")
    assert listed(page) == [a_running]
    assert f'<option value="{alpha}" selected>alpha</option>' in page.text
    assert '<option value="ad-hoc" selected>' in page.text
    assert f'data-follow="/runs/statuses?ids={a_running}"' in page.text
    # Nonsense filters are no filters.
    assert len(listed(await admin.get("/runs?profile=x&template=-1&status=zzz"))) == 3
    # The filters stay in the paging links.
    more = [await add_run(app, "SUCCEEDED", profile_id=alpha) for _ in range(26)]
    first = await admin.get(f"/runs?profile={alpha}")
    assert "Page 1 of 2 (28)" in first.text
    assert f'href="/runs?profile={alpha}&amp;page=2"' in first.text
    second = await admin.get(f"/runs?profile={alpha}&page=2")
    assert listed(second) == [more[0], a_running, a_nightly]
    assert f'data-follow="/runs/statuses?ids={a_running}"' in second.text  # unfinished only
    partial = await admin.get(f"/runs?profile={beta}", headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith('<div id="runs-table"')
    assert listed(partial) == [b_ad_hoc]


async def read_statuses(
    http: httpx.AsyncClient, ids: list[int], headers: dict[str, str] | None = None
) -> list[SseEvent]:
    events: list[SseEvent] = []
    query = ",".join(map(str, ids))
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        http.stream("GET", f"/runs/statuses?ids={query}", headers=headers or {}) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            events.append(event)
    return events


def cells(events: list[SseEvent]) -> list[tuple[int, str]]:
    """(run id, status text) of each status cell the stream sent."""
    found = []
    for event in events:
        if event.event == "status":
            match = re.search(r'id="run-status-(\d+)".*>([a-z ]+)</span></td>', event.data)
            assert match is not None, event.data
            found.append((int(match.group(1)), match.group(2)))
    return found


async def test_run_statuses_stream_until_every_run_is_over(settings: Settings) -> None:
    async with live_admin(settings) as (live, http):
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            slow = pk(await run(gql, commandString="sleep 1.5"))
            quick = pk(await run(gql, commandString="sleep 0.5"))
            done = await add_run(live.app, "FAILED")
            events = await read_statuses(http, [slow, quick, done])
        assert events[-1].event == "end"
        shown = cells(events)
        assert shown[-1][1] == "succeeded"
        first = dict(shown[:3])  # the current statuses come first
        assert first[done] == "failed"
        assert first[slow] in ("queued", "running")
        final = dict(shown)
        assert final == {slow: "succeeded", quick: "succeeded", done: "failed"}
        # A first connection when all are over: their cells and the end (the page may
        # have rendered before they ended); a reconnect then: 204, EventSource stops.
        again = await read_statuses(http, [slow, done])
        assert [event.event for event in again] == ["status", "status", "end"]
        reconnect = await http.get(
            f"/runs/statuses?ids={slow},{done}", headers={"Last-Event-ID": "end"}
        )
        assert reconnect.status_code == 204
        assert (await http.get("/runs/statuses?ids=999999")).status_code == 204
        for bad in ("", "1,x", ",".join(["1"] * 26), "-1"):
            answer = await http.get(f"/runs/statuses?ids={bad}")
            assert answer.status_code == 400, bad
        async with httpx.AsyncClient(base_url=live.base_url) as anonymous:
            refused = await anonymous.get(f"/runs/statuses?ids={done}")
        assert refused.status_code in (303, 401)


# --- a run's page ----------------------------------------------------------------------


async def test_older_log_lines_on_demand_without_counting(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    count_statements: StatementCounter,
) -> None:
    run_id = await add_run(app, "SUCCEEDED", lines=450)
    page = await admin.get(f"/runs/{run_id}")
    assert "line 251<" in page.text
    assert "line 250<" not in page.text
    assert f'hx-get="/runs/{run_id}/log?before=251"' in page.text
    assert f'href="/runs/{run_id}/log?before=251"' in page.text
    count_statements.statements.clear()
    older = await admin.get(f"/runs/{run_id}/log?before=251", headers={"HX-Request": "true"})
    assert older.status_code == 200
    seqs = [int(seq) for seq in re.findall(r'data-seq="(\d+)"', older.text)]
    assert seqs == list(range(51, 251))
    assert 'id="log-older" hx-swap-oob="true"' in older.text
    assert f'hx-get="/runs/{run_id}/log?before=51"' in older.text
    assert "50 older lines not shown." in older.text
    assert "<html" not in older.text
    reads = [s.lower() for s in count_statements.statements if "log_lines" in s]
    assert reads
    assert not any("count(" in statement for statement in reads)
    first = await admin.get(f"/runs/{run_id}/log?before=51", headers={"HX-Request": "true"})
    assert [int(s) for s in re.findall(r'data-seq="(\d+)"', first.text)] == list(range(1, 51))
    assert "/log?before=" not in first.text
    assert "From the log's first line." in first.text
    # Without htmx: a page of its own, with links both ways.
    plain = await admin.get(f"/runs/{run_id}/log?before=251")
    assert "<html" in plain.text
    assert f'href="/runs/{run_id}/log?before=451"' in plain.text
    assert (await admin.get("/runs/999999/log?before=2")).status_code == 404


async def test_events_are_shown_escaped(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "SUCCEEDED")
    async with app.state.services.sessionmaker() as session:
        for index in range(52):
            session.add(
                CommandEvent(
                    command_id=run_id,
                    attempt=1,
                    seq=index,
                    type="progress",
                    data={"type": "progress", "done": index, "total": 51},
                    ts=utcnow(),
                )
            )
        hostile = {"type": "artifact", "path": "shot.png", "note": "<script>x</script>"}
        session.add(
            CommandEvent(command_id=run_id, attempt=2, seq=99, type="artifact", data=hostile)
        )
        await session.commit()
    page = await admin.get(f"/runs/{run_id}")
    events = page.text.split('id="run-events"')[1].split("</table>")[0]
    assert "The latest 50 events." in events
    assert "<script>x" not in events
    assert "&lt;script&gt;x&lt;/script&gt;" in events
    assert f'<a href="/runs/{run_id}/files/shot.png" download>shot.png</a>' in events
    assert '<span class="key">done</span> 51' in events
    assert '<span class="key">done</span> 1<' not in events  # the oldest two are not shown
    assert "/files/" not in (await viewer.get(f"/runs/{run_id}")).text


async def test_files_download_for_admins_and_never_outside_the_run(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    run_id = await add_run(app, "SUCCEEDED")
    other = await add_run(app, "SUCCEEDED")
    folder = run_dir(app, run_id)
    (folder / "report.txt").write_text("the report")
    (folder / "sub").mkdir()
    (folder / "sub" / "naïve data.bin").write_bytes(b"\x00\x01")
    (run_dir(app, other) / "secret.txt").write_text("other run")
    os.symlink("/etc/passwd", folder / "passwd")
    os.symlink("/etc", folder / "etc")
    os.symlink(folder / "report.txt", folder / "inner-link")
    os.mkfifo(folder / "pipe")
    (folder / "kept.txt").write_text("a hard link's target")
    os.link(folder / "kept.txt", folder / "hardlink")  # to a file anywhere, as far as we know
    page = await admin.get(f"/runs/{run_id}")
    files = page.text.split('id="run-files"')[1].split("</table>")[0]
    assert re.findall(r"download>([^<]+)</a>", files) == ["report.txt", "sub/naïve data.bin"]
    got = await admin.get(f"/runs/{run_id}/files/report.txt")
    assert got.status_code == 200
    assert got.content == b"the report"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"report.txt\"; filename*=UTF-8''report.txt"
    )
    assert got.headers["content-type"] == "application/octet-stream"
    nested = await admin.get(f"/runs/{run_id}/files/sub/na%C3%AFve%20data.bin")
    assert nested.content == b"\x00\x01"
    assert "filename*=UTF-8''na%C3%AFve%20data.bin" in nested.headers["content-disposition"]
    attempts = [
        "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"..%2f{other}%2fsecret.txt",
        f"sub/%2e%2e/%2e%2e/{other}/secret.txt",
        "%2fetc%2fpasswd",
        "/etc/passwd",
        "passwd",
        "etc/passwd",
        "inner-link",
        "pipe",
        "hardlink",
        "kept.txt",
        "sub",
        "%2e/report.txt",
        "sub//naïve data.bin",
        "missing.txt",
    ]
    for attempt in attempts:
        refused = await admin.get(f"/runs/{run_id}/files/{attempt}")
        assert refused.status_code == 404, attempt
        assert "root:" not in refused.text
        assert "other run" not in refused.text
    raw = await admin.get(httpx.URL(f"http://localhost/runs/{run_id}/files/../{other}/secret.txt"))
    assert raw.status_code == 404
    assert "other run" not in raw.text
    assert (await admin.get("/runs/999999/files/report.txt")).status_code == 404
    empty = await add_run(app, "SUCCEEDED")  # no working directory at all
    assert (await admin.get(f"/runs/{empty}/files/report.txt")).status_code == 404
    assert "No files in the run" in (await admin.get(f"/runs/{empty}")).text
    # Viewers see the names, not the contents.
    listing = await viewer.get(f"/runs/{run_id}")
    assert "report.txt" in listing.text
    assert "Only an admin can download them" in listing.text
    denied = await viewer.get(f"/runs/{run_id}/files/report.txt")
    assert denied.status_code == 403
    assert "the report" not in denied.text


# --- in real headless Chromium ---------------------------------------------------------

BROWSER_SCRIPT = browser_script(
    r"""
const fs = require('fs');
(async () => {
  const [base, chromiumPath, shots, runPath, runDir] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
    const page = await context.newPage();
    /*PAGE_HELPERS*/
    /*LOG_IN*/
    // The list: the run's status turns to succeeded live, with no reload.
    await page.goto(`${base}/runs`);
    const cell = page.locator(`#run-status-${runPath.split('/').pop()}`);
    found.listStatusAtLoad = await cell.innerText();
    await page.evaluate(() => { window.__sameDocument = true; });
    await shoot('runs-live');
    fs.writeFileSync(`${runDir}/go`, '');  // the run waits for it to go on
    await cell.locator('.status-succeeded').waitFor({ timeout: 30000 });
    found.listStatusLater = await cell.innerText();
    found.sameDocument = await page.evaluate(() => window.__sameDocument === true);
    try {
      await page.locator('#runs-live', { hasText: 'Every run shown is over.' }).waitFor({ timeout: 10000 });
    } catch (error) {}
    found.listState = await page.locator('#runs-live').innerText();
    // The filters swap the table in place and keep the URL in step.
    await page.locator('#status').selectOption('FAILED');
    await page.locator('#runs-table .empty').waitFor({ timeout: 10000 });
    found.filteredEmpty = await page.locator('#runs-table .empty').innerText();
    found.filteredUrl = page.url();
    // The run page: its events, its files, a download, older lines on demand.
    await page.goto(`${base}${runPath}`);
    found.events = await page.locator('#run-events').innerText();
    found.files = await page.locator('#run-files').innerText();
    found.linesAtLoad = await page.locator('#log-lines .line').count();
    found.firstSeqAtLoad = Number(await page.locator('#log-lines .line').first().getAttribute('data-seq'));
    await shoot('run-page');
    const [download] = await Promise.all([
      page.waitForEvent('download'),
      page.locator('#run-files a', { hasText: 'report.txt' }).click(),
    ]);
    found.downloadName = download.suggestedFilename();
    found.downloaded = fs.readFileSync(await download.path(), 'utf8');
    await page.locator('#log-older a').focus();
    await page.keyboard.press('Enter');
    await page.waitForFunction((before) => document.querySelectorAll('#log-lines .line').length > before, found.linesAtLoad, { timeout: 10000 });
    found.linesAfter = await page.locator('#log-lines .line').count();
    found.firstSeqAfter = Number(await page.locator('#log-lines .line').first().getAttribute('data-seq'));
    found.olderHint = await page.locator('#log-older').innerText();
    found.focused = await page.evaluate(() => document.activeElement && document.activeElement.id);
    found.logStart = (await page.locator('#log-lines').innerText()).slice(0, 20);
    found.urlAfter = new URL(page.url()).pathname;
    await page.locator('#log-older').scrollIntoViewIfNeeded();
    await shoot('run-older-lines');
    // Without htmx the link is a page of its own (here opened as a plain link would).
    await page.goto(`${base}${runPath}/log?before=${found.firstSeqAfter}`);
    found.plainTitle = await page.locator('h1').innerText();
    await shoot('run-log-page');
    found.violations = await page.evaluate(() => window.__violations);
  /*END*/
""".replace("/*LOG_IN*/", LOG_IN_JS)
)

# Waits for the browser's go (so the list sees it unfinished); prints two events, writes a
# file, then 450 lines.
SCRIPT = (
    "sh -c 'while [ ! -e go ]; do sleep 0.1; done; "
    'echo ::corral::{\\"type\\":\\"progress\\",\\"done\\":1,\\"total\\":2}; '
    "echo the report > report.txt; "
    'echo ::corral::{\\"type\\":\\"artifact\\",\\"path\\":\\"report.txt\\"}; '
    "i=1; while [ $i -le 450 ]; do echo out-$i; i=$((i+1)); done'"
)


async def test_runs_list_and_run_page_in_chromium(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """Real Chromium: the list's status cell turns to succeeded live; the run page shows the
    script's events and files, a download works, and "Load older lines" prepends the 200
    before the shown ones. Leaves screenshots (light and dark) in test-artifacts/."""
    script = tmp_path / "runs.cjs"
    script.write_text(BROWSER_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            command_id = await run(gql, commandString=SCRIPT)
            await wait_status(gql, command_id, {"RUNNING"})  # its folder exists
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
            await wait_status(gql, command_id, {"SUCCEEDED"})
    assert found["listStatusAtLoad"] in ("queued", "running")
    assert found["listStatusLater"] == "succeeded"
    assert found["sameDocument"] is True
    assert found["listState"] == "Every run shown is over."
    assert found["filteredEmpty"] == "No runs match these filters."
    assert "/runs?status=FAILED" in found["filteredUrl"]
    assert "progress" in found["events"]
    assert "artifact" in found["events"]
    assert "progress\tdone 1 total 2" in found["events"]
    assert "report.txt" in found["files"]
    assert (found["downloadName"], found["downloaded"]) == ("report.txt", "the report\n")
    assert found["linesAtLoad"] == 200
    assert found["linesAfter"] == 400
    assert found["firstSeqAfter"] == found["firstSeqAtLoad"] - 200
    assert "older line" in found["olderHint"]
    assert found["plainTitle"] == f"Run #{pk(command_id)}: older log lines"
    assert found["focused"] == "log-older-link"  # the keyboard stays where it was
    assert found["logStart"].startswith(f"{found['firstSeqAfter']} out-")  # no blank line
    assert found["urlAfter"] == f"/runs/{pk(command_id)}"
    assert found["violations"] == []
    assert found["errors"] == []
