"""The rest of the API during a database outage (adversarial testing): requests let in just
before PostgreSQL went away (a TCP forwarder cut) fail with a clear UNAVAILABLE error or a
503 page, a mutation leaves nothing half done, `commandEvents` waits for the database (or
ends with UNAVAILABLE past OUTAGE_SECONDS), /readyz says so at once, and nothing is logged
as an error (one traceback per request, before).

Requests are held past authentication by a table lock taken on a connection of our own
(not through the forwarder), so the cut meets them inside their resolver or page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from server import streams
from server.access import UNAVAILABLE
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.test_attack_outage_fanout import (
    forwarder,  # noqa: F401 - a fixture
    proxied_settings,
    run_ticker,
    stop_ticker,
)
from tests.test_walls_logstore import Forwarder

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
PROFILES = "{ profiles(first: 5) { nodes { name } } }"
CREATE = """mutation($input: CreateProfileInput!) {
  createProfile(input: $input) { profile { id } userErrors { message } } }"""
EVENTS = """subscription($id: ID) { commandEvents(commandId: $id) { status command { id } } }"""
HELD = 3  # requests held by the lock: a query, a mutation, a panel page


async def direct_connection(settings: Settings) -> asyncpg.Connection:
    """A connection that does not pass the forwarder (the cut leaves it alone)."""
    url = make_url(settings.database_url or "").set(drivername="postgresql")
    return await asyncpg.connect(url.render_as_string(hide_password=False))


async def until_waiting_on_lock(watcher: asyncpg.Connection, count: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        waiting = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        assert time.monotonic() < deadline, f"{waiting} of {count} requests wait on the lock"
        await asyncio.sleep(0.05)


async def acked_socket(live: LiveServer) -> ClientConnection:
    ws = await connect(live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")])
    await ws.send(json.dumps(connection_init(live.app)))
    assert json.loads(await ws.recv())["type"] == "connection_ack"
    return ws


async def first_event(ws: ClientConnection, command_id: str) -> dict[str, Any]:
    """Subscribe to the command's events; the first message that is not a ping."""
    payload = {"query": EVENTS, "variables": {"id": command_id}}
    await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
    while True:
        message = json.loads(await ws.recv())
        if message["type"] != "ping":
            return dict(message)
        await ws.send(json.dumps({"type": "pong"}))


async def once_back(http: httpx.AsyncClient, query: str) -> dict[str, Any]:
    """The query's data once the database is back, asked again after a 503 (as a client
    told Retry-After would: a pooled connection from before the cut may fail once)."""
    for _ in range(10):
        response = await http.post("/graphql", json={"query": query})
        if response.status_code != 503:
            break
        await asyncio.sleep(0.3)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def assert_unavailable(body: dict[str, Any], message: str = UNAVAILABLE) -> None:
    error = body["errors"][0]
    assert error["extensions"]["code"] == "UNAVAILABLE", body
    assert error["message"] == message, body


@ON_POSTGRES
async def test_requests_met_by_an_outage_say_so_and_log_no_error(
    settings: Settings,
    forwarder: Forwarder,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    locker = await direct_connection(settings)
    watcher = await direct_connection(settings)
    try:
        async with (
            running_server(proxied_settings(settings, forwarder)) as live,
            httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
            httpx.AsyncClient(base_url=live.base_url, timeout=30) as anonymous,
        ):
            api = GraphQLClient(http)
            command_id = await run_ticker(api)
            patient, impatient = await acked_socket(live), await acked_socket(live)
            ready_before = await anonymous.get("/readyz")

            # Let in, then held inside their handlers until the cut.
            lock = locker.transaction()
            await lock.start()
            await locker.execute("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
            held = [
                asyncio.create_task(http.post("/graphql", json={"query": PROFILES})),
                asyncio.create_task(
                    http.post(
                        "/graphql",
                        json={"query": CREATE, "variables": {"input": {"name": "half-done"}}},
                    )
                ),
                asyncio.create_task(http.get("/profiles", headers={"Accept": "text/html"})),
            ]
            await until_waiting_on_lock(watcher, HELD)
            linked = len(forwarder.links)
            forwarder.cut()
            query, mutation, page = await asyncio.wait_for(asyncio.gather(*held), 20)
            await lock.rollback()

            began = time.monotonic()
            ready_during = await anonymous.get("/readyz")
            ready_took = time.monotonic() - began
            # Subscribed during the outage: it waits for the database, then follows.
            waiting = asyncio.create_task(first_event(patient, command_id))
            await asyncio.sleep(1.5)
            assert not waiting.done()
            forwarder.restore()
            patient_event = await asyncio.wait_for(waiting, 20)
            created = await once_back(http, PROFILES)

            # An outage longer than a subscriber waits: it ends with UNAVAILABLE.
            monkeypatch.setattr(streams, "OUTAGE_SECONDS", 1.0)
            forwarder.cut()
            impatient_end = await asyncio.wait_for(first_event(impatient, command_id), 20)
            forwarder.restore()
            await once_back(http, PROFILES)
            await patient.close()
            await impatient.close()
            stop_ticker(live, command_id)
            await wait_status(api, command_id, FINAL, timeout=30)
    finally:
        await locker.close()
        await watcher.close()

    assert linked >= 3, linked  # the cut closed the server's pooled connections
    assert ready_before.status_code == 200
    assert ready_during.status_code == 503, ready_during.text
    assert ready_took < 5, ready_took
    assert query.status_code == 200
    assert query.json()["data"] is None
    assert_unavailable(query.json())
    assert_unavailable(mutation.json())
    assert created["profiles"]["nodes"] == []  # the mutation wrote nothing
    assert page.status_code == 503, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["retry-after"] == "5"
    assert "<h1>Database unreachable</h1>" in page.text
    assert patient_event["type"] == "next", patient_event
    assert patient_event["payload"]["data"]["commandEvents"]["status"] == "RUNNING"
    assert impatient_end["type"] == "next", impatient_end  # an error result, then complete
    assert_unavailable(
        impatient_end["payload"],
        "the database is unreachable: these events end; subscribe again once it is back.",
    )
    errors = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("corral", "strawberry", "uvicorn"))
    ]
    assert errors == []
