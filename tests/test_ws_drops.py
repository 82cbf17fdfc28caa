"""A graphql-transport-ws client that hangs up while its subscription is being sent is
ordinary (a closed tab, a dropped network): it ends that subscription quietly, with no
ERROR and no traceback in the server's log (DESIGN: a client's doing is an INFO line at
most). Whether the send or the socket's reader notices the hang-up first is a race, so the
handler's answer to the send's failure is also tested on its own."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from strawberry.http.exceptions import WebSocketDisconnected
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from server.graphql_http import StrictTransportWSHandler
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import running_server
from tests.test_streams import CANCEL, FLOOD, run_command, wait_subscribers

DROPS = 12
BATCHES = "subscription($id: ID!) { commandLogBatches(commandId: $id) { lines { seq text } } }"


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Strawberry's and Corral's ERROR lines. Not asyncio's: a subscription dropped while
    its replay session was still connecting to PostgreSQL leaves asyncpg's handshake future
    failed and unread ("Future exception was never retrieved", seen once in CI), a separate
    defect from the one this file is about (noted for its own fix)."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR and record.name.startswith(("strawberry", "corral"))
    ]


async def test_a_send_to_a_client_gone_is_an_info_line_other_failures_stay_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral.graphql")
    handler = object.__new__(StrictTransportWSHandler)  # only its logging is exercised
    await handler.handle_task_exception(WebSocketDisconnected())
    assert errors_logged(caplog) == []
    assert any(record.levelno == logging.INFO for record in caplog.get_records("call"))

    await handler.handle_task_exception(RuntimeError("a resolver's bug"))
    assert errors_logged(caplog) == ["strawberry.ws.task: Exception in worker task"]


async def test_clients_that_hang_up_mid_subscription_log_no_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_server(settings, max_subscribers=50, max_subscribers_per_client=50) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        api = GraphQLClient(http)
        command_id = await run_command(api, FLOOD)
        for _ in range(DROPS):
            async with connect(
                live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], max_size=None
            ) as ws:
                await ws.send(json.dumps(connection_init(live.app)))
                assert json.loads(await ws.recv())["type"] == "connection_ack"
                subscribe = {"query": BATCHES, "variables": {"id": command_id}}
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": subscribe}))
                assert json.loads(await ws.recv())["type"] == "next"
            # Gone without `complete`, while the server still had batches to send.
        await wait_subscribers(http, 0)
        await api(CANCEL, id=command_id)
        await wait_status(api, command_id, FINAL)
    assert errors_logged(caplog) == []
