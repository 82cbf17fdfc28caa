"""API tokens: made, used, listed and revoked over GraphQL and with `corral token`; roles."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from graphql_schema.context import Context
from graphql_schema.relay import encode_id
from graphql_schema.schema import build_schema
from server.app_services import AppServices, client_key
from server.auth import TOKEN_PREFIX, Principal
from server.cli import main
from server.models import ApiToken, Role, utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer, issue_api_token

CREATE = """
mutation($input: CreateApiTokenInput!) {
  createApiToken(input: $input) {
    plaintext
    apiToken { id name role preview createdBy createdAt expiresAt lastUsedAt revokedAt active }
    userErrors { field message code }
  }
}"""
REVOKE = """
mutation($id: ID!) {
  revokeApiToken(id: $id) { apiToken { id revokedAt active } userErrors { field message code } }
}"""
LIST = """
{ apiTokens { totalCount nodes { id name role preview createdBy lastUsedAt revokedAt active } } }"""
ME = "{ me { name role kind } }"


def as_token(client: httpx.AsyncClient, token: str) -> GraphQLClient:
    """A GraphQL client of the same app that sends `token` instead of the admin's."""
    http = httpx.AsyncClient(
        transport=client._transport, base_url="http://localhost", headers=bearer(token)
    )
    return GraphQLClient(http)


async def create_token(gql: GraphQLClient, **values: Any) -> dict[str, Any]:
    payload: dict[str, Any] = (await gql(CREATE, input=values))["createApiToken"]
    return payload


