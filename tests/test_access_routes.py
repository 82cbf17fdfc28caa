"""Who gets in, and what each role may do there: the route matrix, generated from the app.

Every HTTP route of the app (a new one is covered without touching this file) but the open
ones (`is_open_path`, as the middleware decides) refuses a request without credentials,
with a revoked, expired or malformed token: 401 for API clients, 303 to /login for a
browser. Every Mutation field of the schema is refused to a viewer, and every secret-bearing
field. WebSockets over the real graphql-transport-ws protocol against a real uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLScalarType,
)
from sqlalchemy import func, select, update
from starlette.applications import Starlette
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from graphql_schema.permissions import secret_fields
from graphql_schema.relay import encode_id
from graphql_schema.schema import build_schema
from server.access import is_open_path
from server.app import create_app
from server.auth import create_user, start_session
from server.models import ApiToken, Profile, utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer, issue_api_token
from tests.fixtures.servers import LiveServer, running_server
from tests.test_streams import (
    COMMAND_EVENTS,
    COMMAND_LOGS,
    GraphQLSocket,
    run_command,
    wait_subscribers,
)

WS_TIMEOUT = 30.0
SCHEMA = build_schema()


# -- the route matrix --------------------------------------------------------------------


def guarded_requests(app: Starlette) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route that needs credentials, its parameters filled."""
    found: list[tuple[str, str]] = []
    for route in app.routes:
        if not isinstance(route, Route) or is_open_path(route.path):
            continue
        path = route.path
        for name in route.param_convertors:
            path = path.replace(f"{{{name}}}", str(encode_id("Command", 1)))
        found.extend((method, path) for method in sorted(route.methods or ()))
    return found


def test_the_matrix_covers_the_api_routes() -> None:
    app = create_app(Settings())
    paths = {path for _method, path in guarded_requests(app)}
    stream = f"/api/commands/{encode_id('Command', 1)}/logs/stream"
    assert {"/graphql", "/metrics", stream} <= paths
    assert ("POST", "/graphql") in guarded_requests(app)
    assert not paths & {"/healthz", "/readyz"}


