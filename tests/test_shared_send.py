"""Shared subscription events written by the WebSocket itself (issue 16): a subscriber whose
selection's data for an event exists already is sent it without the per-event execution
(graphql_schema.shared_events.sent_directly); what a client receives stays the same.

A real uvicorn, real sockets: `websockets` speaking graphql-transport-ws (test_streams).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import WebSocketDisconnected

from graphql_schema.shared_events import SharedData
from server.graphql_http import StrictTransportWSHandler
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.servers import LiveServer, running_server
from tests.test_fanout import BATCH_SEQS, BATCHES, PRINTS
from tests.test_streams import STREAM_TIMEOUT, GraphQLSocket, run_command, stored_logs
from tests.test_ws_drops import errors_logged


def compact(message: Any) -> str:
    """A message as the full path writes one whose data is not shared (Strawberry's
    encode_json): compact JSON, keys in the order the result has them."""
    return json.dumps(message, separators=(",", ":"))


@pytest.fixture
def sent_directly(monkeypatch: pytest.MonkeyPatch) -> list[SharedData]:
    """The data of each `next` message the WebSocket sent without executing its event."""
    sent: list[SharedData] = []
    send = StrictTransportWSHandler._send_shared

    async def counted(operation: Any, data: SharedData) -> None:
        sent.append(data)
        await send(operation, data)

    monkeypatch.setattr(StrictTransportWSHandler, "_send_shared", staticmethod(counted))
    return sent


async def frames(ws: GraphQLSocket, ids: set[str]) -> dict[str, list[str]]:
    """The text of each message of the subscriptions `ids`, as it came, up to their
    `complete` (the last one of each)."""
    got: dict[str, list[str]] = {sub_id: [] for sub_id in ids}
    open_ids = set(ids)
    while open_ids:
        async with asyncio.timeout(STREAM_TIMEOUT):
            text = await ws.ws.recv()
        assert isinstance(text, str)
        message = json.loads(text)
        if message["type"] == "ping":
            await ws.send({"type": "pong"})
            continue
        got[message["id"]].append(text)
        if message["type"] == "complete":
            open_ids.discard(message["id"])
    return got


async def follow(live: LiveServer, subscriptions: dict[str, tuple[str, dict[str, Any]]]) -> Any:
    """Subscribe on one socket to each (query, variables) by its id; their messages' text."""
    async with GraphQLSocket.open(live) as ws:
        for sub_id, (query, variables) in subscriptions.items():
            await ws.subscribe(sub_id, query, **variables)
        return await frames(ws, set(subscriptions))


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveServer]:
    async with running_server(settings) as server:
        yield server


async def test_subscribers_of_a_selection_sent_its_shared_data_get_the_same_messages(
    live: LiveServer, sent_directly: list[SharedData]
) -> None:
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
    ) as http:
        api = GraphQLClient(http)
        command_id = await run_command(api, PRINTS)
        sockets = await asyncio.gather(
            # Two subscriptions of one selection on one socket, under their own ids.
            follow(live, {"a": (BATCHES, {"id": command_id}), "b": (BATCHES, {"id": command_id})}),
            follow(live, {"c": (BATCHES, {"id": command_id, "after": 0})}),
            # Another selection of the same events.
            follow(live, {"s": (BATCH_SEQS, {"id": command_id})}),
        )
        stored = await stored_logs(api, command_id)
    got = {sub_id: texts for socket in sockets for sub_id, texts in socket.items()}
    assert sent_directly  # the other subscribers of a selection were sent it directly
    expected_lines = [
        {key: line[key] for key in ("seq", "attempt", "stream", "text")} for line in stored
    ]
    for sub_id, texts in got.items():
        messages = [json.loads(text) for text in texts]
        # Byte for byte what the full path writes, under the subscription's own id.
        assert texts == [compact(message) for message in messages]
        assert all(message["id"] == sub_id for message in messages)
        assert messages[-1] == {"id": sub_id, "type": "complete"}
        nexts = messages[:-1]
        assert all(message["type"] == "next" for message in nexts)
        assert all(message["payload"].keys() == {"data"} for message in nexts)
        root = "b" if sub_id == "s" else "commandLogBatches"
        batches = [message["payload"]["data"][root] for message in nexts]
        assert batches[-1] == {"lines": [], "final": True} or sub_id == "s"
        lines = [line for batch in batches for line in batch["lines"]]
        if sub_id == "s":  # its own shape: its fields, in its order
            assert all(list(batch) == ["final", "lines"] for batch in batches)
            assert lines == [{"seq": line["seq"]} for line in expected_lines]
        else:
            assert all(list(batch) == ["lines", "final"] for batch in batches)
            assert lines == expected_lines
    # The data sent directly was the selection's: never the other selection's shape.
    assert all(list(data) == ["commandLogBatches"] for data in sent_directly)