async def test_a_created_token_is_shown_once_and_then_only_as_a_preview(
    gql: GraphQLClient, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    payload = await create_token(gql, name="ci", role="VIEWER")
    assert payload["userErrors"] == []
    plaintext = payload["plaintext"]
    assert plaintext.startswith(TOKEN_PREFIX)
    assert len(plaintext) > 40
    token = payload["apiToken"]
    assert token["name"] == "ci"
    assert token["role"] == "VIEWER"
    assert token["active"] is True
    assert token["preview"] == f"{plaintext[:8]}…{plaintext[-4:]}"
    assert token["lastUsedAt"] is None
    assert token["revokedAt"] is None

    listed = (await gql(LIST))["apiTokens"]
    assert listed["totalCount"] == 2  # with the fixture's admin token
    assert plaintext not in str(listed)
    mine = next(node for node in listed["nodes"] if node["id"] == token["id"])
    assert mine["preview"] == token["preview"]
    node = await gql(
        "query($id: ID!) { node(id: $id) { ... on ApiToken { name } } }", id=mine["id"]
    )
    assert node["node"] == {"name": "ci"}
    assert plaintext not in caplog.text


async def test_a_token_authenticates_and_its_use_is_recorded(
    gql: GraphQLClient, client: httpx.AsyncClient
) -> None:
    payload = await create_token(gql, name="reader")
    assert payload["apiToken"]["role"] == "VIEWER"  # the default role
    reader = as_token(client, payload["plaintext"])
    assert (await reader(ME))["me"] == {"name": "tests", "role": "VIEWER", "kind": "token"}
    assert (await gql(ME))["me"]["role"] == "ADMIN"
    listed = (await gql(LIST))["apiTokens"]["nodes"]
    used = next(node for node in listed if node["id"] == payload["apiToken"]["id"])
    assert used["lastUsedAt"] is not None
    assert used["createdBy"] == "tests"


async def test_a_revoked_token_is_refused_at_its_next_request(
    gql: GraphQLClient, client: httpx.AsyncClient
) -> None:
    payload = await create_token(gql, name="doomed", role="ADMIN")
    doomed = as_token(client, payload["plaintext"])
    assert (await doomed(ME))["me"]["role"] == "ADMIN"
    revoked = (await gql(REVOKE, id=payload["apiToken"]["id"]))["revokeApiToken"]
    assert revoked["userErrors"] == []
    assert revoked["apiToken"]["active"] is False
    assert revoked["apiToken"]["revokedAt"]
    response = await doomed.http.post("/graphql", json={"query": ME})
    assert response.status_code == 401
    assert payload["plaintext"] not in response.text
    again = (await gql(REVOKE, id=payload["apiToken"]["id"]))["revokeApiToken"]
    assert again["apiToken"]["revokedAt"] == revoked["apiToken"]["revokedAt"]  # a no-op


async def test_bad_input_is_a_user_error(gql: GraphQLClient) -> None:
    past = (utcnow() - timedelta(minutes=1)).isoformat()
    naive_past = (utcnow() - timedelta(days=1)).replace(tzinfo=None).isoformat()
    for values, field, code in (
        ({"name": "old", "expiresAt": past}, "expiresAt", "OUT_OF_RANGE"),
        ({"name": "old", "expiresAt": naive_past}, "expiresAt", "OUT_OF_RANGE"),
        ({"name": "  "}, "name", "BLANK"),
    ):
        payload = await create_token(gql, **values)
        assert payload["plaintext"] is None
        assert payload["apiToken"] is None
        assert payload["userErrors"] == [
            {"field": [field], "message": payload["userErrors"][0]["message"], "code": code}
        ]
    assert (await gql(LIST))["apiTokens"]["totalCount"] == 1
    for bad_id in ("nope", encode_id("Profile", 1), encode_id("ApiToken", 999)):
        errors = (await gql(REVOKE, id=bad_id))["revokeApiToken"]["userErrors"]
        assert [error["code"] for error in errors] == ["NOT_FOUND"]


async def test_a_token_with_a_future_expiry_works_until_then(
    gql: GraphQLClient, client: httpx.AsyncClient, app: Starlette
) -> None:
    future = (utcnow() + timedelta(days=1)).replace(tzinfo=None).isoformat()  # taken as UTC
    payload = await create_token(gql, name="brief", expiresAt=future)
    assert payload["userErrors"] == []
    assert payload["apiToken"]["expiresAt"].startswith(future[:16])
    brief = as_token(client, payload["plaintext"])
    assert (await brief(ME))["me"]["kind"] == "token"
    async with app.state.services.sessionmaker() as session:
        await session.execute(
            update(ApiToken)
            .where(ApiToken.name == "brief")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    assert (await brief.http.post("/graphql", json={"query": ME})).status_code == 401
    listed = (await gql(LIST))["apiTokens"]["nodes"]
    assert [node["active"] for node in listed if node["name"] == "brief"] == [False]


async def test_a_viewer_cannot_make_or_revoke_tokens(
    app: Starlette, gql: GraphQLClient, client: httpx.AsyncClient
) -> None:
    viewer = as_token(client, await issue_api_token(app, role="viewer", name="looker"))
    for query, variables in (
        (CREATE, {"input": {"name": "mine", "role": "VIEWER"}}),
        (REVOKE, {"id": encode_id("ApiToken", 1)}),
    ):
        body = await viewer.raw(query, **variables)
        assert body["data"] is None
        assert [error["extensions"]["code"] for error in body["errors"]] == ["FORBIDDEN"]
    listed = (await gql(LIST))["apiTokens"]
    assert listed["totalCount"] == 2
    assert all(node["active"] for node in listed["nodes"])
    # A viewer lists tokens, but not their previews.
    body = await viewer.raw("{ apiTokens { nodes { name role active preview } } }")
    assert [node["name"] for node in body["data"]["apiTokens"]["nodes"]] == ["tests", "looker"]
    assert {node["preview"] for node in body["data"]["apiTokens"]["nodes"]} == {None}
    assert {error["extensions"]["code"] for error in body["errors"]} == {"FORBIDDEN"}


async def test_without_a_principal_nothing_is_allowed(app: Starlette) -> None:
    # An in-process caller (the panel) that passed no principal is never taken for an admin.
    services: AppServices = app.state.services
    schema = build_schema(services.settings)
    context = Context(app=services)
    try:
        for query in (
            'mutation { createProfile(input: {name: "x"}) { profile { id } } }',
            ME,
            "{ apiTokens { nodes { preview } } }",
            "{ services { nodes { tokenPreview } } }",
        ):
            result = await schema.execute(query, context_value=context)
            codes = [(error.extensions or {}).get("code") for error in result.errors or []]
            assert codes == ["UNAUTHENTICATED"], (query, result)
            assert result.data is None
    finally:
        await context.close()
    async with services.sessionmaker() as session:
        assert (await session.scalars(select(ApiToken.name))).all() == ["tests"]


# -- subscriber limits per credential ------------------------------------------------------


def connection(address: str, principal: Principal | None) -> HTTPConnection:
    scope: dict[str, Any] = {
        "type": "http",
        "client": (address, 1234),
        "headers": [],
        "corral.principal": principal,
    }
    return HTTPConnection(scope)


def test_subscribers_count_against_the_credential_not_the_address() -> None:
    token = Principal(kind="token", name="ci", role=Role.VIEWER, user_id=3, token_id=7)
    user = Principal(kind="user", name="ann", role=Role.ADMIN, user_id=3, session_id=9)
    assert client_key(connection("10.0.0.1", token)) == "token:7"
    assert client_key(connection("10.0.0.2", token)) == "token:7"
    assert client_key(connection("10.0.0.1", user)) == "user:3"
    assert client_key(connection("10.0.0.1", None)) == "address:10.0.0.1"
    # A WebSocket's principal comes from connection_init, not from its scope.
    assert client_key(connection("10.0.0.1", None), token) == "token:7"


# -- corral token ------------------------------------------------------------------------


def corral(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["token", *args])
    out, err = capsys.readouterr()
    return code, out, err


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("CORRAL_DATA_DIR", str(settings.data_dir))
    assert settings.secret_key is not None
    monkeypatch.setenv("CORRAL_SECRET_KEY", settings.secret_key.get_secret_value())
    if settings.database_url is not None:
        monkeypatch.setenv("CORRAL_DATABASE_URL", settings.database_url)


async def test_cli_creates_lists_and_revokes_tokens(
    app: Starlette,
    settings: Settings,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_settings(monkeypatch, settings)

    def run(*args: str) -> tuple[int, str, str]:
        return corral(capsys, *args)

    code, out, err = await asyncio.to_thread(
        run, "create", "--name", "deploy", "--role", "admin", "--expires-in-days", "30"
    )
    assert code == 0, err
    plaintext = out.strip()
    assert out == plaintext + "\n"
    assert plaintext.startswith(TOKEN_PREFIX)
    assert "shown again" in err
    assert plaintext not in err
    deploy = as_token(client, plaintext)
    assert (await deploy(ME))["me"] == {"name": "cli", "role": "ADMIN", "kind": "token"}

    code, out, err = await asyncio.to_thread(run, "list")
    assert code == 0, err
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert lines[0][:5] == ["ID", "NAME", "ROLE", "STATE", "PREVIEW"]
    row = next(line for line in lines if line[1] == "deploy")
    assert row[2:4] == ["admin", "active"]
    assert row[4] == f"{plaintext[:8]}…{plaintext[-4:]}"
    assert plaintext not in out
    assert app.state.admin_token not in out

    code, out, err = await asyncio.to_thread(run, "revoke", row[0])
    assert code == 0, err
    assert "revoked" in out
    assert (await deploy.http.post("/graphql", json={"query": ME})).status_code == 401
    _code, out, _err = await asyncio.to_thread(run, "list")
    assert "\tdeploy\tadmin\trevoked\t" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "--name", " "), "name: must not be blank."),
        (("create", "--name", "x", "--expires-in-days", "0"), "--expires-in-days must be"),
        (("create", "--name", "x", "--expires-in-days", "soon"), "--expires-in-days must be"),
        (("create", "--name", "x", "--expires-in-days", "\u00b2"), "--expires-in-days must be"),
        (("create", "--name", "x", "--expires-in-days", "9" * 5000), "--expires-in-days must be"),
        (("revoke", "999"), "id: no such API token."),
        (("revoke", "abc"), "the token ID must be a number"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    use_settings(monkeypatch, settings)
    code, out, err = corral(capsys, *args)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("corral: error: ")
    assert message in err


async def test_authentication_takes_no_sqlite_write_lock(
    backend: str, settings: Settings, client: httpx.AsyncClient
) -> None:
    """Every request looks its token up: on SQLite that must not wait for the write lock
    (the runner's log writer holds it often), only the once-a-minute last-used write does."""
    if backend != "sqlite":
        pytest.skip("the write lock is SQLite's")
    first = await client.post("/graphql", json={"query": ME})  # its last use is now fresh
    assert first.status_code == 200, first.text
    lock = sqlite3.connect(
        settings.data_dir / "corral.db", timeout=30, isolation_level=None, check_same_thread=False
    )
    try:
        # Off the event loop: a write the app has under way (its runner's schedules) must be
        # able to finish while this waits for the lock, or neither could go on.
        await asyncio.to_thread(lock.execute, "BEGIN IMMEDIATE")
        response = await asyncio.wait_for(client.post("/graphql", json={"query": ME}), 3)
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    assert response.status_code == 200, response.text
    assert response.json()["data"]["me"]["kind"] == "token"