@contextlib.asynccontextmanager
async def anonymous(app: Starlette, address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(address, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        yield http


async def revoked_token(app: Starlette) -> str:
    token = await issue_api_token(app, name="revoked")
    async with app.state.services.sessionmaker() as session:
        await session.execute(
            update(ApiToken).where(ApiToken.name == "revoked").values(revoked_at=utcnow())
        )
        await session.commit()
    return token


async def expired_token(app: Starlette) -> str:
    token = await issue_api_token(app, name="expired")
    async with app.state.services.sessionmaker() as session:
        await session.execute(
            update(ApiToken)
            .where(ApiToken.name == "expired")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    return token


async def refused_headers(app: Starlette, kind: str) -> dict[str, str]:
    if kind == "none":
        return {}
    if kind == "revoked":
        return bearer(await revoked_token(app))
    if kind == "expired":
        return bearer(await expired_token(app))
    malformed = {
        "basic-scheme": "Basic dXNlcjpwYXNz",
        "bearer-without-token": "Bearer",
        "not-a-corral-token": "Bearer ghp_0123456789abcdef0123",
        "unknown-token": "Bearer crl_" + "A" * 43,
        "admin-token-mangled": f"Bearer {app.state.admin_token[:-1]}x",
    }
    return {"Authorization": malformed[kind]}


CREDENTIALS = [
    "none",
    "revoked",
    "expired",
    "basic-scheme",
    "bearer-without-token",
    "not-a-corral-token",
    "unknown-token",
    "admin-token-mangled",
]


@pytest.mark.parametrize("credentials", CREDENTIALS)
async def test_every_guarded_route_refuses_missing_or_bad_credentials_with_401(
    app: Starlette, credentials: str
) -> None:
    headers = await refused_headers(app, credentials)
    async with anonymous(app) as http:
        for method, path in guarded_requests(app):
            response = await http.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == 'Bearer realm="corral"'
            assert app.state.admin_token not in response.text
            if path == "/graphql" and method != "HEAD":
                assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_a_browser_without_credentials_is_sent_to_the_login_page(app: Starlette) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml"}
    async with anonymous(app) as http:
        for method, path in guarded_requests(app):
            response = await http.request(method, f"{path}?a=1", headers=browser)
            if method in ("GET", "HEAD"):
                assert response.status_code == 303, (method, path)
                assert response.headers["location"] == f"/login?next={quote(path + '?a=1', '')}"
            else:  # a form post is no navigation: told, not redirected
                assert response.status_code == 401, (method, path)


async def test_health_and_readiness_answer_without_credentials(app: Starlette) -> None:
    async with anonymous(app, "203.0.113.9") as http:
        assert (await http.get("/healthz")).text == "ok"
        assert (await http.get("/readyz")).text == "ready"


async def test_metrics_open_to_allowed_addresses_else_a_token(settings: Settings) -> None:
    allowing = create_app(settings.model_copy(update={"metrics_allow": ["127.0.0.1/32"]}))
    async with allowing.router.lifespan_context(allowing):
        token = await issue_api_token(allowing, role="viewer")
        async with anonymous(allowing) as local, anonymous(allowing, "203.0.113.9") as remote:
            assert (await local.get("/metrics")).status_code == 200
            assert (await remote.get("/metrics")).status_code == 401
            assert (await remote.get("/metrics", headers=bearer(token))).status_code == 200
            # An allowed address that offers a bad token is refused all the same.
            bad = {"Authorization": "Bearer crl_" + "B" * 43}
            assert (await local.get("/metrics", headers=bad)).status_code == 401
            # The allow list opens /metrics only.
            assert (
                await local.post("/graphql", json={"query": "{ me { name } }"})
            ).status_code == 401


# -- roles: every mutation and every secret-bearing field -------------------------------


def sample_value(type_: GraphQLInputType) -> Any:
    """A well-typed value for an argument (validation must pass: the role is refused)."""
    if isinstance(type_, GraphQLNonNull):
        return sample_value(type_.of_type)
    if isinstance(type_, GraphQLList):
        return []
    if isinstance(type_, GraphQLEnumType):
        return next(iter(type_.values))
    if isinstance(type_, GraphQLInputObjectType):
        return {
            name: sample_value(field.type)
            for name, field in type_.fields.items()
            if isinstance(field.type, GraphQLNonNull)
        }
    assert isinstance(type_, GraphQLScalarType)
    samples = {
        "ID": str(encode_id("Profile", 1)),
        "String": "sample",
        "Int": 1,
        "Float": 1.0,
        "Boolean": False,
        "JSON": {},
        "DateTime": "2099-01-01T00:00:00+00:00",
    }
    return samples[type_.name]


def mutation_operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(field, operation, variables) for every Mutation field of the schema."""
    mutation_type = SCHEMA._schema.mutation_type
    assert mutation_type is not None
    operations = []
    for name, field in mutation_type.fields.items():
        declared = ", ".join(f"${arg}: {spec.type}" for arg, spec in field.args.items())
        passed = ", ".join(f"{arg}: ${arg}" for arg in field.args)
        head = f"mutation({declared})" if declared else "mutation"
        query = f"{head} {{ {name}{f'({passed})' if passed else ''} {{ __typename }} }}"
        variables = {arg: sample_value(spec.type) for arg, spec in field.args.items()}
        operations.append((name, query, variables))
    return operations


def test_every_mutation_field_is_enumerated() -> None:
    names = {name for name, _query, _variables in mutation_operations()}
    assert {"createProfile", "runCommand", "createApiToken", "revokeApiToken"} <= names
    assert len(names) > 20


async def viewer_client(app: Starlette, client: httpx.AsyncClient) -> GraphQLClient:
    token = await issue_api_token(app, role="viewer", name="viewer")
    http = httpx.AsyncClient(
        transport=client._transport, base_url="http://localhost", headers=bearer(token)
    )
    return GraphQLClient(http)


async def test_a_viewer_is_refused_every_mutation_with_no_effect(
    app: Starlette, client: httpx.AsyncClient, gql: GraphQLClient
) -> None:
    viewer = await viewer_client(app, client)
    for name, query, variables in mutation_operations():
        body = await viewer.raw(query, **variables)
        assert body["data"] is None, name
        assert len(body["errors"]) == 1, (name, body)
        error = body["errors"][0]
        assert error["extensions"]["code"] == "FORBIDDEN", (name, body)
        assert "viewer role may not run mutations" in error["message"]
    # Valid input too, and nothing was written.
    body = await viewer.raw('mutation { createProfile(input: {name: "p"}) { profile { id } } }')
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    async with app.state.services.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Profile)) == 0
    # Each refusal is on record (the audit log wraps the role check).
    audit = await gql('{ auditEvents(first: 5, action: "createProfile") { nodes { outcome } } }')
    assert {node["outcome"] for node in audit["auditEvents"]["nodes"]} == {"denied"}
    # The same operation by an admin goes through (the refusal is the role's).
    made = await gql('mutation { createProfile(input: {name: "p"}) { profile { name } } }')
    assert made["createProfile"]["profile"] == {"name": "p"}


SERVICE_TOKEN = "ghp_secretsecretsecret1234"
LINK_TOKEN = "ghp_linklinklinklinklink9876"
# One query per secret-bearing field: a field declared with `secret_field` and missing here
# fails `test_the_secret_fields_are_the_declared_ones`.
SECRET_QUERIES = {
    ("Service", "tokenPreview"): ("{ services { nodes { tokenPreview } } }", "ghp_…1234"),
    ("ProfileServiceLink", "tokenPreview"): (
        "{ profiles { nodes { services { tokenPreview } } } }",
        "ghp_…9876",
    ),
    ("ApiToken", "preview"): ("{ apiTokens { nodes { preview } } }", "crl_"),
}


def test_the_secret_fields_are_the_declared_ones() -> None:
    assert secret_fields(SCHEMA) == set(SECRET_QUERIES)


async def test_a_viewer_is_refused_every_secret_field(
    app: Starlette, client: httpx.AsyncClient, gql: GraphQLClient
) -> None:
    service = await gql(
        'mutation($t: String) { createService(input: {name: "gh", envVar: "GH_TOKEN", '
        "token: $t}) { service { id } } }",
        t=SERVICE_TOKEN,
    )
    profile = await gql('mutation { createProfile(input: {name: "p"}) { profile { id } } }')
    linked = await gql(
        "mutation($p: ID!, $s: ID!, $t: String) { linkService(input: "
        "{profileId: $p, serviceId: $s, token: $t}) { userErrors { message } } }",
        p=profile["createProfile"]["profile"]["id"],
        s=service["createService"]["service"]["id"],
        t=LINK_TOKEN,
    )
    assert linked["linkService"]["userErrors"] == []
    viewer = await viewer_client(app, client)
    for (type_name, field), (query, shown) in SECRET_QUERIES.items():
        body = await viewer.raw(query)
        assert body["errors"], (type_name, field)
        assert {error["extensions"]["code"] for error in body["errors"]} == {"FORBIDDEN"}
        assert all(error["path"][-1] == field for error in body["errors"])
        assert f"read {type_name}.{field}" in body["errors"][0]["message"]
        assert shown not in json.dumps(body["data"], ensure_ascii=False)
        assert shown in json.dumps(await gql(query), ensure_ascii=False)  # an admin reads it
    # The rest of the object stays readable to the viewer.
    readable = await viewer("{ services { nodes { name hasToken envVar } } }")
    assert readable["services"]["nodes"] == [{"name": "gh", "hasToken": True, "envVar": "GH_TOKEN"}]


# -- WebSockets (graphql-transport-ws, a real uvicorn) ----------------------------------


@contextlib.asynccontextmanager
async def socket(
    live: LiveServer, headers: dict[str, str] | None = None, origin: str | None = None
) -> AsyncIterator[ClientConnection]:
    async with connect(
        live.ws_url,
        subprotocols=[Subprotocol("graphql-transport-ws")],
        additional_headers=headers,
        origin=None if origin is None else Origin(origin),
        open_timeout=10,
    ) as ws:
        yield ws


async def init(ws: ClientConnection, payload: Any) -> None:
    await ws.send(json.dumps({"type": "connection_init", "payload": payload}))


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason, once the server closes (no message before it)."""
    try:
        async with asyncio.timeout(WS_TIMEOUT):
            message = await ws.recv()
    except ConnectionClosed as closed:
        frame = closed.rcvd
        assert frame is not None
        return frame.code, frame.reason
    raise AssertionError(f"a message instead of a close: {message!r}")


async def acked(ws: ClientConnection) -> bool:
    message = json.loads(await ws.recv())
    return bool(message == {"type": "connection_ack"})


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveServer]:
    async with running_server(settings) as server:
        yield server


async def test_websocket_connection_init_without_or_with_bad_credentials_closes_4401(
    live: LiveServer,
) -> None:
    revoked = await revoked_token(live.app)
    for payload in (
        {},
        None,
        {"authorization": "Bearer crl_" + "C" * 43},
        {"authorization": "Bearer"},
        {"authorization": f"Basic {live.app.state.admin_token}"},
        {"authorization": 42},
        {"authorization": f"Bearer {revoked}"},
    ):
        async with socket(live) as ws:
            await init(ws, payload if payload is not None else {})
            assert await closed_with(ws) == (4401, "Unauthorized"), payload
    # A bad Authorization header on the handshake is no credential either.
    async with socket(live, headers={"Authorization": "Bearer crl_nope_nope_nope_nope"}) as ws:
        await init(ws, {})
        assert await closed_with(ws) == (4401, "Unauthorized")


async def test_websocket_subscribe_before_connection_init_closes_4401(live: LiveServer) -> None:
    async with socket(live) as ws:
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "{ me { name } }"}})
        )
        assert await closed_with(ws) == (4401, "Unauthorized")


