"""Attacks on access control that once worked, each kept out by the fix beside its test."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from server import access
from server.auth import create_api_token, create_user, delete_user, session_principal, start_session
from server.cli import main
from server.models import ApiToken, AuditEvent, utcnow
from server.settings import Settings
from tests.conftest import TEST_KEY, GraphQLClient
from tests.fixtures.auth import bearer, issue_api_token
from tests.fixtures.commands import run
from tests.fixtures.servers import running_server
from tests.test_key_rotation import NEW_KEY
from tests.test_login import PASSWORD, add_user, browser_for, log_in
from tests.test_streams import COMMAND_EVENTS, GraphQLSocket
from tests.test_users_cli import query

ME = {"query": "{ me { name role kind } }"}


async def test_a_deleted_user_s_api_tokens_stop_working(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    # Before: deleting an admin ended their sessions, but a token they had made with one
    # (createApiToken) kept full admin access, under their name, after they were gone.
    services = app.state.services
    async with services.sessionmaker() as session:
        await create_user(session, "ann", "ann's long password", "admin")  # not the last
        bob = await create_user(session, "bob", "bob's long password", "admin")
        row, _raw_id = await start_session(session, services.token_hasher, bob, "127.0.0.1")
        _token, plaintext = await create_api_token(
            session,
            services.token_hasher,
            name="bob's script",
            role="admin",
            created_by=session_principal(bob, row),
        )
        _other, unrelated = await create_api_token(
            session, services.token_hasher, name="ci", role="viewer"
        )
        await session.commit()
    assert (await client.post("/graphql", json=ME, headers=bearer(plaintext))).status_code == 200

    async with services.sessionmaker() as session:
        await delete_user(session, "bob")
        await session.commit()

    refused = await client.post("/graphql", json=ME, headers=bearer(plaintext))
    assert refused.status_code == 401
    assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    # Tokens nobody in particular made (the CLI's) are not the deleted user's.
    assert (await client.post("/graphql", json=ME, headers=bearer(unrelated))).status_code == 200


async def test_a_password_typed_as_the_name_is_not_in_the_audit_log(app: Starlette) -> None:
    # Before: a failed login's name was recorded as typed, and every viewer reads the
    # audit log: a password typed into the name field (tab slip) was shown to them, forever.
    await add_user(app)
    slipped = "Tr0ub4dor&3-my-real-password"
    async with browser_for(app) as browser:
        assert (await log_in(browser, name=slipped, password="alice")).status_code == 401
        assert (await log_in(browser, name=" alice ", password="wrong guess")).status_code == 401
        for _ in range(5):  # then rate-limited: still not recorded
            await log_in(browser, name=slipped, password="x")
        assert (await log_in(browser, name="alice", password=PASSWORD)).status_code == 429
    viewer = await issue_api_token(app, role="viewer", name="viewer")
    async with browser_for(app) as http:
        query = "{ auditEvents(first: 50) { nodes { actor action outcome detail } } }"
        body = (await http.post("/graphql", json={"query": query}, headers=bearer(viewer))).json()
    events = body["data"]["auditEvents"]["nodes"]
    assert slipped not in json.dumps(body)
    logins = [(e["actor"], e["detail"]["reason"]) for e in events if e["action"] == "login"]
    assert ("alice", "wrong-password") in logins  # a user's name is kept
    assert (None, "wrong-password") in logins
    assert (None, "rate-limited") in logins


async def test_an_open_websocket_closes_once_its_token_is_revoked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the credential was checked again only at the next `subscribe`: a revoked
    # (leaked) token's live subscription to every command's events went on for as long as
    # the socket stayed open.
    monkeypatch.setattr(access, "CREDENTIAL_RECHECK_SECONDS", 0.1)
    async with running_server(settings) as live:
        token = await issue_api_token(live.app, role="viewer", name="leaked")
        async with connect(
            live.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")], open_timeout=10
        ) as raw:
            ws = GraphQLSocket(raw)
            await ws.send(
                {"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}
            )
            assert json.loads(await raw.recv()) == {"type": "connection_ack"}
            await ws.subscribe("events", COMMAND_EVENTS)
            await asyncio.sleep(0.5)  # checked again a few times: still open
            assert raw.close_code is None
            async with live.app.state.services.sessionmaker() as session:
                await session.execute(
                    update(ApiToken).where(ApiToken.name == "leaked").values(revoked_at=utcnow())
                )
                await session.commit()
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    await raw.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "Unauthorized")


def test_rotate_key_is_in_the_audit_log(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: every other CLI change was audited, but `corral rotate-key`, which rewrites
    # every stored secret, left no trace.
    for name in [name for name in os.environ if name.startswith("CORRAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(settings.data_dir))
    if settings.database_url is not None:
        monkeypatch.setenv("CORRAL_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CORRAL_SECRET_KEY", f"{NEW_KEY},{TEST_KEY}")
    assert main(["rotate-key"]) == 0
    assert "re-encrypted" in capsys.readouterr().out

    async def rotations(session: AsyncSession) -> list[AuditEvent]:
        return list(
            await session.scalars(select(AuditEvent).where(AuditEvent.action == "rotateKey"))
        )

    [event] = query(settings, rotations)
    assert (event.actor, event.actor_kind, event.outcome) == ("cli", "cli", "ok")
    assert set(event.detail["reencrypted"]) >= {"service tokens"}
    assert NEW_KEY not in json.dumps(event.detail)


async def stream_end(chunks: Any) -> str:
    """Read a response to its end: "ended" (closed properly) or "cut off" (the connection
    dropped mid-body)."""
    try:
        async for _chunk in chunks:
            pass
    except httpx.RemoteProtocolError:
        return "cut off"
    return "ended"


async def test_an_open_log_stream_ends_once_its_token_is_revoked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: an SSE log stream opened with a token went on after the token was revoked,
    # until its command ended (an hour, by default).
    monkeypatch.setattr(access, "CREDENTIAL_RECHECK_SECONDS", 0.1)
    async with running_server(settings) as live:
        async with httpx.AsyncClient(base_url=live.base_url, headers=live.headers) as admin:
            command_id = await run(GraphQLClient(admin), commandString="sleep 30")
        token = await issue_api_token(live.app, role="viewer", name="leaked")
        url = f"{live.base_url}/api/commands/{command_id}/logs/stream"
        async with (
            httpx.AsyncClient(timeout=20) as reader,
            reader.stream("GET", url, headers=bearer(token)) as response,
        ):
            assert response.status_code == 200
            chunks = response.aiter_raw()
            await anext(chunks)  # it streams
            await asyncio.sleep(0.5)  # checked again a few times: still open
            async with live.app.state.services.sessionmaker() as session:
                await session.execute(
                    update(ApiToken).where(ApiToken.name == "leaked").values(revoked_at=utcnow())
                )
                await session.commit()
            async with asyncio.timeout(10):
                assert await stream_end(chunks) in ("ended", "cut off")
        async with httpx.AsyncClient() as other:
            again = await other.get(url, headers=bearer(token))
        assert again.status_code == 401
        async with httpx.AsyncClient(base_url=live.base_url, headers=live.headers) as admin:
            await admin.post(
                "/graphql",
                json={
                    "query": "mutation($id: ID!) { cancelCommand(id: $id) { userErrors { code } } }",
                    "variables": {"id": command_id},
                },
            )


def test_a_browser_sent_to_login_with_a_query_string_of_raw_bytes() -> None:
    # Before: a query string that is not UTF-8 (obs-text bytes, which HTTP/1.1 servers may
    # pass through) raised UnicodeDecodeError on the way to the login redirect: a 500.
    from starlette.datastructures import Headers

    from server.access import unauthorised

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/runs",
        "query_string": b"page=\xff",
        "headers": [(b"accept", b"text/html")],
    }
    response = unauthorised(scope, Headers(scope=scope), refused=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=%2Fruns%3Fpage%3D")
