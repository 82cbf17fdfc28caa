"""Walls around HTTP and WebSocket requests (issue 10, item 6): a bounded body and
WebSocket message, allowed Host names, every malformed request a 4xx with one readable
line, and a request's session never closed under a resolver still using it.

Body, Host and WebSocket limits run against a real uvicorn (tests/fixtures/servers.py):
what a client sees there (413 read back, a 1009 close, a refused handshake) depends on the
server, not only on the app.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from graphql_schema.context import Context, RequestFinished
from runner.renderpool import RenderPool
from server.app_services import AppServices
from server.auth import TokenHasher
from server.limits import BodySizeLimit
from server.secretbox import load_secret_box
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import connection_init
from tests.fixtures.processes import CORRAL_BIN, cli_token, free_port, stop, wait_for_http
from tests.fixtures.servers import LiveServer, running_server

LIMIT = 64 * 1024  # a small CORRAL_MAX_REQUEST_BYTES, so the tests move little data
TIMEOUT = 30.0
PROTOCOL = [Subprotocol("graphql-transport-ws")]
JSON = {"content-type": "application/json"}


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveServer]:
    async with running_server(settings, max_request_bytes=LIMIT) as server:
        yield server


def graphql_body(size: int) -> bytes:
    """A valid GraphQL request of exactly `size` bytes (padded with a variable)."""
    head = {"query": "{ __typename }", "variables": {"pad": ""}}
    pad = size - len(json.dumps(head))
    return json.dumps({"query": "{ __typename }", "variables": {"pad": "x" * pad}}).encode()


def port_of(live: LiveServer) -> int:
    return int(live.base_url.rsplit(":", 1)[1])


# -- request body size ------------------------------------------------------------------------


async def test_body_within_the_limit_is_served(live: LiveServer) -> None:
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=TIMEOUT
    ) as http:
        response = await http.post(
            "/graphql", content=graphql_body(LIMIT), headers={"content-type": "application/json"}
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"__typename": "Query"}}


async def test_declared_body_over_the_limit_is_413_before_the_app_reads_it(
    live: LiveServer,
) -> None:
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=TIMEOUT
    ) as http:
        response = await http.post(
            "/graphql",
            content=graphql_body(LIMIT + 1),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.text == (
        f"request body too large: at most {LIMIT} bytes (CORRAL_MAX_REQUEST_BYTES)\n"
    )


async def test_chunked_body_over_the_limit_is_413_while_it_streams(live: LiveServer) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(8):  # 8 x 16 KiB = twice the limit, no Content-Length
            sent += 16 * 1024
            yield b"[" * (16 * 1024)

    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=TIMEOUT
    ) as http:
        response = await http.post(
            "/graphql", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413, response.text
    assert "CORRAL_MAX_REQUEST_BYTES" in response.text


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes to the server, read its answer until it closes (or 10 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after its answer
            answer += chunk
        return answer


async def test_huge_declared_body_is_refused_without_being_sent(live: LiveServer) -> None:
    """A client announcing 100 MB gets the 413 at once: nothing waits for the body."""
    request = (
        b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n{"
    )
    answer = await asyncio.wait_for(
        asyncio.to_thread(raw_exchange, port_of(live), request), TIMEOUT
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"connection: close" in answer.lower()


# -- WebSocket message size -----------------------------------------------------------------


async def test_websocket_message_over_the_limit_closes_with_1009(live: LiveServer) -> None:
    async with connect(live.ws_url, subprotocols=PROTOCOL, open_timeout=10) as ws:
        await ws.send(json.dumps(connection_init(live.app)))
        assert json.loads(await ws.recv()) == {"type": "connection_ack"}
        message = {
            "type": "subscribe",
            "id": "1",
            "payload": {"query": "{ __typename }", "variables": {"pad": "x" * (LIMIT + 1)}},
        }
        await ws.send(json.dumps(message))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_websockets_are_not_compressed_unless_the_setting_asks(
    live: LiveServer, settings: Settings
) -> None:
    # A client offering permessage-deflate gets plain frames: compressing every message cost
    # more CPU than executing it at fan-out (issue 16). CORRAL_WS_COMPRESSION turns it on.
    async with connect(live.ws_url, subprotocols=PROTOCOL, compression="deflate") as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
    async with (
        running_server(settings, ws_compression=True) as compressing,
        connect(compressing.ws_url, subprotocols=PROTOCOL, compression="deflate") as ws,
    ):
        assert ws.response is not None
        offered = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert offered.startswith("permessage-deflate")


async def test_corral_serve_bounds_bodies_and_websocket_messages(tmp_path: Path) -> None:
    """`corral serve` itself: uvicorn refuses a larger WebSocket frame (1009) before it is
    assembled (its default would take 16 MiB), and the app refuses a larger body."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_MAX_REQUEST_BYTES"] = str(LIMIT)
    token = cli_token(tmp_path, env)  # for the WebSocket, made as an operator would
    init = {
        "type": "connection_init",
        "payload": {"authorization": f"Bearer {token}"},
    }
    process = subprocess.Popen(
        [str(CORRAL_BIN), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_for_http, f"{base}/healthz", process)
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
            response = await http.post("/graphql", content=graphql_body(LIMIT + 1), headers=JSON)
        assert response.status_code == 413, response.text
        async with connect(f"ws://127.0.0.1:{port}/graphql", subprotocols=PROTOCOL) as ws:
            await ws.send(json.dumps(init))
            assert json.loads(await ws.recv()) == {"type": "connection_ack"}
            await ws.send(json.dumps({"type": "ping", "payload": {"pad": "x" * LIMIT}}))
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        # Refused by the server's frame limit ("frame with N bytes exceeds limit of M bytes";
        # "frame exceeds limit" when compressed), not by the app after assembling it (it
        # closes with no reason).
        assert "exceeds limit" in closed.value.rcvd.reason
    finally:
        code, output = await asyncio.to_thread(stop, process)
    assert code in (0, -15), output


async def test_app_closes_a_websocket_message_over_the_limit_itself() -> None:
    """Behind a server without a frame limit, the app still refuses a big message (1009)
    and its endpoint sees a disconnect, never the message."""
    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "x" * 10},
        {"type": "websocket.receive", "text": "é" * 6},  # 12 bytes in UTF-8
    ]
    sent: list[Message] = []
    seen: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    async def endpoint(_scope: Scope, receive: Receive, _send: Send) -> None:
        for _ in range(3):
            seen.append(await receive())

    await BodySizeLimit(endpoint, max_bytes=10)({"type": "websocket"}, receive, send)
    assert [m["type"] for m in seen] == [
        "websocket.connect",
        "websocket.receive",
        "websocket.disconnect",
    ]
    assert sent == [{"type": "websocket.close", "code": 1009}]


