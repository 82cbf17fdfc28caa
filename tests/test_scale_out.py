"""Scale-out (issue 14): several API nodes and `corral runner` processes on one PostgreSQL.

- 1,000 commands submitted through two API nodes (one in this process, one a `corral serve`
  process) run exactly once each on four `corral runner` processes: one claim (attempt)
  each, one "attempt" line each in the stored log, one side effect each, none lost.
- Followers on an API node that is restarted mid-stream (SSE with `Last-Event-ID`, and the
  `commandLogBatches` subscription with `afterSeq`) of a command that a runner process runs
  behind another node get every line once: no gap, no duplicate at either seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from server.broker import CANCEL_TOPIC, QUEUE_TOPIC
from server.db import create_engine
from server.models import Command, CommandStatus, LogLine
from server.pgbroker import PgBroker
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.nodes import ApiNodeProcess, api_node_process
from tests.fixtures.runners import runner_process
from tests.fixtures.servers import LiveServer
from tests.test_pgbroker import api_node, db_value, run, status_of, stored_lines
from tests.test_streams import GraphQLSocket, SseEvent, pk, scrape, sse_events, stream_path

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
COMMANDS = 1000
RUNNERS = 4
PER_REQUEST = 25  # runCommand mutations per request (aliases; the limit is 30)
SUBMITTERS = 8  # requests in flight at once, over both nodes
DRAIN_SECONDS = 120.0
RECONNECT_SECONDS = 60.0
BATCHES = """subscription($id: ID!, $after: Int) {
  commandLogBatches(commandId: $id, afterSeq: $after) { lines { seq stream text } final }
}"""


def run_many(count: int) -> str:
    """One mutation of `count` aliased runCommand calls with the same input."""
    fields = " ".join(
        f"c{i}: runCommand(input: $input) {{ command {{ id }} userErrors {{ message }} }}"
        for i in range(count)
    )
    return f"mutation($input: RunCommandInput!) {{ {fields} }}"


@contextlib.asynccontextmanager
async def runner_processes(
    settings: Settings, tmp_path: Path, count: int
) -> AsyncIterator[list[Any]]:
    """`count` `corral runner` processes (named r1, r2, ...) started side by side."""
    async with contextlib.AsyncExitStack() as stack:
        entering = [
            stack.enter_async_context(
                runner_process(settings, tmp_path / f"r{n}", "--name", f"r{n}")
            )
            for n in range(1, count + 1)
        ]
        for folder in range(1, count + 1):
            (tmp_path / f"r{folder}").mkdir()
        # All entered before any failure is raised, so the stack stops every one started.
        started = await asyncio.gather(*entering, return_exceptions=True)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield started


async def submit(nodes: list[GraphQLClient], command_string: str, total: int) -> list[str]:
    """`total` commands, in requests of PER_REQUEST sent to the nodes in turn, SUBMITTERS
    requests at a time; the ids the nodes gave."""
    requests = [min(PER_REQUEST, total - start) for start in range(0, total, PER_REQUEST)]
    gate = asyncio.Semaphore(SUBMITTERS)

    async def one(index: int, count: int) -> list[str]:
        async with gate:
            data = await nodes[index % len(nodes)](
                run_many(count), input={"commandString": command_string}
            )
        payloads = [data[f"c{i}"] for i in range(count)]
        assert all(p["userErrors"] == [] for p in payloads), payloads
        return [str(p["command"]["id"]) for p in payloads]

    batches = await asyncio.gather(*(one(i, n) for i, n in enumerate(requests)))
    return [command_id for batch in batches for command_id in batch]


async def wait_all_final(live: LiveServer, ids: list[int]) -> None:
    final = [s.value for s in CommandStatus if s.is_final]
    statement = select(func.count()).where(Command.id.in_(ids), Command.status.in_(final))
    deadline = time.monotonic() + DRAIN_SECONDS
    while (done := await db_value(live, statement)) < len(ids):
        assert time.monotonic() < deadline, f"{done} of {len(ids)} final in {DRAIN_SECONDS}s"
        await asyncio.sleep(0.2)


@ON_POSTGRES
async def test_a_thousand_commands_through_two_api_nodes_run_once_each_on_four_runners(
    settings: Settings, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.txt"  # each run appends "<command id> <attempt> <runner pid>"
    command_string = f"sh -c 'echo $CORRAL_COMMAND_ID $CORRAL_ATTEMPT $PPID >> {effects}'"
    async with (
        api_node(settings) as (live, api_a),
        api_node_process(settings, tmp_path / "node-b") as node_b,
        httpx.AsyncClient(base_url=node_b.base_url, headers=live.headers, timeout=60) as http_b,
        runner_processes(settings, tmp_path, RUNNERS) as runners,
    ):
        ids = await submit([api_a, GraphQLClient(http_b)], command_string, COMMANDS)
        pks = [pk(command_id) for command_id in ids]
        await wait_all_final(live, pks)
        async with live.app.state.services.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(
                        Command.id,
                        Command.status,
                        Command.attempts,
                        Command.uncounted_attempts,
                        Command.error,
                    )
                )
            ).all()
            unsuccessful = [row.id for row in rows if row.status != CommandStatus.SUCCEEDED.value]
            # What went wrong is in the assertion's message (seen once in CI: 1 of 1000 FAILED).
            their_lines = (
                await session.execute(
                    select(LogLine.command_id, LogLine.stream, LogLine.text)
                    .where(LogLine.command_id.in_(unsuccessful))
                    .order_by(LogLine.command_id, LogLine.seq)
                )
            ).all()
            attempt_lines = dict(
                (
                    await session.execute(
                        select(LogLine.command_id, func.count())
                        .where(LogLine.stream == "system", LogLine.text.like("attempt %"))
                        .group_by(LogLine.command_id)
                    )
                ).all()
            )
        pids = {str(runner.pid) for runner in runners}
    assert len(set(pks)) == COMMANDS
    assert sorted(row.id for row in rows) == sorted(pks)  # none lost, none made up
    assert Counter(row.status for row in rows) == {CommandStatus.SUCCEEDED.value: COMMANDS}, (
        [row for row in rows if row.id in unsuccessful],
        their_lines[:50],
    )
    assert Counter((row.attempts, row.uncounted_attempts) for row in rows) == {(1, 0): COMMANDS}
    assert attempt_lines == dict.fromkeys(pks, 1)
    runs = [line.split() for line in effects.read_text().splitlines()]
    assert Counter((command, attempt) for command, attempt, _pid in runs) == Counter(
        (str(command_id), "1") for command_id in pks
    )
    used = Counter(pid for _command, _attempt, pid in runs)  # the runner is the child's parent
    assert set(used) == pids, used  # every runner took its share


# -- a follower across a restart of its API node ---------------------------------------------


class Follower:
    """A client that follows one command on a node, reconnecting (from the last seq it got)
    until the stream says it is final; `lines`: (seq, stream, text) in arrival order."""

    def __init__(self, node: ApiNodeProcess, headers: dict[str, str], command_id: str) -> None:
        self.node = node
        self.headers = headers
        self.command_id = command_id
        self.lines: list[tuple[int, str, str]] = []
        self.connections = 0
        self.final = False

    @property
    def last_seq(self) -> int:
        return self.lines[-1][0] if self.lines else 0

    async def follow(self) -> None:
        async with asyncio.timeout(RECONNECT_SECONDS * 2):
            while not self.final:
                try:
                    await self.connect_once()
                except (httpx.TransportError, OSError, ConnectionClosed):
                    await asyncio.sleep(0.05)  # the node is away: try again

    async def connect_once(self) -> None:
        raise NotImplementedError


class SseFollower(Follower):
    async def connect_once(self) -> None:
        headers = (
            {**self.headers, "Last-Event-ID": str(self.last_seq)} if self.lines else self.headers
        )
        async with (
            httpx.AsyncClient(base_url=self.node.base_url, headers=headers, timeout=30) as http,
            http.stream("GET", stream_path(self.command_id)) as response,
        ):
            assert response.status_code == 200, await response.aread()
            self.connections += 1
            async for event in sse_events(response):
                self.take(event)

    def take(self, event: SseEvent) -> None:
        data = event.json()
        if event.event == "log":
            self.lines.append((data["seq"], data["stream"], data["text"]))
        elif event.event == "status" and data.get("final"):
            self.final = True


class SubscriptionFollower(Follower):
    async def connect_once(self) -> None:
        async with connect(
            self.node.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=10
        ) as ws:
            socket = GraphQLSocket(ws)
            init = {"authorization": self.headers["Authorization"]}
            await socket.send({"type": "connection_init", "payload": init})
            assert await socket.receive() == {"type": "connection_ack"}
            after = self.last_seq if self.lines else None
            await socket.subscribe("logs", BATCHES, id=self.command_id, after=after)
            self.connections += 1
            while not self.final:
                message = await socket.receive()
                assert message["type"] == "next", message
                assert "errors" not in message["payload"], message
                batch = message["payload"]["data"]["commandLogBatches"]
                self.lines += [
                    (line["seq"], line["stream"], line["text"]) for line in batch["lines"]
                ]
                self.final = batch["final"]


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


@ON_POSTGRES
async def test_followers_on_a_restarted_api_node_resume_without_gap_or_duplicate(
    settings: Settings, tmp_path: Path
) -> None:
    """Node B takes the command, a runner process runs it, node A serves an SSE client and
    a commandLogBatches subscriber. A is stopped (SIGTERM) mid-stream and started again;
    both clients resume from their last seq and get every line once, with the live ones
    after the restart brought by NOTIFY (A's safety-net poll is a minute)."""
    go = tmp_path / "go"  # the command prints 50-line bursts until this file exists
    flood = f"sh -c 'i=1; while [ ! -e {go} ]; do seq $i $((i+49)); i=$((i+50)); sleep 0.02; done'"
    async with (
        api_node(settings) as (live_b, api_b),
        runner_process(settings, tmp_path),
        api_node_process(settings, tmp_path / "node-a", follow_poll_seconds="60") as node_a,
    ):
        command_id = await run(api_b, flood)
        followers = [
            SseFollower(node_a, live_b.headers, command_id),
            SubscriptionFollower(node_a, live_b.headers, command_id),
        ]
        following = [asyncio.create_task(f.follow()) for f in followers]
        try:
            await until(lambda: all(f.last_seq >= 300 for f in followers))
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            stopped = await node_a.stop(signal.SIGTERM)
            assert stopped in (0, -signal.SIGTERM), node_a.output()
            seen_before = [f.last_seq for f in followers]
            restarted_at = await db_value(live_b, stored_lines(command_id))
            await node_a.start()
            # Live lines well past what was stored when A came back: the replay seam, then
            # the live one.
            await until(lambda: all(f.last_seq >= restarted_at + 500 for f in followers))
            assert await db_value(live_b, status_of(command_id)) == CommandStatus.RUNNING.value
            go.touch()
            await asyncio.gather(*following)
        finally:
            for task in following:
                task.cancel()
        total = await db_value(live_b, stored_lines(command_id))
    assert [f.connections for f in followers] == [2, 2]
    assert all(seen < restarted_at for seen in seen_before), (seen_before, restarted_at)
    for follower in followers:
        seqs = [seq for seq, _stream, _text in follower.lines]
        assert seqs == list(range(1, total + 1))
        printed = [text for _seq, stream, text in follower.lines if stream == "STDOUT"]
        assert printed == [str(n) for n in range(1, len(printed) + 1)]
    assert json.dumps(followers[0].lines) == json.dumps(followers[1].lines)


@ON_POSTGRES
async def test_live_followers_read_each_statement_without_a_transaction(app: Any) -> None:
    """The stream sessions' reads send no BEGIN/ROLLBACK (a follower of another process's
    lines reads after each notification: one round trip instead of three). In autocommit
    each statement has its own now(); in a transaction they all share its start."""
    async with app.state.services.stream_sessions() as session:
        first = await session.scalar(text("SELECT now()"))
        await asyncio.sleep(0.01)
        second = await session.scalar(text("SELECT now()"))
    assert second > first


@ON_POSTGRES
async def test_metrics_count_the_broker_notifications_and_reconnects(
    app: Any, client: httpx.AsyncClient, settings: Settings
) -> None:
    """/metrics shows what the node's broker sent and heard, and its reconnects."""
    broker = app.state.services.broker
    assert isinstance(broker, PgBroker)
    engine = create_engine(settings)
    other = PgBroker(engine)  # another process's
    await other.start()
    try:
        broker.publish(QUEUE_TOPIC, None)
        other.publish(CANCEL_TOPIC, 7)
        other.publish(CANCEL_TOPIC, 8)
        await until(
            lambda: other.notifications_received >= 1 and broker.notifications_received >= 1
        )
    finally:
        await other.close()
        await engine.dispose()
    async with app.state.engine.connect() as connection:
        await connection.execute(
            text("SELECT pg_terminate_backend(:pid)"), {"pid": broker.backend_pid}
        )
    await until(lambda: broker.connections == 2 and broker.listening)
    _text, samples = await scrape(client)
    assert samples[("corral_broker_notifications_sent_total", ())] == broker.notifications_sent >= 1
    received = samples[("corral_broker_notifications_received_total", ())]
    assert received == broker.notifications_received >= 1
    assert samples[("corral_broker_reconnects_total", ())] == 1