async def test_a_viewer_token_subscribes_to_logs_and_events_but_runs_no_mutation(
    live: LiveServer,
) -> None:
    viewer = await issue_api_token(live.app, role="viewer", name="watcher")
    async with (
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
        socket(live) as raw,
    ):
        await init(raw, {"authorization": f"Bearer {viewer}"})
        assert await acked(raw)
        ws = GraphQLSocket(raw)
        await ws.subscribe("me", "{ me { name role kind } }")
        me = await ws.until_complete("me")
        assert me == [{"me": {"name": "watcher", "role": "VIEWER", "kind": "token"}}]
        await ws.subscribe("events", COMMAND_EVENTS)
        await wait_subscribers(http, 1)
        command_id = await run_command(GraphQLClient(http), "sh -c 'echo one; echo two'")
        statuses = []
        while "SUCCEEDED" not in statuses:
            message = await ws.receive()
            assert message["id"] == "events", message
            event = message["payload"]["data"]["commandEvents"]
            assert event["command"]["id"] == command_id
            statuses.append(event["status"])
        await ws.send({"id": "events", "type": "complete"})
        await ws.subscribe("logs", COMMAND_LOGS, id=command_id)
        texts = [data["commandLogs"]["text"] for data in await ws.until_complete("logs")]
        assert "one" in texts
        assert "two" in texts
        await ws.subscribe(
            "run", 'mutation { createProfile(input: {name: "x"}) { profile { id } } }'
        )
        message = await ws.receive()
        assert message["id"] == "run"
        errors = message["payload"]["errors"] if message["type"] == "next" else message["payload"]
        assert [error["extensions"]["code"] for error in errors] == ["FORBIDDEN"]