# -- Host names -------------------------------------------------------------------------------


async def test_foreign_host_is_400_with_one_line_and_loopback_names_pass(
    live: LiveServer,
) -> None:
    port = port_of(live)
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=TIMEOUT
    ) as http:
        for host in ("evil.example", "127.0.0.1.nip.io", "localhost.evil.example"):
            for method, path in (("GET", "/healthz"), ("POST", "/graphql")):
                response = await http.request(
                    method, path, json={"query": "{ __typename }"}, headers={"host": f"{host}:80"}
                )
                assert response.status_code == 400, (host, path, response.text)
                assert response.text == (
                    f"Host '{host}:80' is not an allowed name for this server "
                    "(CORRAL_ALLOWED_HOSTS)\n"
                )
        for host in ("localhost", "LOCALHOST", "127.0.0.1", "[::1]", "localhost."):
            response = await http.get("/healthz", headers={"host": f"{host}:{port}"})
            assert response.status_code == 200, (host, response.text)


async def test_foreign_host_cannot_open_a_websocket(live: LiveServer) -> None:
    port = port_of(live)
    # Connect to 127.0.0.1 while the handshake names another host (what a DNS-rebound
    # page in a browser does).
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            f"ws://evil.example:{port}/graphql",
            host="127.0.0.1",
            port=port,
            subprotocols=PROTOCOL,
            open_timeout=10,
        ):
            pass
    assert refused.value.response.status_code == 403
    async with connect(
        f"ws://localhost:{port}/graphql",
        host="127.0.0.1",
        port=port,
        subprotocols=PROTOCOL,
        open_timeout=10,
    ) as ws:
        await ws.send(json.dumps(connection_init(live.app)))
        assert json.loads(await ws.recv()) == {"type": "connection_ack"}


async def test_allowed_hosts_setting_replaces_the_defaults(settings: Settings) -> None:
    configured = settings.model_copy(update={"allowed_hosts": "corral.example.com,*.corp.test"})
    async with (
        running_server(configured) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=TIMEOUT) as http,
    ):
        for host, status in [
            ("corral.example.com", 200),
            ("a.corp.test", 200),
            ("corp.test", 400),
            ("127.0.0.1", 400),
            ("localhost", 400),
        ]:
            response = await http.get("/healthz", headers={"host": host})
            assert response.status_code == status, (host, response.text)


# -- malformed requests -------------------------------------------------------------------------

