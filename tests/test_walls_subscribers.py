"""Walls (issue 10): live subscribers are bounded in number and, stalled, in memory.

A real uvicorn, real sockets: stalled clients subscribe (GraphQL over graphql-transport-ws
and SSE) to a command that floods, then never read again. The server's memory is measured
with tracemalloc (it runs in the test's own event loop); readers beside them must still get
every line. The limits refuse one subscriber more with a clear error and take one again
once another has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy import select
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from server.app_services import AppServices
from server.broker import Broker, command_topic
from server.messages import LineRun, StoredBatch
from server.models import ApiToken, Command, LogLine, utcnow
from server.settings import Settings
from server.stream_batches import pieces
from server.stream_pages import read_lines
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer, connection_init, issue_api_token
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.fixtures.stalled import StalledClient, stalled_event_stream, stalled_subscription
from tests.test_streams import (
    CANCEL,
    COMMAND_EVENTS,
    COMMAND_LOGS,
    STREAM_TIMEOUT,
    GraphQLSocket,
    SseEvent,
    log_data,
    log_seqs,
    pk,
    read_sse,
    run_command,
    sse_events,
    stream_path,
)

MiB = 1024 * 1024
STALLED = 50
STALLED_SOCKETS_EVERY = 5  # one stalled subscriber in 5 is a WebSocket, the others SSE
FLOOD_LINES = 6_000
# 2,000 characters of base64 a line: they hardly compress, so a stalled client's kernel
# buffers are full after a few MB (lines of dots compress 50-fold and would fit in whole).
FLOOD = (
    'python3 -c "import base64, os; '
    f'[print(base64.b64encode(os.urandom(1500)).decode()) for _ in range({FLOOD_LINES})]"'
)
# The issue's bound for one stalled subscriber (its server-side share of everything).
BOUND_PER_SUBSCRIBER = 2 * MiB
READ_TIMEOUT = 120.0
NO_PINGS = {"ws_ping_interval": None}  # uvicorn would close a stalled WebSocket after ~40 s


def services(live: LiveServer) -> AppServices:
    found: AppServices = live.app.state.services
    return found


def port(live: LiveServer) -> int:
    return int(live.base_url.rsplit(":", 1)[1])


async def stalled_follower(
    live: LiveServer, command_id: str, sse: bool, query: str
) -> StalledClient:
    """A follower of the command that never reads: an SSE stream, else a subscription."""
    if sse:
        return await stalled_event_stream(port(live), stream_path(command_id), live.headers)
    return await stalled_subscription(port(live), connection_init(live.app), query, id=command_id)


async def wait_for(condition: Any, what: str, within: float = STREAM_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stored_texts(live: LiveServer, command_id: str) -> list[str]:
    async with services(live).sessionmaker() as session:
        rows = await session.scalars(
            select(LogLine.text).where(LogLine.command_id == pk(command_id)).order_by(LogLine.seq)
        )
        return list(rows)


async def read_subscription(live: LiveServer, command_id: str) -> list[dict[str, Any]]:
    """Every line of a commandLogs subscription, read as fast as it comes."""
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
        return [data["commandLogs"] for data in await ws.until_complete("logs")]


async def read_events(http: httpx.AsyncClient, command_id: str) -> list[SseEvent]:
    """Every event of a command's SSE stream, read as fast as it comes, to its end."""
    async with (
        asyncio.timeout(READ_TIMEOUT),
        http.stream("GET", stream_path(command_id)) as response,
    ):
        assert response.status_code == 200
        return [event async for event in sse_events(response)]


# -- memory ------------------------------------------------------------------------------------


async def test_fifty_stalled_subscribers_stay_within_the_memory_bound_and_readers_get_all(
    settings: Settings,
) -> None:
    async with (
        running_server(
            settings,
            uvicorn_options=NO_PINGS,
            max_subscribers=200,
            max_subscribers_per_client=100,
        ) as live,
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http,
    ):
        api = GraphQLClient(http)
        # Warm up what any first request loads once (imports, caches, pools).
        warm = await run_command(api, "sh -c 'echo warm'")
        await wait_status(api, warm, FINAL)
        await read_sse(http, warm)
        await read_subscription(live, warm)

        stalled: list[StalledClient] = []
        readers: list[asyncio.Task[Any]] = []
        gc.collect()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            command_id = await run_command(api, FLOOD)
            sse_reader = asyncio.create_task(read_events(http, command_id))
            ws_reader = asyncio.create_task(read_subscription(live, command_id))
            readers.extend((sse_reader, ws_reader))
            for i in range(STALLED):
                sse = bool(i % STALLED_SOCKETS_EVERY)
                stalled.append(await stalled_follower(live, command_id, sse, COMMAND_LOGS))
                await asyncio.sleep(0.05)  # they join all along the flood
            async with asyncio.timeout(READ_TIMEOUT):
                events, lines = await sse_reader, await ws_reader
            node = await wait_status(api, command_id, FINAL, timeout=120)
            assert node["status"] == "SUCCEEDED"

            # The readers got every line, once, in order, as stored.
            total = FLOOD_LINES + 2  # with the runner's first and last SYSTEM lines
            texts = await stored_texts(live, command_id)
            assert len(texts) == total
            assert log_seqs(events) == list(range(1, total + 1))
            assert [line["text"] for line in log_data(events)] == texts
            assert [line["seq"] for line in lines] == list(range(1, total + 1))
            assert [line["text"] for line in lines] == texts
            del events, lines, texts

            # Every stalled subscriber is still there (the readers have left).
            broker: Broker = services(live).broker
            topic = command_topic(pk(command_id))
            await wait_for(
                lambda: len(broker._subscribers.get(topic, ())) == STALLED,
                "only the stalled subscribers to be left",
            )
            await asyncio.sleep(1)  # whatever the runner still frees
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - start
            held = set(broker._subscribers[topic])
        finally:
            tracemalloc.stop()
            for client in stalled:
                client.close()
            for reader in readers:
                reader.cancel()
        per_subscriber = growth / STALLED
        assert per_subscriber < BOUND_PER_SUBSCRIBER, f"{per_subscriber / MiB:.2f} MiB each"
        assert all(s.held_bytes <= s.max_bytes for s in held)  # each within its byte bound
        del held
        limits = services(live).subscriber_limits
        await wait_for(lambda: limits.count == 0, "the stalled subscribers to be released")


