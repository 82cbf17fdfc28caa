"""Domain actions (`server.actions.perform` + the domain functions), as the panel's routes
call them: the same role check, unit of work, broker announcements and audit events as
the same operation through GraphQL. SQLite and PostgreSQL both."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette

from graphql_schema.relay import decode_id, encode_id
from server import commands, proxies
from server.actions import Forbidden, perform
from server.app import create_app
from server.auth import Principal, find_live_token, token_principal
from server.broker import CANCEL_TOPIC, QUEUE_TOPIC, STATUS_TOPIC, StatusChange, Subscription
from server.commands import RunRequest
from server.errors import InvalidInput
from server.models import AuditEvent, Command
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client, bearer, issue_api_token
from tests.fixtures.commands import RUN, run, wait_final, wait_status
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy

ADDRESS = "127.0.0.1"  # what the in-process client's requests come from
CANCEL = """mutation($id: ID!) { cancelCommand(id: $id) {
  command { id status } userErrors { field message code } } }"""
RETRY = """mutation($id: ID!) { retryCommand(id: $id) {
  command { id status } userErrors { field message code } } }"""
CREATE_PROXY = """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
  proxy { id } userErrors { field message code } } }"""
CHECK = """mutation($id: ID!) { checkProxy(id: $id) {
  proxy { health { ok error exitIp } } userErrors { message } } }"""
HEALTH = """query($id: ID!) { node(id: $id) { ... on Proxy { health { ok error exitIp } } } }"""
SLEEPER = "sleep 30"
USER, PASSWORD = "alice", "pr0xy-Pa55word-XYZ"  # the `upstream` fixture demands them

Work = Callable[[AsyncSession], Awaitable[Any]]


@pytest.fixture
def settings(settings: Settings, site: LocalSite) -> Settings:
    return settings.model_copy(
        update={"proxy_check_url": f"{site.url}/ip", "kill_grace_seconds": 0.5}
    )


async def principal_of(app: Starlette, token: str) -> Principal:
    """Who a request with `token` acts as (as the access middleware finds it)."""
    services = app.state.services
    async with services.sessionmaker() as session:
        row = await find_live_token(session, services.token_hasher, token)
    assert row is not None
    return token_principal(row)


async def act(app: Starlette, principal: Principal, action: str, work: Work, **what: Any) -> Any:
    """Take `action` as the panel's route will."""
    return await perform(
        app.state.services, principal, action, work, client_address=ADDRESS, **what
    )


def running(app: Starlette, request: RunRequest) -> Work:
    services = app.state.services

    async def work(session: AsyncSession) -> Command:
        return await commands.run_command(
            session, services.settings, services.secret_box, services.render_pool, request
        )

    return work


async def audit_rows(app: Starlette) -> list[dict[str, Any]]:
    """Every audit event, oldest first, without its row id and time."""
    async with app.state.services.sessionmaker() as session:
        rows = await session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        return [
            {
                "actor": row.actor,
                "actor_kind": row.actor_kind,
                "token_id": row.token_id,
                "action": row.action,
                "object_type": row.object_type,
                "object_id": row.object_id,
                "outcome": row.outcome,
                "detail": row.detail,
                "client_address": row.client_address,
            }
            for row in rows
        ]


async def command_count(app: Starlette) -> int:
    async with app.state.services.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(Command)) or 0)


async def next_message(subscription: Subscription) -> Any:
    return await asyncio.wait_for(subscription.get(), 10)


async def test_a_run_through_the_action_is_announced_once_committed_and_runs(
    app: Starlette, gql: GraphQLClient
) -> None:
    admin = await principal_of(app, app.state.admin_token)
    broker = app.state.services.broker
    async with broker.subscribe(QUEUE_TOPIC) as queue, broker.subscribe(STATUS_TOPIC) as status:
        inner = running(app, RunRequest(command_string="echo from-the-panel"))

        async def work(session: AsyncSession) -> Command:
            row = await inner(session)
            assert list(queue.waiting()) == []  # not before the commit
            return row  # type: ignore[no-any-return]

        row = await act(
            app, admin, "runCommand", work, object_type="Command", fields=["commandString"]
        )
        assert await next_message(queue) == row.id
        assert await next_message(status) == StatusChange(row.id, "QUEUED")

    done = await wait_final(gql, encode_id("Command", row.id))
    assert done["status"] == "SUCCEEDED", done


