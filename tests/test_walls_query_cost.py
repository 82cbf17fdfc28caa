"""Walls (issue 10): a query's cost, its text and its response are bounded.

30 profiles x 30 proxies, every pair linked: a query that walks profiles > proxies >
profiles > ... stays within the depth and alias limits but asks for 30^n objects. It must be
refused before it runs (its cost in the error) while the server stays responsive; a normal
query still passes; `first:` (literal or variable) sets the cost; the query text and the
response have a size limit. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from graphql_schema.schema import build_schema, query_limits
from server.app_services import AppServices
from server.models import Profile, ProfileProxy, Proxy
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client, connection_init
from tests.fixtures.commands import FINAL, run, wait_status
from tests.fixtures.graphql_api import SNAPSHOT
from tests.fixtures.servers import LiveServer, running_server
from tests.test_dataloaders import NESTED

MESH = 30  # profiles, and proxies; every profile linked to every proxy


def walk(levels: int, leaf: str = "id") -> str:
    """profiles > proxies > profiles > ... (`levels` lists below the connection)."""
    fields = ["proxies", "profiles"] * levels
    inner = leaf
    for name in reversed(fields[:levels]):
        inner = f"{name} {{ {inner} }}"
    return "{ profiles { edges { node { " + inner + " } } } }"


# Depth 12 is the default limit: profiles > edges > node > 8 lists > id is 12 levels.
AMPLIFICATION = walk(8)

# What the tests and the panel ask for (SNAPSHOT: every object and relation), and
# 500 profiles with their services and proxies (NESTED) come from those tests' files.

TWO_LEVELS = """query($n: Int) { profiles(first: $n) { nodes { name proxies { name
  profiles { name } } } } }"""


async def seed_mesh(app: Starlette, count: int = MESH) -> None:
    """`count` profiles and `count` proxies, every profile attached to every proxy."""
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        profiles = [Profile(name=f"profile-{n:03d}") for n in range(count)]
        proxies = [
            Proxy(name=f"proxy-{n:03d}", protocol="socks5", host="10.0.0.1", port=1000 + n)
            for n in range(count)
        ]
        session.add_all([*profiles, *proxies])
        await session.flush()
        session.add_all(
            ProfileProxy(profile_id=profile.id, proxy_id=proxy.id, is_default=n == 0)
            for profile in profiles
            for n, proxy in enumerate(proxies)
        )
        await session.commit()


@pytest.fixture
def loop_deadline(request: pytest.FixtureRequest) -> Any:
    """`with loop_deadline(seconds):` ends the test process when the event loop stays
    blocked past `seconds`. These servers share the test's loop: the amplification query,
    if it ran, would hold it for hours and take gigabytes, no asyncio timeout can fire
    meanwhile, and an exception would only hand the loop back to the query's other tasks
    (at teardown). So: say why, and exit."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    @contextlib.contextmanager
    def deadline(seconds: float) -> Iterator[None]:
        def expire(_signum: int, _frame: Any) -> None:
            if capture is not None:
                capture.suspend_global_capture(in_=True)
            print(
                f"\n{request.node.nodeid}: FAILED: the event loop was blocked for more "
                f"than {seconds} s; exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(3)

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return deadline


def refusal(body: dict[str, Any], code: str) -> dict[str, Any]:
    """The one error of a refused operation (no data), with its extensions."""
    assert body.get("data") is None, body
    errors = body["errors"]
    assert len(errors) == 1, errors
    assert errors[0]["extensions"]["code"] == code, errors
    assert "Traceback" not in errors[0]["message"]
    return dict(errors[0])


def cost_of(query: str, **variables: Any) -> int:
    """The cost the default settings give `query` (the same function the server uses)."""
    from graphql import parse

    schema = build_schema()
    limits = query_limits(Settings())
    return limits.cost_model.operation_cost(schema._schema, parse(query), None, variables)


# -- cost ------------------------------------------------------------------------------------


async def test_the_amplification_query_is_refused_with_its_cost(
    app: Starlette, gql: GraphQLClient, loop_deadline: Any
) -> None:
    await seed_mesh(app)
    started = time.perf_counter()
    with loop_deadline(60):
        body = await gql.raw(AMPLIFICATION)
    elapsed = time.perf_counter() - started
    error = refusal(body, "QUERY_TOO_COSTLY")
    budget, per_list = Settings().graphql_max_cost, Settings().graphql_cost_list_size
    # the connection, 50 edges and nodes, then 8 nested lists of `per_list` items each
    cost = 1 + 50 * (2 + sum(per_list**k for k in range(1, 9)))
    assert error["extensions"]["cost"] == cost == cost_of(AMPLIFICATION)
    assert error["extensions"]["budget"] == budget
    assert f"costs {cost}" in error["message"]
    assert f"budget of {budget}" in error["message"]
    assert elapsed < 2.0  # refused before it ran (it would take minutes and gigabytes)


async def test_fragments_cost_what_their_fields_cost(
    app: Starlette, gql: GraphQLClient, loop_deadline: Any
) -> None:
    await seed_mesh(app)
    through_fragments = """
    query { profiles { edges { node { ...P } } } }
    fragment P on Profile { proxies { ...X } }
    fragment X on Proxy { profiles { ... on Profile { proxies { ...Y } } } }
    fragment Y on Proxy { profiles { proxies { profiles { proxies { id } } } } }
    """
    assert cost_of(through_fragments) == cost_of(walk(7)) > Settings().graphql_max_cost
    with loop_deadline(60):
        error = refusal(await gql.raw(through_fragments), "QUERY_TOO_COSTLY")
    assert error["extensions"]["cost"] == cost_of(walk(7))
    # a cycle of fragments is invalid: a validation error, not a recursion
    cycle = (
        "{ profiles { nodes { ...A } } } fragment A on Profile { proxies { profiles { ...A } } }"
    )
    body = await gql.raw(cycle)
    assert body.get("data") is None
    assert "Cannot spread fragment 'A' within itself" in body["errors"][0]["message"]


async def test_normal_queries_pass(app: Starlette, gql: GraphQLClient) -> None:
    await seed_mesh(app, 5)
    budget = Settings().graphql_max_cost
    assert cost_of(SNAPSHOT) < budget // 10
    assert cost_of(NESTED, first=500) < budget
    assert cost_of(TWO_LEVELS) < budget // 5
    data = await gql(SNAPSHOT)
    assert data["profiles"]["totalCount"] == 5
    data = await gql(NESTED, first=500)
    assert len(data["profiles"]["edges"]) == 5
    data = await gql(TWO_LEVELS)
    assert len(data["profiles"]["nodes"][0]["proxies"][0]["profiles"]) == 5


async def test_first_sets_the_cost_literal_or_variable(app: Starlette, gql: GraphQLClient) -> None:
    await seed_mesh(app, 5)
    per_list = Settings().graphql_cost_list_size
    per_profile = 1 + per_list * (1 + per_list)  # the node, its proxies, their profiles
    assert cost_of(TWO_LEVELS, n=1) == 1 + per_profile
    data = await gql(TWO_LEVELS, n=1)
    assert len(data["profiles"]["nodes"]) == 1
    error = refusal(await gql.raw(TWO_LEVELS, n=1000), "QUERY_TOO_COSTLY")
    assert error["extensions"]["cost"] == 1 + 1000 * per_profile > Settings().graphql_max_cost
    # the same through a variable's default and through a literal
    with_default = TWO_LEVELS.replace("$n: Int", "$n: Int = 1000")
    assert refusal(await gql.raw(with_default), "QUERY_TOO_COSTLY")["extensions"]["cost"] == (
        1 + 1000 * per_profile
    )
    literal = TWO_LEVELS.replace("($n: Int)", "").replace("first: $n", "first: 2")
    assert len((await gql(literal))["profiles"]["nodes"]) == 2
    # a `first` over the page limit counts as the limit: the resolver's error says why
    body = await gql.raw("query($n: Int) { profiles(first: $n) { nodes { name } } }", n=10**9)
    assert body["errors"][0]["message"].startswith("first must be between 0 and")


async def test_lists_longer_than_assumed_are_counted_as_they_come(
    app: Starlette, gql: GraphQLClient
) -> None:
    # Within budget as estimated (lists without `first` count 5 items), but these have 30:
    # 30 profiles x 30 proxies x 30 profiles.
    await seed_mesh(app)
    query = "{ profiles(first: $n) { nodes { name proxies { name profiles { name } } } } }"
    query = "query($n: Int) " + query
    assert cost_of(query, n=30) < Settings().graphql_max_cost
    started = time.perf_counter()
    error = refusal(await gql.raw(query, n=30), "QUERY_TOO_COSTLY")
    elapsed = time.perf_counter() - started
    counted, budget = error["extensions"]["cost"], error["extensions"]["budget"]
    assert budget == Settings().graphql_max_cost < counted < budget + 2 * MESH
    assert f"reached {counted} objects" in error["message"]
    assert elapsed < 10.0
    # 10 profiles: 10 x 30 + 300 x 30 = 9,300 items, within the budget
    data = await gql(query, n=10)
    assert sum(len(proxy["profiles"]) for proxy in data["profiles"]["nodes"][0]["proxies"]) == 900


async def test_a_budget_setting_is_obeyed(settings: Settings) -> None:
    app = _app(settings.model_copy(update={"graphql_max_cost": 100}))
    async with app.router.lifespan_context(app), _gql(app) as gql:
        assert (await gql("{ profiles(first: 99) { nodes { name } } }"))["profiles"]
        error = refusal(
            await gql.raw("{ profiles(first: 100) { nodes { name } } }"), "QUERY_TOO_COSTLY"
        )
        assert error["extensions"] == {"code": "QUERY_TOO_COSTLY", "cost": 101, "budget": 100}


async def test_healthz_stays_fast_while_the_amplification_query_is_refused(
    settings: Settings, loop_deadline: Any
) -> None:
    async with running_server(settings, embedded_runner=False) as live:
        await seed_mesh(live.app)
        async with httpx.AsyncClient(
            base_url=live.base_url, headers=live.headers, timeout=60
        ) as http:
            latencies: list[float] = []
            stop = asyncio.Event()

            async def probe() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    response = await http.get("/healthz")
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200
                    await asyncio.sleep(0.02)

            prober = asyncio.create_task(probe())
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            with loop_deadline(60):
                bodies = await asyncio.gather(*(_post(http, AMPLIFICATION) for _ in range(5)))
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.2)
            stop.set()
            await prober
        for body in bodies:
            refusal(body, "QUERY_TOO_COSTLY")
        assert elapsed < 3.0, elapsed
        assert len(latencies) >= 5, latencies
        assert max(latencies) < 1.0, latencies


