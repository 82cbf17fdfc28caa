"""commandLogs lets the event loop go after every line it sends (issue 16): a send that
does not block never does, and 200 followers behind, each ready with its lines, made every
pass of the loop run 16 lines of each (passes of ~0.8 s, /healthz waiting a pass or two)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from server.app import create_app
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import issue_api_token
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, serving
from tests.test_streams import COMMAND_LOGS, STREAM_TIMEOUT, GraphQLSocket, run_command

LINES = 600


class PassCounter:
    """Counts the event loop's passes (its task runs once in each), and the WebSocket
    messages an ASGI app sends in each pass."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.passes = 0
        self.sends: Counter[int] = Counter()  # pass -> WebSocket messages sent in it

    async def count(self) -> None:
        while True:
            self.passes += 1
            await asyncio.sleep(0)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted(message: Any) -> None:
            if message["type"] == "websocket.send":
                self.sends[self.passes] += 1
            await send(message)

        await self.app(scope, receive, counted if scope["type"] == "websocket" else send)


async def test_a_replay_sends_a_line_a_pass_of_the_loop(settings: Settings) -> None:
    app = create_app(settings)
    counter = PassCounter(app)
    async with serving(counter, lifespan="on") as port:
        app.state.admin_token = await issue_api_token(app)
        live = LiveServer(base_url=f"http://127.0.0.1:{port}", app=app)
        async with httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
        ) as http:
            api = GraphQLClient(http)
            command_id = await run_command(api, f"seq 1 {LINES}")
            await wait_status(api, command_id, FINAL)
        async with GraphQLSocket.open(live) as ws:
            passes = asyncio.create_task(counter.count())
            try:
                await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
                lines = [data["commandLogs"] for data in await ws.until_complete("logs")]
            finally:
                passes.cancel()
    stdout = [line["text"] for line in lines if line["stream"] == "STDOUT"]
    assert stdout == [str(i) for i in range(1, LINES + 1)]
    # Replayed from one stored page: it went out 16 lines a pass before.
    assert max(counter.sends.values()) <= 2, counter.sends.most_common(3)