async def test_a_token_revoked_during_a_websocket_connection_closes_it_at_its_next_subscribe(
    live: LiveServer,
) -> None:
    token = await issue_api_token(live.app, role="viewer", name="short-lived")
    async with socket(live) as raw:
        await init(raw, {"authorization": f"Bearer {token}"})
        assert await acked(raw)
        ws = GraphQLSocket(raw)
        await ws.subscribe("1", "{ me { name } }")
        assert await ws.until_complete("1") == [{"me": {"name": "short-lived"}}]
        async with live.app.state.services.sessionmaker() as session:
            await session.execute(
                update(ApiToken).where(ApiToken.name == "short-lived").values(revoked_at=utcnow())
            )
            await session.commit()
        await ws.subscribe("2", "{ me { name } }")
        assert await closed_with(raw) == (4401, "Unauthorized")


async def test_websocket_handshake_credentials_and_a_session_cookie_from_our_own_origin(
    live: LiveServer,
) -> None:
    async with socket(live, headers=live.headers) as ws:  # a non-browser client's header
        await init(ws, {})
        assert await acked(ws)
    cookie = await session_cookie(live.app)
    async with socket(live, headers={"Cookie": cookie}, origin=live.base_url) as ws:
        await init(ws, {})
        assert await acked(ws)
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "{ me { kind } }"}})
        )
        assert json.loads(await ws.recv())["payload"]["data"] == {"me": {"kind": "user"}}


async def session_cookie(app: Starlette) -> str:
    """A logged-in admin's session cookie, as the login page would set it."""
    services = app.state.services
    async with services.sessionmaker() as session:
        user = await create_user(session, "ann", "correct horse battery", "admin")
        _row, raw_id = await start_session(session, services.token_hasher, user, "127.0.0.1")
        await session.commit()
    return f"corral_session={app.state.authenticator.cookie_value(raw_id)}"