# -- query size --------------------------------------------------------------------------------


def padded(query: str, size: int) -> str:
    """`query` after a comment that makes the text `size` bytes long."""
    return "#" + "x" * (size - len(query) - 2) + "\n" + query


async def test_a_query_over_the_size_limit_is_refused_before_parsing(gql: GraphQLClient) -> None:
    limit = Settings().graphql_max_query_bytes
    query = "{ profiles { totalCount } }"
    assert (await gql(padded(query, limit)))["profiles"]["totalCount"] == 0
    error = refusal(await gql.raw(padded(query, limit + 1)), "QUERY_TOO_LARGE")
    assert error["extensions"] == {"code": "QUERY_TOO_LARGE", "size": limit + 1, "limit": limit}
    assert str(limit) in error["message"]
    # counted in bytes: 2-byte characters fill the limit at half the length
    assert refusal(await gql.raw("#" + "é" * (limit // 2) + "\n" + query), "QUERY_TOO_LARGE")
    # never parsed: a syntax error past the limit is not reported, the size is
    broken = "{" * (limit * 4)
    assert refusal(await gql.raw(broken), "QUERY_TOO_LARGE")["extensions"]["size"] == limit * 4
    # a named operation keeps its name (no "unknown operation" error instead)
    named = padded("query Named { profiles { totalCount } }", limit + 10)
    body = (await gql.http.post("/graphql", json={"query": named, "operationName": "Named"})).json()
    refusal(body, "QUERY_TOO_LARGE")


async def test_syntax_errors_are_still_reported(gql: GraphQLClient) -> None:
    body = await gql.raw("{ profiles { totalCount }")
    assert body.get("data") is None
    assert body["errors"][0]["message"].startswith("Syntax Error")


async def test_the_size_limit_holds_over_websocket(settings: Settings) -> None:
    limit = settings.graphql_max_query_bytes
    async with running_server(settings, embedded_runner=False) as live, _socket(live) as ws:
        query = padded("subscription { commandEvents { status } }", limit + 100)
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message["type"] == "error", message
        assert message["payload"][0]["extensions"]["code"] == "QUERY_TOO_LARGE"
        # the connection is still good for the next operation
        small = "{ profiles { totalCount } }"
        await ws.send(json.dumps({"id": "2", "type": "subscribe", "payload": {"query": small}}))
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message == {
            "id": "2",
            "type": "next",
            "payload": {"data": {"profiles": {"totalCount": 0}}},
        }


async def test_a_syntax_error_over_websocket_is_reported_not_logged_as_a_crash(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(settings, embedded_runner=False) as live, _socket(live) as ws:
        broken = {"query": "{ profiles { totalCount }"}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": broken}))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.recv(), 10)
        # graphql-transport-ws: a syntax error closes the socket with 4400 and the reason
        assert ws.close_code == 4400
        assert "Syntax Error" in (ws.close_reason or "")
    assert "Exception in worker task" not in caplog.text


# -- response size -----------------------------------------------------------------------------


async def test_a_response_over_the_size_limit_is_replaced_by_an_error(settings: Settings) -> None:
    app = _app(settings.model_copy(update={"graphql_max_response_bytes": 4096}))
    async with app.router.lifespan_context(app), _gql(app) as gql:
        create = """mutation($input: CreateProfileInput!) {
          createProfile(input: $input) { profile { id } userErrors { message } } }"""
        for n in range(5):
            await gql(create, input={"name": f"p{n}", "notes": "n" * 1000})
        two = await gql("{ profiles(first: 2) { nodes { notes } } }")
        assert len(json.dumps(two)) < 4096
        error = refusal(
            await gql.raw("{ profiles(first: 5) { nodes { notes } } }"), "RESPONSE_TOO_LARGE"
        )
        assert error["extensions"]["limit"] == 4096
        assert error["extensions"]["size"] > 4096
        assert "4096" in error["message"]


async def test_a_log_page_stops_reading_once_past_the_response_limit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphql_schema import log_messages as command_types

    converted: list[Any] = []
    from_row = command_types.LogLine.from_row

    def counted_from_row(row: Any) -> command_types.LogLine:
        converted.append(row)
        return from_row(row)

    monkeypatch.setattr(command_types.LogLine, "from_row", counted_from_row)
    app = _app(settings.model_copy(update={"graphql_max_response_bytes": 4096}))
    async with app.router.lifespan_context(app), _gql(app) as gql:
        script = "[print(str(i) * 1000) for i in range(40)]"
        command_id = await run(gql, commandString=f'python3 -c "{script}"')
        await wait_status(gql, command_id, FINAL)
        query = "query($id: ID!) { node(id: $id) { ... on Command { logs { text } } } }"
        body = await gql.raw(query, id=command_id)
    assert body["errors"][0]["extensions"]["code"] == "RESPONSE_TOO_LARGE"
    assert not body.get("data") or body["data"]["node"] is None
    assert len(converted) < 8  # 4 lines of 1000 characters, not the 40 (or 10,000) stored


async def test_a_subscription_event_over_the_size_limit_is_replaced_by_an_error(
    settings: Settings,
) -> None:
    script = "print('x' * 3000); print('short')"
    async with (
        running_server(settings, graphql_max_response_bytes=2048) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        api = GraphQLClient(http)
        command_id = await run(api, commandString=f'python3 -c "{script}"')
        await wait_status(api, command_id, FINAL)
        async with _socket(live) as ws:
            query = """subscription($id: ID!) { commandLogs(commandId: $id) { stream text } }"""
            payload = {"query": query, "variables": {"id": command_id}}
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
            events = []
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != (
                "complete"
            ):
                assert message["type"] == "next", message
                events.append(message["payload"])
    texts = [event["data"]["commandLogs"]["text"] for event in events if event.get("data")]
    assert "short" in texts  # the events after the large one still come
    assert not any(text.startswith("xxx") for text in texts)
    [capped] = [event for event in events if event.get("errors")]
    assert capped["data"] is None
    assert capped["errors"][0]["extensions"]["code"] == "RESPONSE_TOO_LARGE"
    assert capped["errors"][0]["extensions"]["limit"] == 2048


async def test_each_subscription_event_has_the_whole_budget(settings: Settings) -> None:
    # Events of commands with 3 services each: 3 objects an event, within a budget of 4
    # (the estimate counts lists as 1 item) however many events come.
    async with (
        running_server(settings, graphql_max_cost=4, graphql_cost_list_size=1) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        api = GraphQLClient(http)
        create = """mutation($input: CreateServiceInput!) {
          createService(input: $input) { service { id } userErrors { message } } }"""
        services = [
            (await api(create, input={"name": f"s{n}", "envVar": f"S{n}", "token": f"tok-{n}"}))[
                "createService"
            ]["service"]["id"]
            for n in range(3)
        ]
        query = "subscription { commandEvents { status command { services { name } } } }"
        async with _socket(live) as ws:
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
            await asyncio.sleep(0.5)  # subscribed before the commands run
            for _ in range(2):
                await run(api, commandString="true", serviceIds=services)
            events: list[dict[str, Any]] = []
            while len(events) < 4:
                message = json.loads(await asyncio.wait_for(ws.recv(), 20))
                assert message["type"] == "next", message
                assert "errors" not in message["payload"], message
                events.append(message["payload"]["data"]["commandEvents"])
    assert all(len(event["command"]["services"]) == 3 for event in events)


# -- helpers -----------------------------------------------------------------------------------


def _app(settings: Settings) -> Starlette:
    from server.app import create_app

    return create_app(settings)


@contextlib.asynccontextmanager
async def _gql(app: Starlette) -> AsyncIterator[GraphQLClient]:
    async with admin_client(app) as http:
        yield GraphQLClient(http)


async def _post(http: httpx.AsyncClient, query: str) -> dict[str, Any]:
    response = await http.post("/graphql", json={"query": query})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@contextlib.asynccontextmanager
async def _socket(live: LiveServer) -> AsyncIterator[Any]:
    async with connect(
        live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=10
    ) as ws:
        await ws.send(json.dumps(connection_init(live.app)))
        assert json.loads(await ws.recv()) == {"type": "connection_ack"}
        yield ws