async def test_a_run_rolled_back_is_never_announced(app: Starlette) -> None:
    admin = await principal_of(app, app.state.admin_token)
    async with app.state.services.broker.subscribe(QUEUE_TOPIC) as queue:
        inner = running(app, RunRequest(command_string="echo never"))

        async def work(session: AsyncSession) -> Command:
            await inner(session)
            raise RuntimeError("something after the write went wrong")

        with pytest.raises(RuntimeError):
            await act(app, admin, "runCommand", work, object_type="Command")
        assert list(queue.waiting()) == []
    assert await command_count(app) == 0
    [entry] = await audit_rows(app)
    assert (entry["action"], entry["outcome"]) == ("runCommand", "error")
    assert entry["detail"] == {"fields": [], "error": "ERROR"}


async def test_a_viewer_is_refused_with_no_effect_and_audited_like_graphql(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    token = await issue_api_token(app, role="viewer", name="watcher")
    viewer = await principal_of(app, token)
    called = []

    async def work(session: AsyncSession) -> None:
        called.append(session)

    async with app.state.services.broker.subscribe(QUEUE_TOPIC) as queue:
        with pytest.raises(Forbidden, match="viewer role may not") as refused:
            await act(
                app, viewer, "runCommand", work, object_type="Command", fields=["commandString"]
            )
        assert list(queue.waiting()) == []
    assert refused.value.code == "FORBIDDEN"
    assert called == []
    assert await command_count(app) == 0

    response = await client.post(
        "/graphql",
        json={"query": RUN, "variables": {"input": {"commandString": "echo x"}}},
        headers=bearer(token),
    )
    assert response.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    through_action, through_graphql = await audit_rows(app)
    assert through_action == through_graphql
    assert through_action["actor"] == "watcher"
    assert through_action["outcome"] == "denied"
    assert through_action["detail"] == {"fields": ["commandString"], "error": "FORBIDDEN"}


async def test_an_admin_run_is_audited_like_graphql(app: Starlette, gql: GraphQLClient) -> None:
    admin = await principal_of(app, app.state.admin_token)
    request = RunRequest(command_string="echo audited")
    row = await act(
        app,
        admin,
        "runCommand",
        running(app, request),
        object_type="Command",
        fields=["commandString"],
    )
    other = await run(gql, commandString="echo audited")

    through_action, through_graphql = await audit_rows(app)
    assert through_action["object_id"] == encode_id("Command", row.id)
    assert through_graphql["object_id"] == other
    assert through_action["actor"] == "tests"
    assert through_action["outcome"] == "ok"
    for entry in (through_action, through_graphql):
        del entry["object_id"]
    assert through_action == through_graphql


def cancelling(command_id: int) -> Work:
    async def work(session: AsyncSession) -> Command:
        return await commands.cancel_command(session, command_id)

    return work


def retrying(command_id: int) -> Work:
    async def work(session: AsyncSession) -> Command:
        return await commands.retry_command(session, command_id)

    return work


async def test_cancel_and_retry_through_the_action_like_graphql(
    app: Starlette, gql: GraphQLClient
) -> None:
    admin = await principal_of(app, app.state.admin_token)
    broker = app.state.services.broker
    command_id = await run(gql, commandString=SLEEPER)
    decoded = decode_id(command_id)
    assert decoded is not None
    pk = decoded[1]
    what: dict[str, Any] = {"object_type": "Command", "object_id": pk, "fields": ["id"]}
    await wait_status(gql, command_id, {"RUNNING"})

    # An error is audited as one too (a running command cannot be retried), like GraphQL.
    with pytest.raises(InvalidInput):
        await act(app, admin, "retryCommand", retrying(pk), **what)
    assert (await gql(RETRY, id=command_id))["retryCommand"]["userErrors"][0]["code"] == "INVALID"

    async with broker.subscribe(CANCEL_TOPIC) as cancels:
        await act(app, admin, "cancelCommand", cancelling(pk), **what)
        assert await next_message(cancels) == pk  # its runner is told to stop it
    assert (await wait_final(gql, command_id))["status"] == "CANCELLED"

    async with broker.subscribe(QUEUE_TOPIC) as queue:
        row = await act(app, admin, "retryCommand", retrying(pk), **what)
        assert row.status == "QUEUED"
        assert await next_message(queue) == pk
    await wait_status(gql, command_id, {"RUNNING"})
    assert (await gql(CANCEL, id=command_id))["cancelCommand"]["userErrors"] == []
    assert (await wait_final(gql, command_id))["status"] == "CANCELLED"
    assert (await gql(RETRY, id=command_id))["retryCommand"]["userErrors"] == []
    await wait_status(gql, command_id, {"RUNNING"})
    await act(app, admin, "cancelCommand", cancelling(pk), **what)  # the end of it
    assert (await wait_final(gql, command_id))["status"] == "CANCELLED"

    rows = await audit_rows(app)
    _run, bad_retry, bad_retry_gql, cancel, retry, cancel_gql, retry_gql, _last = rows
    assert bad_retry == bad_retry_gql
    assert (bad_retry["outcome"], bad_retry["detail"]) == (
        "error",
        {"fields": ["id"], "userErrors": ["INVALID"]},
    )
    assert cancel == cancel_gql
    assert retry == retry_gql
    assert (cancel["action"], cancel["object_id"], cancel["outcome"]) == (
        "cancelCommand",
        command_id,
        "ok",
    )


async def test_a_queued_command_cancelled_through_the_action_is_announced(
    app: Starlette,
) -> None:
    admin = await principal_of(app, app.state.admin_token)
    broker = app.state.services.broker
    async with broker.subscribe(STATUS_TOPIC) as status:
        # Queued and cancelled in one unit of work: no runner can claim it in between.
        async def work(session: AsyncSession) -> Command:
            row: Command = await running(app, RunRequest(command_string=SLEEPER))(session)
            return await commands.cancel_command(session, row.id)

        row = await act(app, admin, "cancelCommand", work, object_type="Command")
        changes = [await next_message(status), await next_message(status)]
    assert changes == [StatusChange(row.id, "QUEUED"), StatusChange(row.id, "CANCELLED")]


async def test_check_proxy_through_the_action_stores_health_like_graphql(
    app: Starlette, gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    data = await gql(
        CREATE_PROXY,
        input={
            "name": "up",
            "protocol": "http",
            "host": "127.0.0.1",
            "port": upstream.port,
            "username": USER,
            "password": PASSWORD,
        },
    )
    proxy_id = data["createProxy"]["proxy"]["id"]
    decoded = decode_id(proxy_id)
    assert decoded is not None
    services = app.state.services

    async def work(session: AsyncSession) -> Any:
        return await proxies.check_proxy(
            session, services.sessionmaker, services.settings, services.secret_box, decoded[1]
        )

    admin = await principal_of(app, app.state.admin_token)
    row = await act(
        app, admin, "checkProxy", work, object_type="Proxy", object_id=decoded[1], fields=["id"]
    )
    assert (row.health_ok, row.health_exit_ip) == (True, "127.0.0.1")
    stored = (await gql(HEALTH, id=proxy_id))["node"]["health"]
    assert stored == {"ok": True, "error": None, "exitIp": "127.0.0.1"}

    checked = (await gql(CHECK, id=proxy_id))["checkProxy"]["proxy"]["health"]
    assert checked == stored
    assert [r.path for r in site.requests] == ["/ip", "/ip"]
    _create, through_action, through_graphql = await audit_rows(app)
    assert through_action == through_graphql
    assert (through_action["action"], through_action["object_id"]) == ("checkProxy", proxy_id)


async def test_a_cancel_racing_the_command_s_end_leaves_no_flag(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner claims the queued command and finishes it between the cancel's read and its
    write: the cancel is an error, and `cancelRequested` does not stay true forever."""

    async def finished_meanwhile(session: AsyncSession, row: Command) -> bool:
        await session.execute(
            update(Command).where(Command.id == row.id).values(status="SUCCEEDED")
        )
        await session.refresh(row)
        return False  # as when the conditional update found it claimed

    quiet = create_app(settings.model_copy(update={"embedded_runner": False}))
    async with quiet.router.lifespan_context(quiet), admin_client(quiet) as http:
        gql = GraphQLClient(http)
        command_id = await run(gql, commandString="true")
        monkeypatch.setattr(commands, "_cancel_unclaimed", finished_meanwhile)
        payload = (await gql(CANCEL, id=command_id))["cancelCommand"]
        assert [error["code"] for error in payload["userErrors"]] == ["INVALID"]
        async with quiet.state.services.sessionmaker() as session:
            decoded = decode_id(command_id)
            assert decoded is not None
            stored = await session.get(Command, decoded[1])
            assert stored is not None
            assert stored.cancel_requested is False
