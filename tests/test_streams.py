"""Following commands live: SSE, GraphQL subscriptions, the broker, and /metrics.

These run a real uvicorn (tests/fixtures/servers.py) so the clients are the real ones: an
SSE client that parses the stream itself, and `websockets` speaking graphql-transport-ws.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
import httpx_sse
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from graphql_schema.relay import decode_id, encode_id
from server.broker import DEFAULT_QUEUE_SIZE, Broker, StatusChange, command_topic
from server.logstream import encode_log_events
from server.messages import LineRun, StoredBatch
from server.metrics import Metrics
from server.models import Command, LogLine, utcnow
from server.settings import Settings
from server.streams import FinalStatus, follow_command
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.commands import FINAL, command, wait_status
from tests.fixtures.servers import LiveServer, running_server

STREAM_TIMEOUT = 30.0
FIFTY_LINES = "sh -c 'for i in $(seq 1 50); do echo line $i; sleep 0.01; done'"
# Lines of 400 bytes: ~10 MB of SSE, more than any socket buffer can take for a client that
# does not read (loopback send buffers grow to a few MB).
FLOOD_LINES = 20_000
FLOOD_WIDTH = 400
FLOOD = f"python3 -c \"[print(str(i).rjust({FLOOD_WIDTH}, '.')) for i in range({FLOOD_LINES})]\""

RUN = """
mutation($input: RunCommandInput!) {
  runCommand(input: $input) { command { id status } userErrors { field message code } }
}"""
CANCEL = """
mutation($id: ID!) { cancelCommand(id: $id) { command { status } userErrors { message } } }"""
LOGS = """
query($id: ID!) { node(id: $id) { ... on Command { logs { seq attempt stream text } } } }"""
COMMAND_LOGS = """
subscription($id: ID!, $after: Int) {
  commandLogs(commandId: $id, afterSeq: $after) { seq attempt stream ts text }
}"""
COMMAND_EVENTS = """
subscription($id: ID) { commandEvents(commandId: $id) { status command { id } } }"""


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveServer]:
    """A real uvicorn serving the app (embedded runner included) on a free port."""
    async with running_server(settings) as server:
        yield server


@pytest.fixture
async def http(live: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
    ) as client:
        yield client


@pytest.fixture
def api(http: httpx.AsyncClient) -> GraphQLClient:
    return GraphQLClient(http)


# -- commands ----------------------------------------------------------------------------


async def run_command(api: GraphQLClient, command_string: str) -> str:
    """Queue an ad-hoc command; its GraphQL ID."""
    data = await api(RUN, input={"commandString": command_string})
    payload = data["runCommand"]
    assert payload["userErrors"] == [], payload["userErrors"]
    return str(payload["command"]["id"])


async def stored_logs(api: GraphQLClient, command_id: str) -> list[dict[str, Any]]:
    logs: list[dict[str, Any]] = (await api(LOGS, id=command_id))["node"]["logs"]
    return logs


def pk(command_id: str) -> int:
    decoded = decode_id(command_id)
    assert decoded is not None
    assert decoded[0] == "Command"
    return decoded[1]


async def stored_count(live: LiveServer, command_id: str) -> int:
    """Log lines stored for the command, counted in the database itself."""
    async with live.app.state.services.sessionmaker() as session:
        stmt = select(func.count()).where(LogLine.command_id == pk(command_id))
        return int(await session.scalar(stmt) or 0)


def run_seconds(node: dict[str, Any]) -> float:
    started = datetime.fromisoformat(node["startedAt"])
    finished = datetime.fromisoformat(node["finishedAt"])
    return (finished - started).total_seconds()


# -- SSE client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_events(response: httpx.Response) -> AsyncGenerator[SseEvent]:
    """Events of an SSE body as the EventSource spec frames them (comments skipped)."""
    event, data, event_id = "message", list[str](), None
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield SseEvent(event, "\n".join(data), event_id)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def stream_path(command_id: str) -> str:
    return f"/api/commands/{command_id}/logs/stream"


async def read_sse(
    http: httpx.AsyncClient,
    command_id: str,
    last_event_id: str | None = None,
    stop_at_seq: int | None = None,
) -> list[SseEvent]:
    """Every event until the server ends the stream (or until log `stop_at_seq`: hang up)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events: list[SseEvent] = []
    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        http.stream("GET", stream_path(command_id), headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async with contextlib.aclosing(sse_events(response)) as stream:
            async for event in stream:
                events.append(event)
                if (
                    stop_at_seq is not None
                    and event.event == "log"
                    and log_seq(event) >= stop_at_seq
                ):
                    break
    return events


def log_seq(event: SseEvent) -> int:
    assert event.id is not None, event
    seq = int(event.id)
    assert event.json()["seq"] == seq, event
    return seq


def log_seqs(events: list[SseEvent]) -> list[int]:
    return [log_seq(e) for e in events if e.event == "log"]


def log_data(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [e.json() for e in events if e.event == "log"]


def assert_ends_final(events: list[SseEvent], status: str = "SUCCEEDED") -> None:
    """The stream ends with its one final `status` event (no other names a final status)."""
    assert events, "the stream sent nothing"
    last = events[-1]
    assert last.event == "status", last
    assert last.json() == {"status": status, "final": True}
    statuses = [e.json()["status"] for e in events if e.event == "status"]
    assert [s for s in statuses if s in FINAL] == [status], statuses


# -- graphql-transport-ws client ----------------------------------------------------------


class GraphQLSocket:
    """A graphql-transport-ws client over a `websockets` connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, live: LiveServer) -> AsyncIterator[GraphQLSocket]:
        async with connect(
            live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=10
        ) as ws:
            assert ws.subprotocol == "graphql-transport-ws"
            socket_ = cls(ws)
            await socket_.send(connection_init(live.app))
            assert await socket_.receive() == {"type": "connection_ack"}
            yield socket_

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        """The next message other than a ping (answered with a pong)."""
        while True:
            async with asyncio.timeout(STREAM_TIMEOUT):
                message: dict[str, Any] = json.loads(await self.ws.recv())
            if message["type"] == "ping":
                await self.send({"type": "pong"})
                continue
            return message

    async def subscribe(self, sub_id: str, query: str, **variables: Any) -> None:
        await self.send(
            {"id": sub_id, "type": "subscribe", "payload": {"query": query, "variables": variables}}
        )

    async def until_complete(self, sub_id: str) -> list[dict[str, Any]]:
        """The `next` payloads' data of subscription `sub_id`, up to its `complete`."""
        results: list[dict[str, Any]] = []
        while True:
            message = await self.receive()
            assert message.get("id") == sub_id, message
            if message["type"] == "complete":
                return results
            assert message["type"] == "next", message
            assert "errors" not in message["payload"], message
            results.append(message["payload"]["data"])


# -- metrics ---------------------------------------------------------------------------------


async def scrape(http: httpx.AsyncClient) -> tuple[str, dict[tuple[str, tuple[Any, ...]], float]]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    return response.text, samples


async def subscribers_connected(http: httpx.AsyncClient) -> float:
    _text, samples = await scrape(http)
    return samples[("corral_subscribers_connected", ())]


async def wait_subscribers(http: httpx.AsyncClient, expected: float, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (seen := await subscribers_connected(http)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"corral_subscribers_connected is {seen}, expected {expected}")
        await asyncio.sleep(0.05)


# -- SSE ---------------------------------------------------------------------------------------


async def test_sse_streams_every_line_and_the_statuses_then_ends(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    command_id = await run_command(api, FIFTY_LINES)

    events = await read_sse(http, command_id)

    assert_ends_final(events)
    assert {e.event for e in events} == {"log", "status"}
    statuses = [e.json()["status"] for e in events if e.event == "status"]
    assert set(statuses) <= {"QUEUED", "RUNNING", "SUCCEEDED"}
    lines = log_data(events)
    for line in lines:
        assert set(line) == {"seq", "attempt", "stream", "ts", "text"}
        assert line["attempt"] == 1
        assert datetime.fromisoformat(line["ts"]).tzinfo is not None
    assert log_seqs(events) == list(range(1, len(lines) + 1))
    stdout = [line["text"] for line in lines if line["stream"] == "STDOUT"]
    assert stdout == [f"line {i}" for i in range(1, 51)]
    assert {line["stream"] for line in lines} == {"STDOUT", "SYSTEM"}
    # The stream carried exactly what was stored.
    stored = await stored_logs(api, command_id)
    assert [(s["seq"], s["text"]) for s in stored] == [(d["seq"], d["text"]) for d in lines]


async def test_sse_resumes_after_last_event_id_without_gap_or_duplicate(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    command_id = await run_command(
        api, "sh -c 'for i in $(seq 1 60); do echo line $i; sleep 0.02; done'"
    )
    first = await read_sse(http, command_id, stop_at_seq=10)
    seen = log_seqs(first)
    assert seen == list(range(1, seen[-1] + 1))

    rest = await read_sse(http, command_id, last_event_id=str(seen[-1]))

    resumed = log_seqs(rest)
    assert resumed[0] == seen[-1] + 1
    assert seen + resumed == list(range(1, resumed[-1] + 1))
    assert_ends_final(rest)
    stdout = [d["text"] for d in log_data(first) + log_data(rest) if d["stream"] == "STDOUT"]
    assert stdout == [f"line {i}" for i in range(1, 61)]

    # Resuming at the very end of a finished command: nothing more will come, 204 (API.md).
    after_end = await http.get(stream_path(command_id), headers={"Last-Event-ID": str(resumed[-1])})
    assert after_end.status_code == 204


async def test_replay_then_live_has_no_gap_or_duplicate_at_the_seam(
    api: GraphQLClient, http: httpx.AsyncClient, live: LiveServer
) -> None:
    command_id = await run_command(
        api, "sh -c 'for i in $(seq 1 120); do echo line $i; sleep 0.02; done'"
    )
    joined_at: list[int] = []
    readers: list[asyncio.Task[list[SseEvent]]] = []
    deadline = time.monotonic() + STREAM_TIMEOUT
    # Subscribers join while the command runs: each replays what is stored, then goes live.
    for threshold in (5, 30, 60):
        while (count := await stored_count(live, command_id)) < threshold:
            assert time.monotonic() < deadline, f"only {count} lines stored"
            await asyncio.sleep(0.01)
        joined_at.append(count)
        readers.append(asyncio.create_task(read_sse(http, command_id)))

    results = await asyncio.gather(*readers)

    total = await stored_count(live, command_id)
    assert joined_at[-1] < total, "the command ended before the last subscriber joined"
    for events in results:
        assert log_seqs(events) == list(range(1, total + 1))
        assert_ends_final(events)


async def test_sse_of_a_cancelled_command_ends_with_cancelled(settings: Settings) -> None:
    # One slot: the second command stays queued behind the first.
    async with (
        running_server(settings, max_concurrency=1) as live,
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http,
    ):
        api = GraphQLClient(http)
        running = await run_command(api, "sh -c 'echo started; sleep 30'")
        await wait_status(api, running, {"RUNNING"})
        queued = await run_command(api, "echo never")
        assert (await command(api, queued))["status"] == "QUEUED"
        streams = {
            command_id: asyncio.create_task(read_sse(http, command_id))
            for command_id in (running, queued)
        }
        await wait_subscribers(http, 2)

        for command_id in (queued, running):
            payload = (await api(CANCEL, id=command_id))["cancelCommand"]
            assert payload["userErrors"] == []
        queued_events, running_events = await streams[queued], await streams[running]

        assert log_seqs(queued_events) == []
        assert_ends_final(queued_events, "CANCELLED")
        assert_ends_final(running_events, "CANCELLED")
        lines = log_data(running_events)
        assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
        assert [line["text"] for line in lines if line["stream"] == "STDOUT"] == ["started"]
        assert len(lines) == len(await stored_logs(api, running))


# -- GraphQL subscriptions over graphql-transport-ws --------------------------------------


async def test_command_logs_subscription_replays_after_seq_then_live_and_completes(
    api: GraphQLClient, live: LiveServer
) -> None:
    command_id = await run_command(
        api, "sh -c 'for i in $(seq 1 30); do echo line $i; sleep 0.01; done'"
    )
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("live", COMMAND_LOGS, id=command_id, after=3)
        lines = [r["commandLogs"] for r in await ws.until_complete("live")]

        assert (await command(api, command_id))["status"] == "SUCCEEDED"
        seqs = [line["seq"] for line in lines]
        assert seqs == list(range(4, seqs[-1] + 1))
        # seq 1 is the runner's "attempt 1 of 1" line, so seq 4 is "line 3".
        assert [line["text"] for line in lines if line["stream"] == "STDOUT"] == [
            f"line {i}" for i in range(3, 31)
        ]
        assert lines[-1]["stream"] == "SYSTEM"
        assert all(line["attempt"] == 1 for line in lines)

        # Once the command is final, a new subscription replays everything and completes.
        await ws.subscribe("replay", COMMAND_LOGS, id=command_id)
        replay = [r["commandLogs"] for r in await ws.until_complete("replay")]
        assert [line["seq"] for line in replay] == list(range(1, seqs[-1] + 1))
        assert replay[3:] == lines


@pytest.mark.parametrize(
    ("query", "given"),
    [
        (COMMAND_LOGS, encode_id("Command", 424242)),
        (COMMAND_EVENTS, encode_id("Command", 424242)),
        (COMMAND_LOGS, "ghp_Pasted0Token0Where0An0Id0Goes0aaaa"),  # never quoted back
        (COMMAND_EVENTS, "ghp_Pasted0Token0Where0An0Id0Goes0aaaa"),
    ],
    ids=["logs-unknown", "events-unknown", "logs-not-an-id", "events-not-an-id"],
)
async def test_command_logs_subscription_of_an_unknown_command_is_an_error(
    live: LiveServer, query: str, given: str
) -> None:
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("missing", query, id=given)
        message = await ws.receive()
        assert message["id"] == "missing", message
        # graphql-transport-ws allows either: an `error`, or a `next` with errors and then
        # a `complete` (an error raised while executing).
        if message["type"] == "next":
            errors = message["payload"]["errors"]
            assert await ws.receive() == {"id": "missing", "type": "complete"}
        else:
            assert message["type"] == "error", message
            errors = message["payload"]
        assert "no such command" in errors[0]["message"]
        assert "ghp_" not in json.dumps(errors)


async def test_stopped_or_dropped_subscriptions_are_released(
    api: GraphQLClient, http: httpx.AsyncClient, live: LiveServer
) -> None:
    command_id = await run_command(api, "sh -c 'echo started; sleep 30'")
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
        first = await ws.receive()
        assert first["type"] == "next", first
        assert first["payload"]["data"]["commandLogs"]["seq"] == 1
        await ws.send({"id": "logs", "type": "complete"})
        await wait_subscribers(http, 0)

        await ws.subscribe("again", COMMAND_LOGS, id=command_id)
        await ws.subscribe("events", COMMAND_EVENTS, id=command_id)
        await wait_subscribers(http, 2)
    # The socket went away without completing them.
    await wait_subscribers(http, 0)
    assert live.app.state.services.broker._subscribers.get(command_topic(pk(command_id))) is None

    await api(CANCEL, id=command_id)
    assert (await wait_status(api, command_id, FINAL))["status"] == "CANCELLED"


async def test_command_events_subscription_yields_running_then_succeeded(
    settings: Settings,
) -> None:
    # One slot: the command waits in the queue behind a blocker until we subscribed.
    async with (
        running_server(settings, max_concurrency=1) as live,
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http,
    ):
        api = GraphQLClient(http)
        blocker = await run_command(api, "sleep 30")
        await wait_status(api, blocker, {"RUNNING"})
        command_id = await run_command(api, "sh -c 'echo one; sleep 0.1; echo two'")
        assert (await command(api, command_id))["status"] == "QUEUED"

        async with GraphQLSocket.open(live) as ws:
            await ws.subscribe("one", COMMAND_EVENTS, id=command_id)
            await ws.subscribe("all", COMMAND_EVENTS)
            await wait_subscribers(http, 2)
            cancelled = await api(CANCEL, id=blocker)
            assert cancelled["cancelCommand"]["userErrors"] == []

            events: dict[str, list[tuple[str, str]]] = {"one": [], "all": []}
            completed: set[str] = set()
            while "one" not in completed or len(events["all"]) < 3:
                message = await ws.receive()
                if message["type"] == "complete":
                    completed.add(message["id"])
                    continue
                assert message["type"] == "next", message
                event = message["payload"]["data"]["commandEvents"]
                events[message["id"]].append((event["command"]["id"], event["status"]))
            await ws.send({"id": "all", "type": "complete"})

            # One command's events: its status when subscribed first, then its changes,
            # complete after the final one (API.md); all commands': changes only.
            assert events["one"] == [
                (command_id, "QUEUED"),
                (command_id, "RUNNING"),
                (command_id, "SUCCEEDED"),
            ]
            assert completed == {"one"}
            assert events["all"] == [
                (blocker, "CANCELLED"),
                (command_id, "RUNNING"),
                (command_id, "SUCCEEDED"),
            ]
            await wait_subscribers(http, 0)


async def test_a_standard_sse_client_gets_retry_one_final_status_and_204_after_the_end(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    """httpx-sse reads the stream as an EventSource would: `retry:` first, lines with
    `stream` as GraphQL spells it, one final status whose id is the last seq; reconnecting
    from there (what an EventSource does after the end) is answered 204, so it stops."""
    command_id = await run_command(api, "sh -c 'echo out; echo err >&2'")
    await wait_status(api, command_id, FINAL)

    async with (
        asyncio.timeout(STREAM_TIMEOUT),
        httpx_sse.aconnect_sse(http, "GET", stream_path(command_id)) as source,
    ):
        events = [event async for event in source.aiter_sse()]
    assert events[0].retry is not None, events[0]
    assert events[0].retry > 0
    logs = [event for event in events if event.event == "log"]
    assert {event.json()["stream"] for event in logs} == {"STDOUT", "STDERR", "SYSTEM"}
    assert [event.id for event in logs] == [str(i) for i in range(1, len(logs) + 1)]
    statuses = [event for event in events if event.event == "status"]
    assert [event.json() for event in statuses] == [{"status": "SUCCEEDED", "final": True}]
    assert events[-1] is statuses[0]
    assert statuses[0].id == logs[-1].id

    again = await http.get(stream_path(command_id), headers={"Last-Event-ID": logs[-1].id})
    assert again.status_code == 204, again.text
    earlier = await http.get(stream_path(command_id), headers={"Last-Event-ID": logs[-2].id})
    assert earlier.status_code == 200  # a line is still to come: replayed, then the end
    assert earlier.text.count("event: log") == 1
    assert earlier.text.count("event: status") == 1


async def test_a_reconnect_to_a_running_command_is_not_204(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    command_id = await run_command(api, "sleep 30")
    await wait_status(api, command_id, {"RUNNING"})
    async with http.stream(
        "GET", stream_path(command_id), headers={"Last-Event-ID": "999"}
    ) as response:
        assert response.status_code == 200
    await api(CANCEL, id=command_id)
    await wait_status(api, command_id, FINAL)


async def test_command_events_after_the_end_sends_the_final_status_and_completes(
    api: GraphQLClient, live: LiveServer
) -> None:
    """A subscriber that joins after runCommand (here: after the command ended) still gets
    the command's current status first, and the subscription completes (API.md)."""
    command_id = await run_command(api, "echo done")
    await wait_status(api, command_id, FINAL)
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("late", COMMAND_EVENTS, id=command_id)
        results = await ws.until_complete("late")
    assert results == [{"commandEvents": {"status": "SUCCEEDED", "command": {"id": command_id}}}]


# -- slow subscribers ----------------------------------------------------------------------


async def test_a_subscriber_that_never_reads_slows_neither_the_runner_nor_the_others(
    api: GraphQLClient, http: httpx.AsyncClient, live: LiveServer
) -> None:
    baseline_id = await run_command(api, FLOOD)
    baseline = run_seconds(await wait_status(api, baseline_id, FINAL))

    command_id = await run_command(api, FLOOD)
    async with (
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as stalled_client,
        stalled_client.stream("GET", stream_path(command_id)) as stalled,
    ):
        assert stalled.status_code == 200  # and never read: the socket buffers fill up

        events = await read_sse(http, command_id)

        node = await wait_status(api, command_id, FINAL)
        assert node["status"] == "SUCCEEDED"
        total = FLOOD_LINES + 2  # with the runner's first and last SYSTEM lines
        assert log_seqs(events) == list(range(1, total + 1))
        stdout = [d["text"] for d in log_data(events) if d["stream"] == "STDOUT"]
        assert stdout == [str(i).rjust(FLOOD_WIDTH, ".") for i in range(FLOOD_LINES)]
        assert_ends_final(events)
        assert await stored_count(live, command_id) == total
        # Generous: a stalled client must not make the run take several times longer.
        assert run_seconds(node) <= 3 * baseline + 5, (run_seconds(node), baseline)

        # The stalled subscriber holds no more than its bounded queue. (Whether it also had
        # to lag depends on how much the loopback socket buffers absorbed: several MB here.
        # Lagging itself is tested on the broker directly below.)
        broker: Broker = live.app.state.services.broker
        held = broker._subscribers.get(command_topic(pk(command_id)), set())
        assert len(held) == 1, "the stalled subscriber is not subscribed any more"
        (subscription,) = held
        assert subscription.held_bytes <= subscription.max_bytes
        assert len(subscription.queue) <= subscription.max_size == DEFAULT_QUEUE_SIZE
    # Hanging up releases it.
    await wait_subscribers(http, 0)


async def test_broker_marks_an_overflowing_subscriber_lagged_and_spares_the_others() -> None:
    broker = Broker()
    topic = command_topic(1)
    total = DEFAULT_QUEUE_SIZE * 3
    async with (
        broker.subscribe(topic) as stalled,
        broker.subscribe(topic) as reader,
        broker.subscribe(command_topic(2)) as elsewhere,
    ):
        received: list[Any] = []

        async def read() -> None:
            while len(received) < total:
                received.append(await reader.get())

        reading = asyncio.create_task(read())
        for i in range(total):
            broker.publish(topic, i)
            assert len(stalled.queue) <= stalled.max_size == DEFAULT_QUEUE_SIZE
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the reader drain its queue
        async with asyncio.timeout(5):
            await reading

        assert received == list(range(total))
        assert not reader.lagged
        assert stalled.lagged
        assert len(stalled.queue) == 0  # what it could not take was dropped, not kept
        async with asyncio.timeout(1):
            assert await stalled.get() is None
        assert not elsewhere.queue
        assert not elsewhere.lagged

        # After a resync (and a re-read from the database) it receives again.
        stalled.resync()
        broker.publish(topic, "next")
        async with asyncio.timeout(1):
            assert await stalled.get() == "next"
            assert await reader.get() == "next"
    assert broker.subscriber_count == 0


class Line(NamedTuple):
    command_id: int
    seq: int
    attempt: int
    stream: str
    ts: datetime
    text: str


async def store_lines(
    sessionmaker: async_sessionmaker[AsyncSession], command_id: int, seqs: range
) -> list[Line]:
    """Commit lines the way the log writer does (before they are published)."""
    lines = [Line(command_id, seq, 1, "stdout", utcnow(), f"line {seq}") for seq in seqs]
    async with sessionmaker() as session, session.begin():
        session.add_all(LogLine(**line._asdict()) for line in lines)
    return lines


async def lines_one_by_one(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """follow_command yields batches of lines; these tests look at single lines."""
    async for item in items:
        if isinstance(item, StoredBatch):
            for run in item.runs:
                for seq, text in enumerate(run.texts, run.first_seq):
                    yield Line(item.command_id, seq, run.attempt, run.stream, run.ts, text)
        else:
            yield item


def one(line: Line) -> StoredBatch:
    """A published batch of one line."""
    return StoredBatch(
        line.command_id, [LineRun(line.attempt, line.stream, line.ts, line.seq, [line.text])]
    )


async def test_follow_command_delivers_each_line_once_across_replay_live_gaps_and_lag(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    broker, metrics = Broker(), Metrics()
    async with sessionmaker() as session, session.begin():
        row = Command(source="x", argv=["x"], status="RUNNING")
        session.add(row)
    command_id = row.id
    topic = command_topic(command_id)
    await store_lines(sessionmaker, command_id, range(1, 6))
    follower = lines_one_by_one(follow_command(sessionmaker, broker, command_id, 0, metrics))
    received: list[Line | StatusChange | FinalStatus] = []

    async def take(count: int) -> list[Any]:
        async with asyncio.timeout(10):
            for _ in range(count):
                received.append(await anext(follower))
        return [item.seq if isinstance(item, Line) else item for item in received[-count:]]

    # Replay has begun (subscribed, lines 1-5 read). Lines 4-5, committed before that read,
    # are published only now, together with line 6: the seam.
    assert await take(1) == [1]
    assert metrics.registry.get_sample_value("corral_subscribers_connected") == 1
    line_6 = await store_lines(sessionmaker, command_id, range(6, 7))
    lines_4_5 = [Line(command_id, seq, 1, "stdout", utcnow(), f"line {seq}") for seq in (4, 5)]
    for line in [*lines_4_5, *line_6]:
        broker.publish(topic, one(line))
    # The replay stops where the queued live batches take over (line 6 comes live).
    assert await take(6) == [2, 3, 4, 5, StatusChange(command_id, "RUNNING"), 6]

    # Live: the published copies of 4-6 are dropped, line 7 comes from the broker.
    for line in await store_lines(sessionmaker, command_id, range(7, 8)):
        broker.publish(topic, one(line))
    assert await take(1) == [7]

    # A line whose publication was missed (8) is re-read when the next one (9) shows the gap.
    lines_8_9 = await store_lines(sessionmaker, command_id, range(8, 10))
    broker.publish(topic, one(lines_8_9[1]))
    assert await take(2) == [8, 9]

    # More than a queue's worth published at once: the follower lags and re-reads them.
    burst = range(10, 10 + DEFAULT_QUEUE_SIZE + 100)
    for line in await store_lines(sessionmaker, command_id, burst):
        broker.publish(topic, one(line))
    assert await take(len(burst)) == list(burst)

    # The final line, then the final status: the stream ends.
    last = burst[-1] + 1
    for line in await store_lines(sessionmaker, command_id, range(last, last + 1)):
        broker.publish(topic, one(line))
    async with sessionmaker() as session, session.begin():
        await session.execute(
            update(Command).where(Command.id == command_id).values(status="SUCCEEDED")
        )
    broker.publish_status(command_id, "SUCCEEDED")
    items = await take(1)
    while not isinstance(received[-1], FinalStatus):
        items += await take(1)
    assert [i for i in items if not isinstance(i, StatusChange)] == [
        last,
        FinalStatus("SUCCEEDED"),
    ]
    seqs = [item.seq for item in received if isinstance(item, Line)]
    assert seqs == list(range(1, last + 1))
    assert received[-2] == StatusChange(command_id, "SUCCEEDED")
    with pytest.raises(StopAsyncIteration):
        await anext(follower)
    assert broker.subscriber_count == 0
    assert metrics.registry.get_sample_value("corral_subscribers_connected") == 0


# -- errors --------------------------------------------------------------------------------


MALFORMED_IDS = [
    encode_id("Command", 424242),
    encode_id("Profile", 1),
    "not-an-id",
    "Q29tbWFuZDo",  # truncated base64
    encode_id("Command", 2**31),  # beyond any primary key
]
NON_NUMERIC_LAST_EVENT_IDS = ["abc", "-1", "1.5", "0x10", "1e3"]
# Digits to str.isdigit(), not to int(): superscripts (sent as latin-1 header bytes).
NON_ASCII_DIGIT_LAST_EVENT_IDS = ["\u00b2", "1\u00b3"]
# Well-formed numbers that no seq can reach (seqs are 32-bit on both databases).
OUT_OF_RANGE_LAST_EVENT_IDS = [str(2**31), "9" * 40]


async def test_sse_for_an_unknown_or_malformed_command_id_is_404(
    http: httpx.AsyncClient,
) -> None:
    codes = {
        command_id: (await http.get(stream_path(command_id))).status_code
        for command_id in MALFORMED_IDS
    }
    assert codes == dict.fromkeys(MALFORMED_IDS, 404)


async def last_event_id_codes(
    api: GraphQLClient, http: httpx.AsyncClient, last_event_ids: list[str]
) -> dict[str, int | str]:
    """The status code of a stream request with each Last-Event-ID (or the transport error)."""
    command_id = await run_command(api, "true")
    await wait_status(api, command_id, FINAL)
    codes: dict[str, int | str] = {}
    for last_event_id in last_event_ids:
        try:
            response = await http.get(
                stream_path(command_id), headers={b"Last-Event-ID": last_event_id.encode("latin-1")}
            )
            codes[last_event_id] = response.status_code
        except httpx.TransportError as exc:  # the server broke off the response
            codes[last_event_id] = repr(exc)
    return codes


async def test_sse_with_a_non_numeric_last_event_id_is_400(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    codes = await last_event_id_codes(api, http, NON_NUMERIC_LAST_EVENT_IDS)
    assert codes == dict.fromkeys(NON_NUMERIC_LAST_EVENT_IDS, 400)


async def test_sse_with_a_non_ascii_digit_last_event_id_is_400_not_500(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    codes = await last_event_id_codes(api, http, NON_ASCII_DIGIT_LAST_EVENT_IDS)
    assert codes == dict.fromkeys(NON_ASCII_DIGIT_LAST_EVENT_IDS, 400)


async def test_sse_with_a_last_event_id_beyond_any_seq_is_400_not_a_broken_stream(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    codes = await last_event_id_codes(api, http, OUT_OF_RANGE_LAST_EVENT_IDS)
    assert codes == dict.fromkeys(OUT_OF_RANGE_LAST_EVENT_IDS, 400)


# -- metrics -------------------------------------------------------------------------------


async def test_metrics_count_commands_lines_and_connected_subscribers(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    done = await run_command(api, "echo hello")
    assert (await wait_status(api, done, FINAL))["status"] == "SUCCEEDED"

    text, samples = await scrape(http)
    assert 'corral_commands{status="SUCCEEDED"} 1.0' in text.splitlines()
    assert samples[("corral_log_lines_ingested_total", ())] >= len(await stored_logs(api, done))
    assert samples[("corral_subscribers_connected", ())] == 0

    running = await run_command(api, "sleep 30")
    await wait_status(api, running, {"RUNNING"})
    async with http.stream("GET", stream_path(running)) as response:
        assert response.status_code == 200
        await wait_subscribers(http, 1)
    await wait_subscribers(http, 0)

    await api(CANCEL, id=running)
    assert (await wait_status(api, running, FINAL))["status"] == "CANCELLED"
    text, _samples = await scrape(http)
    assert 'corral_commands{status="CANCELLED"} 1.0' in text.splitlines()


async def test_metrics_speak_openmetrics_with_every_status_process_and_http_series(
    api: GraphQLClient, http: httpx.AsyncClient
) -> None:
    done = await run_command(api, "echo hello")
    await wait_status(api, done, FINAL)
    async with http.stream("GET", stream_path(done)) as response:
        await response.aread()

    response = await http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(response.text)}  # a strict parser
    by_status = {s.labels["status"]: s.value for s in families["corral_commands"].samples}
    assert by_status == {
        "QUEUED": 0,
        "WAITING": 0,
        "RUNNING": 0,
        "SUCCEEDED": 1,
        "FAILED": 0,
        "TIMED_OUT": 0,
        "CANCELLED": 0,
    }
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= set(families)
    requests = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in families["corral_http_requests"].samples
        if s.name == "corral_http_requests_total"
    }
    assert requests[("POST", "/graphql", "200")] >= 2
    assert requests[("GET", "/api/commands/{command_id}/logs/stream", "200")] == 1
    assert "corral_http_request_seconds" in families

    plain, samples = await scrape(http)  # the Prometheus text format without Accept
    for text in (response.text, plain):
        created = [line for line in text.splitlines() if "_created" in line]
        assert created == []
    assert samples[("corral_commands", (("status", "WAITING"),))] == 0


async def test_a_subscriber_is_bounded_by_bytes_not_only_by_messages() -> None:
    broker = Broker(subscriber_max_bytes=1024 * 1024)
    topic = command_topic(1)
    async with broker.subscribe(topic) as stalled:
        batch = StoredBatch(1, [LineRun(1, "stdout", utcnow(), 1, ["x" * 1000] * 100)])
        assert 100_000 < batch.nbytes < 110_000  # its lines' memory, overheads included
        fits = stalled.max_bytes // batch.nbytes
        for _ in range(fits):
            broker.publish(topic, batch)
        assert not stalled.lagged
        assert stalled.held_bytes == fits * batch.nbytes
        broker.publish(topic, batch)  # more bytes than it may hold
        assert stalled.lagged
        assert stalled.held_bytes == 0
        assert len(stalled.queue) == 0  # what it held is let go: memory stays bounded
        assert await stalled.get() is None


async def test_the_message_being_delivered_counts_until_the_next_is_asked_for() -> None:
    broker = Broker(subscriber_max_bytes=1024 * 1024)
    topic = command_topic(1)
    batch = StoredBatch(1, [LineRun(1, "stdout", utcnow(), 1, ["x" * 1000] * 400)])
    async with broker.subscribe(topic) as slow:
        broker.publish(topic, batch)
        assert await slow.get() is batch  # being sent to a slow client: still held
        broker.publish(topic, batch)
        assert not slow.lagged
        broker.publish(topic, batch)  # a third would pass the bound with the one in hand
        assert slow.lagged
        assert slow.held_bytes == batch.nbytes
        assert await slow.get() is None
        assert slow.held_bytes == 0


def test_sse_batches_carry_each_line_as_its_json() -> None:
    # encode_log_events writes the JSON out itself from a template per run of lines.
    stamp, other = utcnow(), datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    texts = ['quote " back \\ slash', "tab\tcr\rnul\x00", "é ✓ 😀 \u2028", "", "{} %s {0}"]
    runs = [
        LineRun(2, "stdout", stamp, 1, texts[:2]),
        LineRun(2, "stderr", stamp, 3, texts[2:3]),
        LineRun(3, "stdout", other, 4, texts[3:]),
    ]
    expected = [
        (seq, {"seq": seq, "attempt": attempt, "stream": stream, "ts": ts.isoformat(), "text": t})
        for seq, attempt, stream, ts, t in [
            (1, 2, "STDOUT", stamp, texts[0]),  # spelled as GraphQL's LogStream
            (2, 2, "STDOUT", stamp, texts[1]),
            (3, 2, "STDERR", stamp, texts[2]),
            (4, 3, "STDOUT", other, texts[3]),
            (5, 3, "STDOUT", other, texts[4]),
        ]
    ]
    events = encode_log_events(StoredBatch(7, runs)).decode("ascii").split("\r\n\r\n")
    assert events[-1] == ""
    decoded = []
    for event in events[:-1]:
        kind, ident, data = event.split("\r\n")
        assert kind == "event: log"
        decoded.append((int(ident.removeprefix("id: ")), json.loads(data.removeprefix("data: "))))
    assert decoded == expected


def test_a_batch_past_a_seq_keeps_only_the_later_lines() -> None:
    stamp = utcnow()
    batch = StoredBatch(
        1, [LineRun(1, "stdout", stamp, 1, ["a", "b", "c"]), LineRun(1, "stderr", stamp, 4, ["d"])]
    )
    assert batch.after(0) == batch
    assert batch.after(2).runs == [
        LineRun(1, "stdout", stamp, 3, ["c"]),
        LineRun(1, "stderr", stamp, 4, ["d"]),
    ]
    assert batch.after(3).runs == [LineRun(1, "stderr", stamp, 4, ["d"])]
    assert batch.after(4).runs == []
    assert batch.weight == 4
    assert batch.after(2).weight == 2