async def test_shared_data_over_the_response_limit_is_an_error_for_every_subscriber(
    settings: Settings, sent_directly: list[SharedData]
) -> None:
    limit = 200  # a message of a few lines is more; the last, empty one is less
    async with (
        running_server(settings, graphql_max_response_bytes=limit) as live,
        httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http,
    ):
        api = GraphQLClient(http)
        command_id = await run_command(api, PRINTS)
        sockets = await asyncio.gather(
            *(follow(live, {str(n): (BATCHES, {"id": command_id})}) for n in range(3))
        )
    assert all(len(data.json()) <= limit for data in sent_directly)
    for socket in sockets:
        [(sub_id, texts)] = socket.items()
        messages = [json.loads(text) for text in texts]
        assert texts == [compact(message) for message in messages]
        assert messages[-1] == {"id": sub_id, "type": "complete"}
        payloads = [message["payload"] for message in messages[:-1]]
        assert payloads[-1] == {"data": {"commandLogBatches": {"lines": [], "final": True}}}
        over = [payload for payload in payloads if payload.get("errors")]
        assert over  # the lines' messages
        for payload in over:
            assert payload["data"] is None
            assert [error["extensions"]["code"] for error in payload["errors"]] == [
                "RESPONSE_TOO_LARGE"
            ]
        # What did fit came as data (a single short line may).
        assert all(
            len(json.dumps(p["data"], separators=(",", ":"))) <= limit
            for p in payloads
            if not p.get("errors")
        )


async def test_a_direct_send_to_a_client_gone_ends_its_subscription_quietly(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A hang-up is noticed by the send or by the socket's reader, a race (test_ws_drops):
    # here the sends of the "gone" subscriptions fail as Starlette's do for a client gone,
    # whenever their event is sent directly (the first of a selection to take an event
    # executes it: with three of them, the others are sent it directly).
    direct: set[str] = set()
    failed: list[BaseException] = []
    send_shared = StrictTransportWSHandler._send_shared
    send_json = ASGIWebSocketAdapter.send_json

    async def sent_directly(operation: Any, data: SharedData) -> None:
        direct.add(operation.id)
        try:
            await send_shared(operation, data)
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            direct.discard(operation.id)

    async def send(adapter: ASGIWebSocketAdapter, message: Any) -> None:
        if message.get("id") in direct and message["id"].startswith("gone"):
            raise WebSocketDisconnected
        await send_json(adapter, message)

    monkeypatch.setattr(StrictTransportWSHandler, "_send_shared", staticmethod(sent_directly))
    monkeypatch.setattr(ASGIWebSocketAdapter, "send_json", send)
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
    ) as http:
        api = GraphQLClient(http)
        command_id = await run_command(api, PRINTS)
        gone = [f"gone{n}" for n in range(3)]
        subscriptions = {sub_id: (BATCHES, {"id": command_id}) for sub_id in ["kept", *gone]}
        got = await follow(live, subscriptions)
        stored = await stored_logs(api, command_id)
    assert failed  # a direct send failed...
    # ...and ended its subscription as a failed `next` does: no error message, no `next`
    # after it (its `complete` is sent, as ever), and no ERROR logged.
    for sub_id in gone:
        messages = [json.loads(text) for text in got[sub_id]]
        assert messages[-1] == {"id": sub_id, "type": "complete"}
        assert all(m["type"] == "next" and "errors" not in m["payload"] for m in messages[:-1])
    assert errors_logged(caplog) == []
    # The other subscription of the socket goes on to the end.
    kept = [json.loads(text)["payload"]["data"]["commandLogBatches"] for text in got["kept"][:-1]]
    assert [line["seq"] for batch in kept for line in batch["lines"]] == [
        line["seq"] for line in stored
    ]
    assert kept[-1]["final"]
