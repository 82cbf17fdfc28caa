"""Proxy health on a schedule (issue 13): scheduled checks through real v2ray sidecars and
local upstreams, the bounded history, the flag after N failures in a row, holding runs on a
flagged proxy, exactly-once checks across runners, and a clean stop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from runner.proxy_checks import ProxyCheckSchedule
from server.db import create_engine, create_sessionmaker
from server.models import Proxy, ProxyCheck, utcnow
from server.proxy_health import (
    PROXY_CHECKS_KEPT,
    CheckTrigger,
    FlaggedProxy,
    add_check,
    held_proxies,
)
from server.secretbox import load_secret_box
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import PAGE_HELPERS_JS, ROOT, run_browser_script
from tests.fixtures.commands import command, run, wait_final, wait_status
from tests.fixtures.netfakes import LocalSite, ThreadedServer, UpstreamHttpProxy
from tests.fixtures.processes import free_port
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD as LOGIN_PASSWORD
from tests.test_login import add_user
from tests.test_panel import admin  # noqa: F401
from xray.health import HealthResult

USER, PASSWORD = "hc-user", "health-Pa55word-LMN"  # the `upstream` fixture demands these
CREATE_PROXY = """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
  proxy { id } userErrors { field message code } } }"""
UPDATE_PROXY = """mutation($input: UpdateProxyInput!) { updateProxy(input: $input) {
  proxy { id } userErrors { message } } }"""
CHECK = """mutation($id: ID!) { checkProxy(id: $id) { proxy { id } userErrors { message } } }"""
HEALTH = """query($id: ID!, $last: Int) { node(id: $id) { ... on Proxy {
  consecutiveFailures flagged nextCheckAt
  checks(last: $last) { checkedAt ok latencyMs exitIp error trigger } } } }"""
FETCH = "curl -sS --max-time 10 --proxy {{ proxy.url }} {{ params.url }}"


@pytest.fixture
def settings_update() -> dict[str, Any]:
    """More settings for one test (parametrize it to override)."""
    return {}


@pytest.fixture
def settings(settings: Settings, site: LocalSite, settings_update: dict[str, Any]) -> Settings:
    return settings.model_copy(
        update={
            "proxy_check_url": f"{site.url}/ip",
            "kill_grace_seconds": 0.5,
            "proxy_check_interval": 1.0,
            **settings_update,
        }
    )


async def create_proxy(gql: GraphQLClient, **fields: Any) -> str:
    data = await gql(CREATE_PROXY, input={"protocol": "http", "host": "127.0.0.1", **fields})
    assert data["createProxy"]["userErrors"] == []
    return str(data["createProxy"]["proxy"]["id"])


async def health(gql: GraphQLClient, proxy_id: str, last: int = 10) -> dict[str, Any]:
    node: dict[str, Any] = (await gql(HEALTH, id=proxy_id, last=last))["node"]
    return node


async def eventually(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float = 20.0
) -> Any:
    """`probe()` again until `done` says yes (fails with the last answer after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await probe()
        if done(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {answer}")
        await asyncio.sleep(0.1)


async def test_scheduled_checks_record_history(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(
        gql, name="good", port=upstream.port, username=USER, password=PASSWORD
    )
    fresh = await health(gql, proxy_id)
    assert fresh["checks"] == []  # a new proxy is first checked one interval later
    seen = await eventually(lambda: health(gql, proxy_id), lambda h: len(h["checks"]) >= 2)
    for check in seen["checks"]:
        assert check["ok"] is True, check
        assert check["trigger"] == "SCHEDULE"
        assert check["exitIp"] == "127.0.0.1"
        assert check["latencyMs"] > 0
    newest, older = seen["checks"][:2]
    assert newest["checkedAt"] > older["checkedAt"]  # newest first
    assert seen["consecutiveFailures"] == 0
    assert seen["flagged"] is False
    assert seen["nextCheckAt"] is not None
    assert all(request.path == "/ip" for request in site.requests)
    assert (await gql(CHECK, id=proxy_id))["checkProxy"]["userErrors"] == []
    # (a scheduled check that was under way may land after it)
    manual = await health(gql, proxy_id, last=3)
    assert "MANUAL" in [check["trigger"] for check in manual["checks"]]


async def test_dead_upstream_is_flagged_after_n_failures(gql: GraphQLClient) -> None:
    port = free_port()
    proxy_id = await create_proxy(gql, name="dead", port=port)
    samples: list[tuple[int, bool]] = []

    async def sample() -> dict[str, Any]:
        answer = await health(gql, proxy_id)
        samples.append((answer["consecutiveFailures"], answer["flagged"]))
        return answer

    flagged = await eventually(sample, lambda h: h["flagged"], timeout=30)
    assert all(is_flagged == (failures >= 3) for failures, is_flagged in samples), samples
    assert any(0 < failures < 3 for failures, _ in samples), samples  # seen before the flag
    assert flagged["consecutiveFailures"] >= 3
    latest = flagged["checks"][0]
    assert latest["ok"] is False
    assert latest["trigger"] == "SCHEDULE"
    assert latest["error"].startswith(f"upstream proxy 'dead' (127.0.0.1:{port}) is unreachable")


async def test_checks_argument_is_bounded(gql: GraphQLClient) -> None:
    proxy_id = await create_proxy(gql, name="bounded", port=free_port())
    answer = await gql.raw(HEALTH, id=proxy_id, last=PROXY_CHECKS_KEPT + 1)
    assert answer["errors"][0]["message"].startswith(
        f"last must be between 1 and {PROXY_CHECKS_KEPT}"
    )


async def test_history_is_pruned_to_the_last_n(app: Starlette) -> None:
    sessions = app.state.services.sessionmaker
    async with sessions() as session:
        proxy = Proxy(name="busy", protocol="http", host="127.0.0.1", port=1, settings={})
        session.add(proxy)
        await session.flush()
        for number in range(PROXY_CHECKS_KEPT + 5):
            result = HealthResult(ok=number % 2 == 0, error=None if number % 2 == 0 else "x")
            await add_check(session, proxy, result, CheckTrigger.MANUAL, utcnow())
        await session.commit()
        kept = await session.scalar(select(func.count()).select_from(ProxyCheck))
        first_kept = await session.scalar(select(func.min(ProxyCheck.id)))
    assert kept == PROXY_CHECKS_KEPT
    assert first_kept == 6  # the five oldest went


def test_hold_reasons_follow_chains() -> None:
    flagged = [FlaggedProxy(1, "exit", 3, "upstream proxy 'exit' is unreachable")]
    # 2 is dialed via 1, 3 via 2: both reach the flagged hop; 4 is on its own.
    held = held_proxies(flagged, [(2, 1), (3, 2), (5, 4)])
    reason = (
        "proxy 'exit' failed its last 3 checks (latest: upstream proxy 'exit' is "
        "unreachable); held until a check passes"
    )
    assert held == {1: reason, 2: reason, 3: reason}
    assert held_proxies([], [(2, 1)]) == {}


HOLD = {
    "hold_on_flagged_proxy": True,
    "proxy_flag_after": 2,
    "proxy_check_interval": 0.5,
    # On PostgreSQL the runner never looks by itself: the passing check must wake it.
    "claim_poll_seconds": 600.0,
}


@pytest.mark.parametrize("settings_update", [HOLD], ids=["hold"])
async def test_hold_policy_waits_on_a_flagged_proxy_then_runs(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    dead = free_port()
    proxy_id = await create_proxy(gql, name="flaky", port=dead, username=USER, password=PASSWORD)
    await eventually(lambda: health(gql, proxy_id), lambda h: h["flagged"])
    held_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    waiting = await wait_status(gql, held_id, {"WAITING"})
    assert waiting["waitReason"].startswith("proxy 'flaky' failed its last "), waiting
    assert (
        f"(latest: upstream proxy 'flaky' (127.0.0.1:{dead}) is unreachable"
        in (waiting["waitReason"])
    )
    assert waiting["waitReason"].endswith("; held until a check passes")
    assert waiting["attempts"] == 0  # held, not started and failed
    # Other commands are not blocked behind it.
    plain = await run(gql, commandString="echo beside")
    assert (await wait_final(gql, plain))["status"] == "SUCCEEDED"
    assert (await command(gql, held_id))["status"] == "WAITING"
    # The upstream comes back (here: the proxy is pointed at a live one); the next
    # scheduled check passes and the held command starts by itself.
    answer = await gql(UPDATE_PROXY, input={"id": proxy_id, "port": upstream.port})
    assert answer["updateProxy"]["userErrors"] == []
    final = await wait_final(gql, held_id, timeout=30)
    assert final["status"] == "SUCCEEDED", final
    assert final["waitReason"] is None
    recovered = await health(gql, proxy_id)
    assert recovered["flagged"] is False
    assert recovered["checks"][0]["ok"] is True


HOLD_MANUAL = {**HOLD, "proxy_check_interval": 3600.0}  # no scheduled check in the test


@pytest.mark.parametrize("settings_update", [HOLD_MANUAL], ids=["hold-manual"])
async def test_a_passing_manual_check_starts_what_was_held(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    """`checkProxy` from the API (no schedule) wakes the runners too: on PostgreSQL, with
    the claim loop's safety net at 600 s, the held command starts within seconds."""
    dead = free_port()
    proxy_id = await create_proxy(gql, name="manual", port=dead, username=USER, password=PASSWORD)
    for _ in range(2):  # proxy_flag_after
        assert (await gql(CHECK, id=proxy_id))["checkProxy"]["userErrors"] == []
    assert (await health(gql, proxy_id))["flagged"] is True
    held_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    assert (await wait_status(gql, held_id, {"WAITING"}))["attempts"] == 0
    answer = await gql(UPDATE_PROXY, input={"id": proxy_id, "port": upstream.port})
    assert answer["updateProxy"]["userErrors"] == []
    assert (await command(gql, held_id))["status"] == "WAITING"  # nothing checked it yet
    assert (await gql(CHECK, id=proxy_id))["checkProxy"]["userErrors"] == []
    final = await wait_final(gql, held_id, timeout=20)
    assert final["status"] == "SUCCEEDED", final


# --- the schedule itself, without the app: two runners on one database ---------------------


async def _add_proxies(
    sessions: async_sessionmaker[AsyncSession], ports: list[int], *, due: bool
) -> list[int]:
    async with sessions() as session:
        rows = [
            Proxy(name=f"p{index}", protocol="http", host="127.0.0.1", port=port, settings={})
            for index, port in enumerate(ports)
        ]
        session.add_all(rows)
        await session.flush()
        if due:
            await session.execute(
                update(Proxy).values(next_check_at=utcnow() - timedelta(seconds=1))
            )
        await session.commit()
        return [row.id for row in rows]


async def _checks_per_proxy(sessions: async_sessionmaker[AsyncSession]) -> dict[int, int]:
    async with sessions() as session:
        rows = await session.execute(
            select(ProxyCheck.proxy_id, func.count()).group_by(ProxyCheck.proxy_id)
        )
        return {proxy_id: count for proxy_id, count in rows.all()}


async def test_two_runners_never_run_one_due_check_twice(settings: Settings) -> None:
    """Two schedules with engines of their own (as two runner processes have) on one database:
    every due check runs exactly once."""
    settings = settings.model_copy(
        update={"proxy_check_interval": 3600.0, "proxy_check_concurrency": 3}
    )
    engines = [create_engine(settings), create_engine(settings)]
    box = load_secret_box(settings)
    schedules = [ProxyCheckSchedule(settings, create_sessionmaker(e), box) for e in engines]
    try:
        sessions = schedules[0].sessionmaker
        ids = await _add_proxies(sessions, [free_port() for _ in range(12)], due=True)
        for schedule in schedules:
            schedule.start()
        await eventually(lambda: _checks_per_proxy(sessions), lambda c: len(c) == len(ids))
        await asyncio.sleep(1.0)  # time for a second check of one, were it to happen
        assert await _checks_per_proxy(sessions) == dict.fromkeys(ids, 1)
    finally:
        for schedule in schedules:
            await schedule.stop()
        for engine in engines:
            await engine.dispose()


def _sidecars_of_this_process() -> list[int]:
    """PIDs of v2ray/xray processes whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and (b"v2ray" in cmdline or b"xray" in cmdline):
            found.append(int(entry.name))
    return found


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(65536):  # takes the CONNECT and never answers it
        pass
    writer.close()


async def test_schedule_stops_cleanly_during_a_check(settings: Settings) -> None:
    stalled = ThreadedServer(_never_answers).start()
    engine = create_engine(settings)
    schedule = ProxyCheckSchedule(
        settings.model_copy(update={"proxy_check_interval": 3600.0}),
        create_sessionmaker(engine),
        load_secret_box(settings),
    )
    try:
        await _add_proxies(schedule.sessionmaker, [stalled.port], due=True)
        schedule.start()
        # The check is under way: its pre-flight probe (or sidecar) waits on the stalled upstream.
        await eventually(lambda: asyncio.sleep(0, dict(schedule.running)), bool, 15)
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await schedule.stop()
        assert time.monotonic() - began < 5
        assert _sidecars_of_this_process() == []
        assert schedule.running == {}
        assert await _checks_per_proxy(schedule.sessionmaker) == {}  # nothing half-recorded
    finally:
        await schedule.stop()
        await engine.dispose()
        stalled.stop()


def test_interval_never_turns_the_schedule_off() -> None:
    off = Settings(proxy_check_interval="never")
    assert off.proxy_check_interval == 0
    assert ProxyCheckSchedule(off, None, None).enabled is False  # type: ignore[arg-type]


# --- the panel ------------------------------------------------------------------------------


async def _proxy_with_history(app: Starlette, name: str, failures: int) -> int:
    """A proxy (never due in these tests) with one passing check, then `failures` failed ones."""
    async with app.state.services.sessionmaker() as session:
        proxy = Proxy(name=name, protocol="http", host="127.0.0.1", port=1, settings={})
        proxy.next_check_at = utcnow() + timedelta(hours=1)
        session.add(proxy)
        await session.flush()
        passing = HealthResult(ok=True, latency_ms=42.4, exit_ip="203.0.113.9")
        await add_check(session, proxy, passing, CheckTrigger.SCHEDULE, utcnow())
        failing = HealthResult(
            ok=False, error=f"upstream proxy {name!r} (127.0.0.1:1) is unreachable: refused"
        )
        for _ in range(failures):
            await add_check(session, proxy, failing, CheckTrigger.SCHEDULE, utcnow())
        proxy.health_ok, proxy.health_error = failing.ok, failing.error
        proxy.health_checked_at = utcnow()
        await session.commit()
        return proxy.id


async def test_panel_shows_history_and_flag(app: Starlette, admin: Any) -> None:  # noqa: F811
    flagged = await _proxy_with_history(app, "down-hop", failures=3)
    shaky = await _proxy_with_history(app, "shaky", failures=2)
    page = (await admin.get(f"/proxies/{flagged}")).text
    history = page.split('id="proxy-history"')[1].split("</section>")[0]
    assert "Health history" in history
    assert history.count("<tr>") == 1 + 4  # the head, then the four checks
    assert "42 ms" in history
    assert "<code>203.0.113.9</code>" in history
    assert "is unreachable: refused" in history
    assert 'status-flagged">flagged<' in page
    assert 'status-flagged">flagged<' not in (await admin.get(f"/proxies/{shaky}")).text
    listing = (await admin.get("/proxies")).text
    assert listing.count('status-flagged">flagged<') == 1
    assert 'status-flagged">flagged<' in listing.split(">down-hop<")[1].split("</tr>")[0]


HISTORY_SCRIPT = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
(async () => {
  const [base, chromiumPath, shots, proxyId] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-gpu'],
  });
  const found = { errors: [], violations: [], overflow: {} };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    /*PAGE_HELPERS*/
    await page.goto(`${base}/proxies/${proxyId}`);
    await page.locator('input[name="name"]').fill(process.env.CORRAL_USER);
    await page.locator('input[name="password"]').fill(process.env.CORRAL_PASSWORD);
    await page.locator('button[type="submit"]').click();
    await page.locator('#proxy-history').waitFor({ timeout: 20000 });
    for (const [width, name] of [[1280, 'proxy-history'], [390, 'proxy-history-phone']]) {
      await page.setViewportSize({ width, height: 900 });
      found.overflow[width] = await page.evaluate(
        () => document.documentElement.scrollWidth - window.innerWidth);
      await shoot(name);
    }
    found.history = await page.locator('#proxy-history').innerText();
    await page.goto(`${base}/proxies`);
    await shoot('proxies-flagged-phone');
    found.listing = await page.locator('#proxies-table').innerText();
    found.violations.push(...await page.evaluate(() => window.__violations));
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(found));
})().catch((error) => { console.error(error); process.exit(1); });
""".replace("/*PAGE_HELPERS*/", PAGE_HELPERS_JS)


async def test_history_in_chromium(settings: Settings, tmp_path: Path, backend: str) -> None:
    """The history table and the flag in real Chromium, at 1280 and 390 px wide, with no
    sideways scrolling. Screenshots in test-artifacts/<backend>/."""
    script = tmp_path / "history.cjs"
    script.write_text(HISTORY_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "hazel", "admin")
        proxy_id = await _proxy_with_history(live.app, "exit-de-frankfurt-01", failures=3)
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            str(proxy_id),
            user="hazel",
            password=LOGIN_PASSWORD,
        )
    assert found["errors"] == []
    assert found["violations"] == []
    assert found["overflow"] == {"1280": 0, "390": 0}
    assert "flagged" in found["history"]
    assert "203.0.113.9" in found["history"]
    assert "flagged" in found["listing"]