MALFORMED_POSTS: list[tuple[bytes, dict[str, str], str]] = [
    (b'"hello"', JSON, "expected a JSON object, not a string"),
    (b"1", JSON, "expected a JSON object, not a number"),
    (b"null", JSON, "expected a JSON object, not null"),
    (b"true", JSON, "expected a JSON object, not a boolean"),
    (b"[]", JSON, "Batching is not enabled"),
    (b"{", JSON, "Unable to parse request body as JSON"),
    (b"", JSON, "Unable to parse request body as JSON"),
    (b'{"query": "\xff"}', JSON, "Unable to parse request body as JSON"),
    (b'{"query": "{ __typename }", "variables": {"a": 1' + b"0" * 5000 + b"}}", JSON, "JSON"),
    (b'{"query": "{ __typename }", "variables": ' + b"[" * 100_000, JSON, "JSON"),
    (
        b'{"query": "{ __typename }", "variables": {"a": ' + b"[" * 80 + b"]" * 80 + b"}}",
        JSON,
        "nested deeper than 64 levels",
    ),
    (b'{"query": "{ __typename }", "variables": {"n": "a\\ud800"}}', JSON, "lone surrogate"),
    (b'{"query": "{ __typename }", "variables": "x"}', JSON, "`variables` must be an object"),
    (b'{"query": "{ __typename }", "variables": []}', JSON, "`variables` must be an object"),
    (b'{"query": 1}', JSON, "`query` must be a string"),
    (b"{}", JSON, "No GraphQL query found"),
    (b'{"query": "{ __typename }"}', {"content-type": "text/plain"}, "Unsupported content type"),
    (b'{"query": "{ __typename }"}', {}, "Unsupported content type"),
    (
        b'{"query": "subscription { commandEvents { status } }"}',
        JSON,
        "subscriptions are not allowed when using POST",
    ),
]


async def test_malformed_posts_are_400_with_one_readable_line(client: httpx.AsyncClient) -> None:
    for body, headers, expected in MALFORMED_POSTS:
        response = await client.post("/graphql", content=body, headers=headers)
        assert response.status_code == 400, (body[:80], response.status_code, response.text)
        assert expected in response.text, (body[:80], response.text)
        assert "\n" not in response.text.strip(), response.text
        assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("query_string", "expected"),
    [
        ("query=%7B__typename%7D&variables=x", "Unable to parse"),
        ("query=%7B__typename%7D&variables=1", "expected a JSON object, not a number"),
        ("query=%7B__typename%7D&variables=%22%5Cud800%22", "lone surrogate"),
        ("query=%7B__typename%7D&extensions=%5B", "Unable to parse"),
        ("variables=%7B%7D", "No GraphQL query found"),
    ],
)
async def test_malformed_gets_are_400(
    client: httpx.AsyncClient, query_string: str, expected: str
) -> None:
    # (a mutation over GET is a 405: tests/test_graphql_over_http.py)
    response = await client.get(f"/graphql?{query_string}", headers={"accept": "application/json"})
    assert response.status_code == 400, response.text
    assert expected in response.text


async def test_get_with_null_variables_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/graphql?query=%7B__typename%7D&variables=null")
    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"__typename": "Query"}}


@pytest.mark.parametrize(
    "cursor",
    ["é", "\u00ff\u00fe", "!!!", "\U0001f600", "Y3Vyc29yOmFiYw==", "x" * 10_000],
)
async def test_garbage_cursor_is_a_clear_graphql_error(gql: GraphQLClient, cursor: str) -> None:
    body = await gql.raw("query($c: String) { profiles(after: $c) { totalCount } }", c=cursor)
    assert body["data"] is None
    [error] = body["errors"]
    assert error["message"].startswith("invalid cursor "), error
    assert "pass a pageInfo.endCursor" in error["message"]
    assert len(error["message"]) < 200  # the cursor is quoted cut short


@pytest.mark.parametrize("global_id", ["é", "\U0001f600", "UHJvZmlsZTrDqQ==", "x" * 10_000])
async def test_garbage_global_id_is_null_or_a_user_error(
    gql: GraphQLClient, global_id: str
) -> None:
    assert (await gql("query($id: ID!) { node(id: $id) { id } }", id=global_id)) == {"node": None}
    data = await gql(
        "mutation($id: ID!) { deleteProfile(id: $id) { deletedId userErrors { message code } } }",
        id=global_id,
    )
    [error] = data["deleteProfile"]["userErrors"]
    assert error["code"] == "NOT_FOUND"
    assert error["message"].startswith("not a Profile ID")
    assert len(error["message"]) < 100  # the ID is not quoted (it may be a pasted token)


MALFORMED_WS_MESSAGES = [
    ('"hello"', "a message must be a JSON object with a string `type`"),
    ("[]", "a message must be a JSON object with a string `type`"),
    ('{"type": 1}', "a message must be a JSON object with a string `type`"),
    ('{"type": "subscribe"}', "`id` must be a string of 1 to 256 characters"),
    ('{"type": "subscribe", "id": [], "payload": {"query": "{ __typename }"}}', "`id`"),
    ('{"type": "subscribe", "id": "1", "payload": "x"}', "`payload` must be an object"),
    ('{"type": "subscribe", "id": "1", "payload": {"query": 5}}', "string `query`"),
    (
        '{"type": "subscribe", "id": "1", "payload": {"query": "{ __typename }", "variables": 5}}',
        "`payload.variables` must be an object",
    ),
    ('{"type": "complete", "id": 5}', "`id`"),
    ('{"type": "subscribe", "id": "1", "payload": {"query": "\\ud800"}}', "valid JSON"),
]