async def test_a_long_subscription_does_not_grow_with_the_events_it_delivered(
    settings: Settings,
) -> None:
    # graphql-core 3.3 kept ~1 KB per delivered event for as long as the subscription lived.
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http,
    ):
        api = GraphQLClient(http)
        command_id = await run_command(api, "sh -c 'seq 1 5000; sleep 60'")
        async with GraphQLSocket.open(live) as ws:
            gc.collect()
            tracemalloc.start()
            try:
                start = tracemalloc.get_traced_memory()[0]
                await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
                for _ in range(5001):  # the runner's first line, then 1..5000
                    assert (await ws.receive())["type"] == "next"
                gc.collect()
                growth = tracemalloc.get_traced_memory()[0] - start  # still subscribed
            finally:
                tracemalloc.stop()
            await api(CANCEL, id=command_id)
            await ws.until_complete("logs")
        assert growth < 2 * MiB, f"{growth / MiB:.1f} MiB for 5,000 events"


# -- replay pages --------------------------------------------------------------------------------


async def test_replay_pages_are_bounded_in_bytes_whatever_the_lines_length(
    settings: Settings,
) -> None:
    async with running_server(settings) as live:
        sessionmaker = services(live).sessionmaker
        async with sessionmaker() as session, session.begin():
            row = Command(source="x", argv=["x"], status="SUCCEEDED")
            session.add(row)
        sizes = [100_000] * 5 + [10] * 3 + [900_000]
        async with sessionmaker() as session, session.begin():
            session.add_all(
                LogLine(
                    command_id=row.id,
                    seq=seq,
                    attempt=1,
                    stream="stdout",
                    ts=utcnow(),
                    text="é" * (size // 2),
                )  # two bytes a character in UTF-8
                for seq, size in enumerate(sizes, 1)
            )
        budget = 256 * 1024
        pages: list[list[int]] = []
        after = 0
        while (page := await read_lines(sessionmaker, row.id, after, 20_000, budget)).runs:
            texts = [text for run in page.runs for text in run.texts]
            # What a page holds before its last line stays within the budget.
            assert sum(len(text.encode()) for text in texts[:-1]) < budget
            pages.append([len(text.encode()) for text in texts])
            after = page.runs[-1].last_seq
        assert pages == [[100_000] * 3, [100_000] * 2 + [10] * 3 + [900_000]]
        page = await read_lines(sessionmaker, row.id, 0, 2, budget)
        assert sum(len(run.texts) for run in page.runs) == 2  # the line limit still holds


def test_a_batch_is_written_in_pieces_of_bounded_size() -> None:
    stamp = utcnow()
    runs = [
        LineRun(1, "stdout", stamp, 1, ["a" * 1000] * 150),
        LineRun(1, "stderr", stamp, 151, ["b"] * 10),
    ]
    batch = StoredBatch(7, runs)
    parts = list(pieces(batch, 64 * 1024))
    assert len(parts) == 3
    seqs = [
        seq for part in parts for run in part.runs for seq in range(run.first_seq, run.last_seq + 1)
    ]
    assert seqs == list(range(1, 161))
    texts = [t for part in parts for run in part.runs for t in run.texts]
    assert texts == runs[0].texts + runs[1].texts
    assert all(sum(len(t) for run in p.runs for t in run.texts) <= 65 * 1024 for p in parts)


# -- limits ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, command_id: str) -> AsyncIterator[httpx.Response]:
    async with http.stream("GET", stream_path(command_id)) as response:
        yield response


async def refused_subscription(
    ws: GraphQLSocket, sub_id: str, command_id: str, query: str = COMMAND_LOGS
) -> dict[str, Any]:
    """The error a subscription over the limit gets (the socket stays open)."""
    await ws.subscribe(sub_id, query, id=command_id)
    message = await ws.receive()
    assert message["id"] == sub_id, message
    if message["type"] == "next":  # an error raised while executing: next, then complete
        errors = message["payload"]["errors"]
        assert await ws.receive() == {"id": sub_id, "type": "complete"}
    else:
        assert message["type"] == "error", message
        errors = message["payload"]
    error: dict[str, Any] = errors[0]
    return error


async def until_started(ws: GraphQLSocket, sub_id: str) -> None:
    """Lines of subscription `sub_id` up to the command's `started`."""
    while True:
        message = await ws.receive()
        assert message["id"] == sub_id, message
        assert message["type"] == "next", message
        if message["payload"]["data"]["commandLogs"]["text"] == "started":
            return


async def token_key(live: LiveServer, name: str) -> str:
    """The subscriber limits' key of the API token called `name`."""
    async with services(live).sessionmaker() as session:
        token_id = await session.scalar(select(ApiToken.id).where(ApiToken.name == name))
    return f"token:{token_id}"


async def test_subscribers_are_limited_per_client_and_in_total(settings: Settings) -> None:
    async with running_server(settings, max_subscribers=3, max_subscribers_per_client=2) as live:
        other_token = await issue_api_token(live.app, name="other")
        async with (
            httpx.AsyncClient(
                base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
            ) as http,
            httpx.AsyncClient(
                base_url=live.base_url, headers=bearer(other_token), timeout=STREAM_TIMEOUT
            ) as other_http,  # another client: another credential
        ):
            await limited_per_client_and_in_total(live, http, other_http)


async def limited_per_client_and_in_total(
    live: LiveServer, http: httpx.AsyncClient, other_http: httpx.AsyncClient
) -> None:
    api = GraphQLClient(http)
    limits = services(live).subscriber_limits
    command_id = await run_command(api, "sh -c 'echo started; sleep 60'")
    try:
        async with (
            open_stream(http, command_id) as first,
            GraphQLSocket.open(live) as ws,
        ):
            assert first.status_code == 200
            await ws.subscribe("second", COMMAND_LOGS, id=command_id)
            await until_started(ws, "second")
            assert limits.of(await token_key(live, "tests")) == 2

            # A third from the same client: SSE 429 with one line, GraphQL an error.
            third = await http.get(stream_path(command_id))
            assert third.status_code == 429
            assert "\n" not in third.text.strip()
            assert "too many live subscriptions from this client" in third.json()["error"]
            error = await refused_subscription(ws, "third", command_id)
            assert "too many live subscriptions from this client" in error["message"]
            assert error["extensions"]["code"] == "TOO_MANY_SUBSCRIBERS"
            error = await refused_subscription(ws, "events", command_id, COMMAND_EVENTS)
            assert error["extensions"]["code"] == "TOO_MANY_SUBSCRIBERS"

            # Another client still gets one: the total (3) is reached then.
            async with open_stream(other_http, command_id) as others:
                assert others.status_code == 200
                again = await other_http.get(stream_path(command_id))
                assert again.status_code == 429
                assert "maximum of 3 live subscriptions" in again.json()["error"]

                # One leaves: the socket that was refused is still usable, and takes it.
                await ws.send({"id": "second", "type": "complete"})
                await wait_for(lambda: limits.count == 2, "the subscription to leave")
                await ws.subscribe("fourth", COMMAND_LOGS, id=command_id)
                await until_started(ws, "fourth")
                assert limits.count == 3
        await wait_for(lambda: limits.count == 0, "every subscriber to be released")
        async with open_stream(http, command_id) as back:
            assert back.status_code == 200
    finally:
        await api(CANCEL, id=command_id)
        await wait_status(api, command_id, FINAL)


async def test_a_websocket_counts_for_its_credential_whatever_its_address(
    settings: Settings,
) -> None:
    async with running_server(settings, max_subscribers_per_client=1) as live:
        other_token = await issue_api_token(live.app, name="other")
        http = httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        )
        async with http:
            api = GraphQLClient(http)
            command_id = await run_command(api, "sh -c 'echo started; sleep 60'")
            async with open_stream(http, command_id) as mine:
                assert mine.status_code == 200
                for token, refused in ((live.app.state.admin_token, True), (other_token, False)):
                    async with connect(
                        live.ws_url,
                        subprotocols=[Subprotocol("graphql-transport-ws")],
                        local_addr=("127.0.0.2", 0),  # another address
                    ) as raw:
                        ws = GraphQLSocket(raw)
                        init = {"authorization": f"Bearer {token}"}
                        await ws.send({"type": "connection_init", "payload": init})
                        assert await ws.receive() == {"type": "connection_ack"}
                        if refused:  # the same token: its one subscriber is taken
                            error = await refused_subscription(ws, "logs", command_id)
                            assert error["extensions"]["code"] == "TOO_MANY_SUBSCRIBERS"
                        else:
                            await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
                            await until_started(ws, "logs")
            await api(CANCEL, id=command_id)
            await wait_status(api, command_id, FINAL)
