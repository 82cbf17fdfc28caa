"""A database outage during fan-out, tried as an attacker would (adversarial testing): 54
followers of a running command (SSE, commandLogBatches, commandLogs), then PostgreSQL goes
away for a few seconds (a TCP forwarder cut: connections closed, new ones refused) and
comes back. Every follower ends with every line once, in order, or with a clear error; the
server answers /healthz all along, logs no error and no flood of warnings, does not spin,
and the command finishes with nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from server import streams
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.test_streams import sse_events, stream_path
from tests.test_walls_logstore import Forwarder, pk

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
PER_KIND = 18  # followers of each kind: 54 in all
OUTAGE_SECONDS = 4.0
FOLLOW_TIMEOUT = 60.0
# Prints a numbered line every 10 ms until the flag file exists (in its own directory).
TICKER = (
    "import os, time\n"
    "i = 0\n"
    "while not os.path.exists('stop'):\n"
    "    i += 1\n"
    "    print(f'line {i}', flush=True)\n"
    "    time.sleep(0.01)\n"
    "print('done', i)\n"
)
LOGS = """subscription($id: ID!) { commandLogs(commandId: $id) { seq text } }"""
BATCHES = """subscription($id: ID!) {
  commandLogBatches(commandId: $id) { lines { seq text } final } }"""


@dataclass
class Follower:
    """What one follower received: the seqs in order, and how it ended."""

    kind: str
    seqs: list[int] = field(default_factory=list)
    ended: str = ""  # "complete", or the error it ended with
    connected: asyncio.Event = field(default_factory=asyncio.Event)


async def follow_sse(
    live: LiveServer, command_id: str, seen: Follower, last_event_id: str | None = None
) -> None:
    headers = live.headers | ({} if last_event_id is None else {"Last-Event-ID": last_event_id})
    async with (
        httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=FOLLOW_TIMEOUT) as http,
        http.stream("GET", stream_path(command_id)) as response,
    ):
        assert response.status_code == 200
        async for event in sse_events(response):
            if event.event == "log":
                seen.seqs.append(json.loads(event.data)["seq"])
            elif event.event == "status" and json.loads(event.data).get("final"):
                seen.ended = "complete"
    if not seen.ended:
        seen.ended = "closed without its final status"


async def follow_ws(
    live: LiveServer,
    command_id: str,
    query: str,
    seen: Follower,
    subscribe: asyncio.Event | None = None,
) -> None:
    """`subscribe`: connected, it waits for this before it subscribes."""
    async with connect(
        live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=10
    ) as ws:
        await ws.send(json.dumps(connection_init(live.app)))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        seen.connected.set()
        if subscribe is not None:
            await subscribe.wait()
        payload = {"query": query, "variables": {"id": command_id}}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "ping":
                await ws.send(json.dumps({"type": "pong"}))
            elif message["type"] == "complete":
                seen.ended = seen.ended or "complete"
                return
            elif message["type"] == "error" or "errors" in message.get("payload", {}):
                seen.ended = json.dumps(message["payload"])
            else:
                data = message["payload"]["data"]
                if "commandLogs" in data:
                    seen.seqs.append(data["commandLogs"]["seq"])
                else:
                    seen.seqs += [line["seq"] for line in data["commandLogBatches"]["lines"]]
    seen.ended = seen.ended or "closed without complete"


async def healthz_latencies(live: LiveServer, until: asyncio.Event) -> list[float]:
    """How long each /healthz took, asked every 100 ms until `until` is set."""
    took: list[float] = []
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as http:
        while not until.is_set():
            began = time.monotonic()
            response = await http.get("/healthz")
            assert response.status_code == 200
            took.append(time.monotonic() - began)
            await asyncio.sleep(0.1)
    return took


@pytest.fixture
async def forwarder(settings: Settings) -> AsyncIterator[Forwarder]:
    url = make_url(settings.database_url or "")
    proxy = Forwarder(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def run_ticker(api: GraphQLClient) -> str:
    created = await api(
        """mutation($input: RunCommandInput!) { runCommand(input: $input) {
          command { id } userErrors { message } } }""",
        input={"commandString": "python3 -c {{ params.code }}", "params": {"code": TICKER}},
    )
    command_id: str = created["runCommand"]["command"]["id"]
    await wait_status(api, command_id, {"RUNNING"})
    return command_id


def start_followers(live: LiveServer, command_id: str) -> list[tuple[Follower, asyncio.Task[None]]]:
    """PER_KIND followers of each kind, reading as fast as lines come."""
    started = []
    for kind in ("sse", "logs", "batches"):
        for _ in range(PER_KIND):
            seen = Follower(kind)
            if kind == "sse":
                reading = follow_sse(live, command_id, seen)
            else:
                reading = follow_ws(live, command_id, LOGS if kind == "logs" else BATCHES, seen)
            started.append((seen, asyncio.create_task(reading)))
    return started


async def until_all_read(followers: list[tuple[Follower, asyncio.Task[None]]]) -> None:
    """Until every follower got lines (and none has ended)."""
    deadline = time.monotonic() + FOLLOW_TIMEOUT
    while not all(seen.seqs for seen, _ in followers):
        assert time.monotonic() < deadline, "not every follower got lines"
        ended = [seen for seen, task in followers if task.done()]
        assert not ended, ended
        await asyncio.sleep(0.05)


def stop_ticker(live: LiveServer, command_id: str) -> None:
    (live.app.state.services.settings.commands_dir / str(pk(command_id)) / "stop").touch()


async def stored_seqs(api: GraphQLClient, command_id: str) -> list[int]:
    found = await api(
        """query($id: ID!) { node(id: $id) { ... on Command { linesLost
          logs(first: 100000) { seq } } } }""",
        id=command_id,
    )
    assert found["node"]["linesLost"] == 0
    return [line["seq"] for line in found["node"]["logs"]]


def proxied_settings(settings: Settings, forwarder: Forwarder) -> Settings:
    url = make_url(settings.database_url or "").set(host="127.0.0.1", port=forwarder.port)
    return settings.model_copy(
        update={
            "database_url": url.render_as_string(hide_password=False),
            "max_subscribers": 200,
            "max_subscribers_per_client": 200,
        }
    )


@contextlib.asynccontextmanager
async def fanned_out(
    settings: Settings, forwarder: Forwarder
) -> AsyncIterator[
    tuple[LiveServer, httpx.AsyncClient, str, list[tuple[Follower, asyncio.Task[None]]]]
]:
    """A server whose database is behind `forwarder`, running the ticker, every follower
    reading it: (the server, a client of it, the command, the followers)."""
    async with (
        running_server(proxied_settings(settings, forwarder)) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        command_id = await run_ticker(GraphQLClient(http))
        followers = start_followers(live, command_id)
        await until_all_read(followers)
        yield live, http, command_id, followers


@ON_POSTGRES
async def test_followers_ride_out_a_database_outage_during_fan_out(
    settings: Settings, forwarder: Forwarder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral")
    async with fanned_out(settings, forwarder) as (live, http, command_id, followers):
        api = GraphQLClient(http)

        done = asyncio.Event()
        health = asyncio.create_task(healthz_latencies(live, done))
        # One more subscribes during the outage on a socket it opened before: it waits for
        # the database, then follows too.
        late, join = Follower("logs"), asyncio.Event()
        reading = follow_ws(live, command_id, LOGS, late, join)
        followers.append((late, asyncio.create_task(reading)))
        await asyncio.wait_for(late.connected.wait(), FOLLOW_TIMEOUT)
        linked = len(forwarder.links)
        cpu_before = time.process_time()
        forwarder.cut()
        await asyncio.sleep(0.5)
        join.set()
        await asyncio.sleep(OUTAGE_SECONDS - 0.5)
        cpu_during = time.process_time() - cpu_before
        received_in_outage = max(len(seen.seqs) for seen, _ in followers)
        forwarder.restore()
        await asyncio.sleep(2)  # the runner stores what waited; followers get it
        stop_ticker(live, command_id)
        node = await wait_status(api, command_id, FINAL, timeout=FOLLOW_TIMEOUT)
        async with asyncio.timeout(FOLLOW_TIMEOUT):
            await asyncio.gather(*(task for _, task in followers))
        done.set()
        latencies = await health
        seqs = await stored_seqs(api, command_id)
    assert node["status"] == "SUCCEEDED"
    # The outage happened: pooled connections were cut, the runner had to hold lines, and
    # lines were printed after it (stored once the database was back).
    assert linked >= 3, linked
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("cannot store to the database") for m in messages)
    assert len(seqs) > received_in_outage + 100
    # Every follower, the late one too: every line once, in order, then the end.
    for seen, _ in followers:
        assert seen.ended == "complete", (seen.kind, seen.ended)
        assert seen.seqs == seqs, (seen.kind, len(seen.seqs), len(seqs))
    assert max(latencies) < 2.0, max(latencies)  # /healthz answered all along
    assert len(latencies) >= OUTAGE_SECONDS * 2  # asked all along (fewer on a loaded host)
    assert cpu_during < 0.6 * OUTAGE_SECONDS, cpu_during  # nobody spun while waiting
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 5, warnings  # the broker's and the runner's, not one a follower


@ON_POSTGRES
async def test_an_outage_longer_than_followers_wait_ends_them_with_a_clear_error(
    settings: Settings,
    forwarder: Forwarder,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past OUTAGE_SECONDS a GraphQL follower ends with an error that says what to do, an
    SSE follower's stream ends cleanly (no final status: it reconnects with Last-Event-ID
    and resumes without gap or duplicate); a stream asked for meanwhile is a 503."""
    monkeypatch.setattr(streams, "OUTAGE_SECONDS", 1.0)
    caplog.set_level(logging.INFO, logger="corral")
    async with fanned_out(settings, forwarder) as (live, http, command_id, followers):
        api = GraphQLClient(http)
        forwarder.cut()
        async with asyncio.timeout(FOLLOW_TIMEOUT):
            await asyncio.gather(*(task for _, task in followers))
        refused = await http.get(stream_path(command_id))
        query = await http.post("/graphql", json={"query": "{ me { name } }"})
        forwarder.restore()
        # The SSE followers resume where they were, as an EventSource would.
        resumed = []
        for seen, _ in followers:
            if seen.kind == "sse":
                again = Follower("sse", list(seen.seqs))
                resumed.append(again)
        stop_ticker(live, command_id)
        await asyncio.gather(
            *(follow_sse(live, command_id, again, str(again.seqs[-1])) for again in resumed)
        )
        seqs = await stored_seqs(api, command_id)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "5"
    assert refused.text.startswith("the database is unreachable"), refused.text
    assert query.status_code == 503, query.text
    assert query.json()["errors"][0]["extensions"]["code"] == "UNAVAILABLE"
    for seen, _ in followers:
        if seen.kind == "sse":
            assert seen.ended == "closed without its final status", seen.ended
            continue
        error = json.loads(seen.ended)
        assert error["errors"][0]["extensions"]["code"] == "UNAVAILABLE", error
        message = error["errors"][0]["message"]
        assert message.startswith("the database is unreachable: this log stream ends"), message
        assert f"after seq {seen.seqs[-1]} " in message  # where to resume
        assert seen.seqs == list(range(1, len(seen.seqs) + 1))
    for again in resumed:
        assert again.ended == "complete"
        assert again.seqs == seqs
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 5, warnings
