"""Clients that never read, against the shared replay pages and status reads (adversarial
testing): 40 followers of a busy command subscribe from its first line and stall in the
middle of the replay, while readers keep joining the same command. Each reader catches up
promptly and gets every line once; the stalled ones hold no database connection (the
stream pool is 2), what the server holds for each stays within its bound, and no shared
read is left behind. (tests/test_walls_subscribers.py measures their memory as a whole.)
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from server.broker import Broker, command_topic
from server.settings import Settings
from server.stream_pages import SharedPages
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.fixtures.stalled import StalledClient
from tests.test_streams import run_command, sse_events, stream_path
from tests.test_walls_logstore import pk
from tests.test_walls_subscribers import NO_PINGS, services, stalled_follower

STALLED = 40
READERS = 8
# Lines of 20,000 characters (random: they hardly compress) stored before anyone joins:
# ~8 MB to replay, more than a stalled client's kernel buffers take (its own and the
# server's send buffer, which grows to 4 MB), so the stalled ones really stall; few lines,
# so the test stays fast (a GraphQL event costs per line).
BACKLOG = 400
BUSY = (
    'python3 -c "import base64, os, time\n'
    f"for _ in range({BACKLOG}): print(base64.b64encode(os.urandom(15000)).decode())\n"
    "i = 0\n"
    "while not os.path.exists('stop'):\n"
    "    i += 1; print('tick', i, flush=True); time.sleep(0.05)\n"
    "print('done')\""
)
LOGS = "subscription($id: ID!) { commandLogs(commandId: $id) { seq text } }"
BATCHES = "subscription($id: ID!) { commandLogBatches(commandId: $id) { lines { seq text } } }"
CATCH_UP_SECONDS = 15.0  # a reader's replay of ~8 MB (seen: 0.1-0.6 s PostgreSQL, 3-6 s SQLite)
READ_TIMEOUT = 120.0


@dataclass
class Reader:
    """A client that reads as fast as lines come, and when it caught up with the backlog."""

    kind: str
    seqs: list[int] = field(default_factory=list)
    caught_up_in: float | None = None


async def read_sse(live: LiveServer, command_id: str, reader: Reader) -> None:
    began = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=60) as http,
        http.stream("GET", stream_path(command_id)) as response,
    ):
        assert response.status_code == 200
        async for event in sse_events(response):
            if event.event == "log":
                reader.seqs.append(json.loads(event.data)["seq"])
                if reader.caught_up_in is None and reader.seqs[-1] > BACKLOG:
                    reader.caught_up_in = time.monotonic() - began


async def read_ws(live: LiveServer, command_id: str, query: str, reader: Reader) -> None:
    began = time.monotonic()
    async with connect(
        live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=30
    ) as ws:
        await ws.send(json.dumps(connection_init(live.app)))
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        payload = {"query": query, "variables": {"id": command_id}}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "complete":
                return
            assert message["type"] == "next", message
            data = message["payload"]["data"]
            if "commandLogs" in data:
                reader.seqs.append(data["commandLogs"]["seq"])
            else:
                reader.seqs += [line["seq"] for line in data["commandLogBatches"]["lines"]]
            if reader.caught_up_in is None and reader.seqs and reader.seqs[-1] > BACKLOG:
                reader.caught_up_in = time.monotonic() - began


async def stored_count(api: GraphQLClient, command_id: str) -> int:
    found = await api(
        """query($id: ID!) { node(id: $id) { ... on Command { logs(first: 100000) { seq } } } }""",
        id=command_id,
    )
    return len(found["node"]["logs"])


async def until_backlog_stored(api: GraphQLClient, command_id: str) -> None:
    query = """query($id: ID!) { node(id: $id) { ... on Command {
      logs(afterSeq: $after, first: 1) { seq } } } }""".replace("$after", str(BACKLOG + 1))
    deadline = time.monotonic() + READ_TIMEOUT
    while not (await api(query, id=command_id))["node"]["logs"]:
        assert time.monotonic() < deadline, "the backlog was never stored"
        await asyncio.sleep(0.1)


def reading(live: LiveServer, command_id: str, reader: Reader) -> asyncio.Task[None]:
    if reader.kind == "sse":
        return asyncio.create_task(read_sse(live, command_id, reader))
    query = LOGS if reader.kind == "logs" else BATCHES
    return asyncio.create_task(read_ws(live, command_id, query, reader))


async def test_readers_joining_beside_stalled_followers_catch_up_and_get_every_line(
    settings: Settings,
) -> None:
    async with (
        running_server(
            settings,
            uvicorn_options=NO_PINGS,
            max_subscribers=200,
            max_subscribers_per_client=200,
            stream_pool_size=2,
        ) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        api = GraphQLClient(http)
        command_id = await run_command(api, BUSY)
        await until_backlog_stored(api, command_id)
        pages: SharedPages = services(live).replay_pages
        broker: Broker = services(live).broker
        stalled: list[StalledClient] = []
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(STALLED):
                stalled.append(await stalled_follower(live, command_id, bool(i % 2), LOGS))
            await asyncio.sleep(2)  # they replay until their sockets are full, then stall
            readers = [Reader(("sse", "logs", "batches")[i % 3]) for i in range(READERS)]
            for reader in readers:
                tasks.append(reading(live, command_id, reader))
                await asyncio.sleep(0.3)  # they join one after the other
            deadline = time.monotonic() + READ_TIMEOUT
            while not all(reader.caught_up_in is not None for reader in readers):
                assert time.monotonic() < deadline, [len(r.seqs) for r in readers]
                assert not any(task.done() for task in tasks), [t for t in tasks if t.done()]
                await asyncio.sleep(0.1)
            # Everyone is still there: what the server holds for each is within its bound.
            subscribers = set(broker._subscribers[command_topic(pk(command_id))])
            assert len(subscribers) == STALLED + READERS
            assert all(s.held_bytes <= s.max_bytes for s in subscribers)
            del subscribers
            (settings.commands_dir / str(pk(command_id)) / "stop").touch()
            node = await wait_status(api, command_id, FINAL, timeout=READ_TIMEOUT)
            async with asyncio.timeout(READ_TIMEOUT):
                await asyncio.gather(*tasks)
            total = await stored_count(api, command_id)
            await asyncio.sleep(1)
            # The readers are done and the command is over, the stalled ones are not: they
            # stalled for real (a stream that sent everything would have ended).
            stuck = services(live).subscriber_limits.count
        finally:
            for client in stalled:
                client.close()
            for task in tasks:
                task.cancel()
        limits = services(live).subscriber_limits
        deadline = time.monotonic() + 30
        while limits.count:
            assert time.monotonic() < deadline, "the stalled subscribers were never released"
            await asyncio.sleep(0.05)
        assert len(pages._reading) == 0
        assert len(pages._status_reads) == 0  # no shared read left behind
    assert node["status"] == "SUCCEEDED"
    assert stuck == STALLED
    assert total > BACKLOG + 2
    for reader in readers:
        assert reader.seqs == list(range(1, total + 1)), reader.kind
        assert reader.caught_up_in is not None
        assert reader.caught_up_in < CATCH_UP_SECONDS, (reader.kind, reader.caught_up_in)
    assert pages._kept_bytes <= pages.max_bytes
