"""The PostgreSQL broker (server/pgbroker.py): API node and runner in separate processes.

An API node without a runner serves in this process (a real uvicorn); a real `corral runner`
process on the same database runs the commands. The followers' safety-net poll is set to a
minute, so every line and status that arrives within a second came by LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text

from server.broker import (
    CANCEL_TOPIC,
    QUEUE_TOPIC,
    SCHEDULE_TOPIC,
    SECRETS_TOPIC,
    STATUS_TOPIC,
    USAGE_TOPIC,
    LinesStored,
    StatusChange,
    UsageRecorded,
    command_topic,
    status_topic,
)
from server.db import create_engine
from server.messages import LineRun, StoredBatch
from server.models import Command, CommandStatus, LogLine
from server.pgbroker import CHANNEL, PAYLOAD_BYTES, PgBroker, connect_arguments, payloads
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.runners import runner_process
from tests.fixtures.servers import LiveServer, running_server
from tests.test_streams import COMMAND_LOGS, GraphQLSocket, log_seqs, pk, sse_events, stream_path

POLL = 60.0  # the safety net, out of the way
ARRIVAL_SECONDS = 1.0  # a line or a cancel crosses processes within this
ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
TOKEN = "ghp_pgbroker_token_that_must_never_travel_0123456789"
RUN = """
mutation($input: RunCommandInput!) {
  runCommand(input: $input) { command { id } userErrors { message } }
}"""
CANCEL = "mutation($id: ID!) { cancelCommand(id: $id) { userErrors { message } } }"


# -- pure parts ------------------------------------------------------------------------


def test_payloads_stay_under_the_limit_and_keep_every_entry_in_order() -> None:
    entries: list[list[Any]] = [["l", n, n * 1000] for n in range(3000)]
    texts = payloads(entries)
    assert len(texts) > 1
    assert all(len(t.encode()) <= PAYLOAD_BYTES for t in texts)
    assert [entry for t in texts for entry in json.loads(t)] == entries


# -- processes -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def api_node(settings: Settings) -> AsyncIterator[tuple[LiveServer, GraphQLClient]]:
    """An API node with no runner of its own, polling only once a minute."""
    async with (
        running_server(settings, embedded_runner=False, follow_poll_seconds=POLL) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        yield live, GraphQLClient(http)


async def run(api: GraphQLClient, command_string: str, **more: Any) -> str:
    data = await api(RUN, input={"commandString": command_string, **more})
    assert data["runCommand"]["userErrors"] == [], data
    return str(data["runCommand"]["command"]["id"])


async def db_value(live: LiveServer, statement: Any) -> Any:
    async with live.app.state.services.sessionmaker() as session:
        return await session.scalar(statement)


async def wait_until(live: LiveServer, statement: Any, done: Any, timeout: float = 20.0) -> Any:
    """Poll the database (the test's own watch, not Corral's) until `done(value)`."""
    deadline = time.monotonic() + timeout
    while not done(value := await db_value(live, statement)):
        assert time.monotonic() < deadline, f"still {value!r} after {timeout}s"
        await asyncio.sleep(0.02)
    return value


def stored_lines(command_id: str) -> Any:
    return select(func.count()).where(LogLine.command_id == pk(command_id))


def status_of(command_id: str) -> Any:
    return select(Command.status).where(Command.id == pk(command_id))


async def follow_sse(http: httpx.AsyncClient, command_id: str, delays: list[float]) -> list[Any]:
    """Every SSE event of the command's stream; `delays`: each line's arrival after its ts."""
    events = []
    async with asyncio.timeout(30), http.stream("GET", stream_path(command_id)) as response:
        assert response.status_code == 200
        async for event in sse_events(response):
            events.append(event)
            if event.event == "log":
                stamp = datetime.fromisoformat(event.json()["ts"])
                delays.append((datetime.now(UTC) - stamp).total_seconds())
    return events


@contextlib.asynccontextmanager
async def notifications(settings: Settings) -> AsyncIterator[list[str]]:
    """Every payload sent on Corral's channel while the block runs."""
    engine = create_engine(settings)
    seen: list[str] = []
    connection = await asyncpg.connect(**connect_arguments(engine))
    try:
        await connection.add_listener(CHANNEL, lambda *args: seen.append(args[3]))
        yield seen
    finally:
        await connection.close()
        await engine.dispose()