async def test_malformed_websocket_messages_close_with_4400(live: LiveServer) -> None:
    for message, reason in MALFORMED_WS_MESSAGES:
        async with connect(live.ws_url, subprotocols=PROTOCOL, open_timeout=10) as ws:
            await ws.send(json.dumps(connection_init(live.app)))
            assert json.loads(await ws.recv()) == {"type": "connection_ack"}
            await ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await ws.recv()
        assert closed.value.rcvd is not None, message
        assert (closed.value.rcvd.code, message) == (4400, message)
        assert reason in closed.value.rcvd.reason, (message, closed.value.rcvd.reason)


# -- the session race -------------------------------------------------------------------------

LINK = """
mutation($name: String!) {
  p: createProfile(input: {name: $name}) { profile { id } }
  x: createProxy(input: {name: $name, protocol: "socks5", host: "127.0.0.1", port: 1080}) {
    proxy { id }
  }
}"""
ATTACH = "mutation($p: ID!, $x: ID!) { attachProxy(input: {profileId: $p, proxyId: $x}) { userErrors { message } } }"
# `a` loads proxies and their profiles through DataLoaders; its sibling `b` fails on a
# non-null field, so graphql-core cancels `a` and answers while `a`'s DataLoader batches
# (cancelled, never awaited) still hold the request's session.
RACE = """
{
  a: profiles { nodes { proxies { name profiles { name } } services { createdAt } } }
  b: profiles { nodes { name commands(first: -1) { totalCount } } }
}"""


async def test_failing_sibling_never_closes_the_session_under_a_loader(
    gql: GraphQLClient, client: httpx.AsyncClient
) -> None:
    for i in range(8):
        made = await gql(LINK, name=f"race-{i}")
        await gql(ATTACH, p=made["p"]["profile"]["id"], x=made["x"]["proxy"]["id"])

    async def one() -> dict[str, Any]:
        # ASGITransport raises what the app raised after its response, as uvicorn logs it.
        response = await client.post("/graphql", json={"query": RACE})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    for _ in range(6):
        for body in await asyncio.gather(*(one() for _ in range(6))):
            assert body["data"] is None
            assert {e["message"] for e in body["errors"]} == {"first must be between 0 and 1000."}


async def test_close_waits_for_the_session_user_and_later_use_is_refused(
    settings: Settings,
) -> None:
    from server.db import create_engine, create_sessionmaker

    engine = create_engine(settings)
    try:
        services = AppServices(
            settings=settings,
            sessionmaker=create_sessionmaker(engine),
            secret_box=load_secret_box(settings),
            render_pool=RenderPool.from_settings(settings),  # never started: nothing renders
            token_hasher=TokenHasher(bytes(32)),
        )
        context = Context(app=services)
        holding = asyncio.Event()

        async def slow_reader() -> int:
            async with context.reading() as session:
                holding.set()
                await asyncio.sleep(0.2)
                return int((await session.execute(select_one())).scalar_one())

        reader = asyncio.create_task(slow_reader())
        await holding.wait()
        await context.close()  # waits for the reader, instead of closing under it
        assert reader.done()
        assert await reader == 1
        with pytest.raises(RequestFinished):
            async with context.reading():
                pass
    finally:
        await engine.dispose()


def select_one() -> Any:
    from sqlalchemy import literal, select

    return select(literal(1))


# -- the Host setting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "names"),
    [
        ("127.0.0.1", ["localhost", "127.0.0.1", "[::1]"]),
        ("0.0.0.0", ["localhost", "127.0.0.1", "[::1]"]),  # noqa: S104
        ("::", ["localhost", "127.0.0.1", "[::1]"]),
        ("corral.lan", ["localhost", "127.0.0.1", "[::1]", "corral.lan"]),
        ("fd00::5", ["localhost", "127.0.0.1", "[::1]", "[fd00::5]"]),
    ],
)
def test_default_allowed_hosts_follow_the_listening_address(host: str, names: list[str]) -> None:
    assert Settings(host=host).allowed_host_names == names


def test_allowed_hosts_setting_is_split_and_checked() -> None:
    assert Settings(allowed_hosts=" A.example , *.corp.test,*").allowed_host_names == [
        "a.example",
        "*.corp.test",
        "*",
    ]
    for bad in ("a*b", "*corp.test", "*.", " , "):
        with pytest.raises(ValueError, match="allowed_hosts"):
            Settings(allowed_hosts=bad)