async def cancel_within_a_second(live: LiveServer, api: GraphQLClient) -> float:
    """Run `sleep 60` on the runner, cancel it through the API node: seconds until the
    runner recorded it CANCELLED (which it does once the process is gone)."""
    command_id = await run(api, "sleep 60")
    await wait_until(live, status_of(command_id), lambda s: s == CommandStatus.RUNNING.value)
    started = time.monotonic()
    assert (await api(CANCEL, id=command_id))["cancelCommand"]["userErrors"] == []
    await wait_until(live, status_of(command_id), lambda s: s == CommandStatus.CANCELLED.value)
    return time.monotonic() - started


# -- tests -----------------------------------------------------------------------------


@ON_POSTGRES
async def test_a_follower_on_the_api_node_gets_the_runner_process_lines_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    """SSE and a GraphQL subscription on node A, joining mid-run (replay, then live), see
    every line of a command run by another process once, each within a second of being
    written; no notification carries a line's text or the token in the command's env."""
    async with (
        notifications(settings) as payloads_seen,
        api_node(settings) as (live, api),
        runner_process(settings, tmp_path),
    ):
        service = await api(
            'mutation($t: String) { createService(input: {name: "gh", envVar: "GH_TOKEN", '
            "token: $t}) { service { id } } }",
            t=TOKEN,
        )
        command_id = await run(
            api,
            "sh -c 'echo token $GH_TOKEN; for i in $(seq 1 40); do echo marker-line $i; "
            "sleep 0.04; done'",
            serviceIds=[service["createService"]["service"]["id"]],
        )
        await wait_until(live, stored_lines(command_id), lambda n: n >= 5)
        delays: list[float] = []
        async with (
            httpx.AsyncClient(base_url=live.base_url, headers=live.headers) as http,
            GraphQLSocket.open(live) as ws,
        ):
            await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
            sse, results = await asyncio.gather(
                follow_sse(http, command_id, delays), ws.until_complete("logs")
            )
        total = await db_value(live, stored_lines(command_id))
    seqs = log_seqs(sse)
    assert seqs == list(range(1, total + 1))
    assert [r["commandLogs"]["seq"] for r in results] == seqs
    assert sse[-1].json() == {"status": "SUCCEEDED", "final": True}
    live_delays = delays[-20:]  # lines that came live, not from the replay
    assert max(live_delays) < ARRIVAL_SECONDS, live_delays
    wire = "".join(payloads_seen)
    assert f'["l",{pk(command_id)},' in wire
    assert TOKEN not in wire
    assert "marker-line" not in wire
    assert all(len(p.encode()) <= PAYLOAD_BYTES for p in payloads_seen)


@ON_POSTGRES
async def test_a_cancel_through_the_api_node_stops_the_runner_process_within_a_second(
    settings: Settings, tmp_path: Path
) -> None:
    async with api_node(settings) as (live, api), runner_process(settings, tmp_path):
        seconds = await cancel_within_a_second(live, api)
    assert seconds < ARRIVAL_SECONDS, seconds


@ON_POSTGRES
async def test_listen_connections_terminated_mid_flood_lose_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """pg_terminate_backend on every process's broker connection while a runner process
    floods lines: the follower on node A still gets every line once; afterwards a cancel
    through A still reaches the runner at once (both listen again)."""
    flood = "sh -c 'for i in $(seq 1 60); do seq 1 50; sleep 0.03; done'"
    async with api_node(settings) as (live, api), runner_process(settings, tmp_path):
        broker = live.app.state.services.broker
        assert isinstance(broker, PgBroker)
        assert broker.connections == 1
        command_id = await run(api, flood)
        async with httpx.AsyncClient(base_url=live.base_url, headers=live.headers) as http:
            following = asyncio.create_task(follow_sse(http, command_id, []))
            await wait_until(live, stored_lines(command_id), lambda n: n >= 300)
            terminated = await db_value(
                live,
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'corral-broker'"
                    " AND datname = current_database()"
                ),
            )
            assert await db_value(live, status_of(command_id)) == CommandStatus.RUNNING.value
            events = await following
        total = await db_value(live, stored_lines(command_id))
        assert terminated == 2  # node A's and the runner's
        assert total > 3000
        assert log_seqs(events) == list(range(1, total + 1))
        assert events[-1].json() == {"status": "SUCCEEDED", "final": True}
        assert broker.connections == 2
        assert broker.listening
        assert await cancel_within_a_second(live, api) < ARRIVAL_SECONDS


@pytest.fixture
async def brokers(settings: Settings) -> AsyncIterator[list[PgBroker]]:
    """Two started brokers on the test's database, as two processes have (two connections)."""
    engine = create_engine(settings)
    started = [PgBroker(engine), PgBroker(engine)]
    try:
        for broker in started:
            await broker.start()
        yield started
    finally:
        for broker in started:
            await broker.close()
        await engine.dispose()


@ON_POSTGRES
async def test_a_broker_hears_other_processes_once_and_never_itself_twice(
    brokers: list[PgBroker],
) -> None:
    async with (
        brokers[0].subscribe(QUEUE_TOPIC) as mine,
        brokers[1].subscribe(QUEUE_TOPIC) as theirs,
        brokers[1].subscribe(command_topic(5)) as lines,
    ):
        brokers[0].publish(QUEUE_TOPIC, 7)
        now = datetime.now(UTC)
        runs = [
            LineRun(1, "stdout", now, 1, ["a", "b", "c"]),
            LineRun(1, "stderr", now, 4, 6 * ["x"]),
        ]
        brokers[0].publish(command_topic(5), StoredBatch(5, runs))
        assert await asyncio.wait_for(theirs.get(), 5) == 7
        assert await asyncio.wait_for(lines.get(), 5) == LinesStored(5, 9)
        assert await mine.get() == 7
        await asyncio.sleep(0.3)  # its own notification has come back by now
        assert list(mine.waiting()) == list(theirs.waiting()) == []


@ON_POSTGRES
async def test_every_kind_of_message_crosses_to_the_other_process(
    brokers: list[PgBroker],
) -> None:
    """Status changes (on all three topics), cancels, secrets-changed, schedule wake-ups,
    usage recorded."""
    sent: list[tuple[str, Any]] = [
        (CANCEL_TOPIC, 3),
        (SECRETS_TOPIC, None),
        (SCHEDULE_TOPIC, None),
        (USAGE_TOPIC, UsageRecorded(4)),
    ]
    status = StatusChange(8, CommandStatus.RUNNING.value)
    topics = [t for t, _ in sent] + [STATUS_TOPIC, status_topic(8), command_topic(8)]
    async with contextlib.AsyncExitStack() as stack:
        heard = [await stack.enter_async_context(brokers[1].subscribe(t)) for t in topics]
        for topic, message in sent:
            brokers[0].publish(topic, message)
        brokers[0].publish_status(status.command_id, status.status)
        got = [await asyncio.wait_for(sub.get(), 5) for sub in heard]
    assert got == [message for _, message in sent] + [status, status, status]


@ON_POSTGRES
async def test_after_a_reconnect_subscribers_resync_and_what_waited_is_sent(
    settings: Settings, brokers: list[PgBroker]
) -> None:
    """The listener's backend is terminated: its subscribers are told to re-read (a lag:
    the supervisor claims and looks for cancels again, followers catch up by seq), and
    what a broker published while it had no connection reaches the others afterwards."""
    async with (
        brokers[0].subscribe(QUEUE_TOPIC) as wakeups,
        brokers[1].subscribe(CANCEL_TOPIC) as cancels,
    ):
        engine = create_engine(settings)
        async with engine.connect() as connection:
            await connection.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": brokers[0].backend_pid}
            )
            brokers[0].publish(CANCEL_TOPIC, 42)  # most likely before it noticed
        await engine.dispose()
        assert await asyncio.wait_for(cancels.get(), 10) == 42
        assert await asyncio.wait_for(wakeups.get(), 10) is None  # reconnected: re-read
        assert brokers[0].connections == 2
        assert list(cancels.waiting()) == []
