"""The audit log: every executed top-level mutation field is one event (who, through which
token, what, on which object, outcome, from where), written even when the mutation rolled
back, never holding an input's value; `auditEvents` pages and filters them, newest first.
SQLite and PostgreSQL both."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette

from graphql_schema.relay import encode_id
from server.models import ApiToken, AuditEvent, Profile
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer, issue_api_token

TOKEN = "ghp_" + "Au9dT0kN" * 4 + "d4d4"

EVENTS = """
query($first: Int, $after: String, $actor: String, $objectId: ID, $action: String,
      $since: DateTime) {
  auditEvents(first: $first, after: $after, actor: $actor, objectId: $objectId,
              action: $action, since: $since) {
    totalCount
    pageInfo { hasNextPage endCursor }
    nodes { id at actor actorKind tokenId action objectType objectId outcome detail
            clientAddress }
  }
}"""
CREATE_PROFILE = """
mutation($input: CreateProfileInput!) {
  createProfile(input: $input) { profile { id } userErrors { field message code } }
}"""
UPDATE_PROFILE = """
mutation($input: UpdateProfileInput!) {
  updateProfile(input: $input) { profile { id } userErrors { field message code } }
}"""
DELETE_PROFILE = """
mutation($id: ID!) { deleteProfile(id: $id) { deletedId userErrors { code } } }"""
CREATE_SERVICE = """
mutation($input: CreateServiceInput!) {
  createService(input: $input) { service { id } userErrors { code } }
}"""
UPDATE_SERVICE = """
mutation($input: UpdateServiceInput!) {
  updateService(input: $input) { service { id hasToken } userErrors { code } }
}"""


async def events(gql: GraphQLClient, **filters: Any) -> list[dict[str, Any]]:
    """The audit events matching `filters`, newest first (one page)."""
    data = await gql(EVENTS, **filters)
    nodes: list[dict[str, Any]] = data["auditEvents"]["nodes"]
    return nodes


async def token_id(app: Starlette, plaintext: str) -> str:
    """The global ID of an API token, from its plaintext."""
    services = app.state.services
    async with services.sessionmaker() as session:
        pk = await session.scalar(
            select(ApiToken.id).where(
                ApiToken.token_hash == services.token_hasher.digest(plaintext)
            )
        )
    assert pk is not None
    return str(encode_id("ApiToken", pk))


async def create_profile(gql: GraphQLClient, name: str) -> str:
    data = await gql(CREATE_PROFILE, input={"name": name})
    assert data["createProfile"]["userErrors"] == []
    return str(data["createProfile"]["profile"]["id"])


async def test_each_kind_of_mutation_is_one_event_with_actor_object_and_outcome(
    gql: GraphQLClient, app: Starlette
) -> None:
    from tests.fixtures.commands import run, wait_final

    profile = await create_profile(gql, "alice")
    await gql(UPDATE_PROFILE, input={"id": profile, "notes": "n", "tags": ["a"]})
    data = await gql(CREATE_SERVICE, input={"name": "GitHub", "envVar": "GITHUB_TOKEN"})
    service = data["createService"]["service"]["id"]
    data = await gql(UPDATE_SERVICE, input={"id": service, "token": TOKEN})
    assert data["updateService"]["service"]["hasToken"] is True
    command = await run(gql, commandString="true", profileId=profile)
    await wait_final(gql, command)
    await gql(DELETE_PROFILE, id=profile)

    found = await events(gql)  # wait_final's queries are not events
    assert [(e["action"], e["objectType"], e["objectId"], e["outcome"]) for e in found] == [
        ("deleteProfile", "Profile", profile, "ok"),
        ("runCommand", "Command", command, "ok"),
        ("updateService", "Service", service, "ok"),
        ("createService", "Service", service, "ok"),
        ("updateProfile", "Profile", profile, "ok"),
        ("createProfile", "Profile", profile, "ok"),
    ]
    admin_token = await token_id(app, app.state.admin_token)
    for event in found:
        assert event["actor"] == "tests"
        assert event["actorKind"] == "token"
        assert event["tokenId"] == admin_token
        assert event["clientAddress"] == "127.0.0.1"
    details = {event["action"]: event["detail"] for event in found}
    assert details["updateService"] == {"fields": ["id", "token"]}
    assert details["updateProfile"] == {"fields": ["id", "notes", "tags"]}
    assert details["createService"] == {"fields": ["name", "envVar"]}
    assert details["deleteProfile"] == {"fields": ["id"]}
    # runCommand's input names what was given, not the defaults the schema filled in.
    assert details["runCommand"] == {"fields": ["commandString", "profileId"]}
    assert TOKEN not in json.dumps(found)


async def test_inline_arguments_are_named_like_variables(gql: GraphQLClient) -> None:
    await gql(
        'mutation { a: createProfile(input: {name: "p1", notes: "x"}) { userErrors { code } } '
        'b: createProfile(input: {name: "p2"}) { profile { name } } }'
    )
    found = await events(gql)
    assert [(e["action"], e["detail"]) for e in found] == [
        ("createProfile", {"fields": ["name"]}),
        ("createProfile", {"fields": ["name", "notes"]}),
    ]
    # The payload's object is recorded even when the client did not ask for its id.
    assert all(e["objectType"] == "Profile" and e["objectId"] for e in found)


async def test_user_errors_make_an_error_event_on_the_id_asked_about(gql: GraphQLClient) -> None:
    missing = str(encode_id("Profile", 4242))
    data = await gql(UPDATE_PROFILE, input={"id": missing, "name": "x"})
    assert data["updateProfile"]["userErrors"][0]["code"] == "NOT_FOUND"
    data = await gql(DELETE_PROFILE, id=TOKEN)  # not an ID: a mistake, never recorded
    assert data["deleteProfile"]["userErrors"][0]["code"] == "NOT_FOUND"

    mistaken, update = await events(gql)
    assert update["outcome"] == "error"
    assert (update["objectType"], update["objectId"]) == ("Profile", missing)
    assert update["detail"] == {"fields": ["id", "name"], "userErrors": ["NOT_FOUND"]}
    assert mistaken["outcome"] == "error"
    assert mistaken["objectId"] is None
    assert mistaken["detail"] == {"fields": ["id"], "userErrors": ["NOT_FOUND"]}


async def test_a_mutation_that_rolled_back_is_on_record(
    gql: GraphQLClient, app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.profiles as profile_domain
    from server.errors import ErrorCode, InvalidInput

    real = profile_domain.create_profile

    async def written_then_refused(session: Any, *args: Any, **kwargs: Any) -> Any:
        await real(session, *args, **kwargs)  # the row is flushed in the transaction...
        raise InvalidInput.one("name", "refused after the write", ErrorCode.INVALID)

    monkeypatch.setattr(profile_domain, "create_profile", written_then_refused)
    data = await gql(CREATE_PROFILE, input={"name": "ghost"})
    assert data["createProfile"]["userErrors"][0]["code"] == "INVALID"

    async with app.state.services.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Profile)) == 0
        rows = list(await session.scalars(select(AuditEvent)))
    assert [(row.action, row.outcome, row.detail) for row in rows] == [
        ("createProfile", "error", {"fields": ["name"], "userErrors": ["INVALID"]})
    ]


async def test_a_graphql_error_is_an_error_and_forbidden_is_denied(
    gql: GraphQLClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from graphql import GraphQLError

    import server.profiles as profile_domain

    async def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the disk is on fire")

    async def forbid(*_args: Any, **_kwargs: Any) -> Any:
        raise GraphQLError("viewers cannot change profiles", extensions={"code": "FORBIDDEN"})

    profile = await create_profile(gql, "alice")
    monkeypatch.setattr(profile_domain, "update_profile", explode)
    body = await gql.raw(UPDATE_PROFILE, input={"id": profile, "notes": TOKEN})
    assert body["errors"][0]["message"] == "Unexpected error."
    monkeypatch.setattr(profile_domain, "update_profile", forbid)
    body = await gql.raw(UPDATE_PROFILE, input={"id": profile, "notes": TOKEN})
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"

    denied, failed, _created = await events(gql)
    assert (failed["outcome"], failed["objectId"]) == ("error", profile)
    assert failed["detail"] == {"fields": ["id", "notes"], "error": "ERROR"}
    assert (denied["outcome"], denied["objectId"]) == ("denied", profile)
    assert denied["detail"] == {"fields": ["id", "notes"], "error": "FORBIDDEN"}
    assert TOKEN not in json.dumps([denied, failed])
    caplog.clear()  # the unexpected error's ERROR line was the point


async def test_a_failed_audit_write_is_logged_and_the_mutation_stands(
    gql: GraphQLClient,
    app: Starlette,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import server.audit as audit_domain  # where every audit entry is written

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("audit table unavailable")

    monkeypatch.setattr(audit_domain, "record_event", broken)
    caplog.set_level(logging.INFO)
    profile = await create_profile(gql, "alice")  # no error for the client

    async with app.state.services.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(Profile)) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].name == "corral.audit"
    message = errors[0].getMessage()
    assert "createProfile" in message
    assert "tests" in message
    assert profile in message
    assert errors[0].exc_info is not None
    caplog.clear()  # the ERROR was the point; the autouse check would object


async def test_a_viewer_reads_the_audit_log_and_its_own_mutations_are_recorded(
    gql: GraphQLClient, app: Starlette, client: httpx.AsyncClient
) -> None:
    viewer = await issue_api_token(app, role="viewer", name="watcher")
    await create_profile(gql, "alice")
    viewing = GraphQLClient(client)
    viewing.http.headers.update(bearer(viewer))
    await viewing.raw(CREATE_PROFILE, input={"name": "bob"})  # allowed or denied: recorded

    latest, first = await events(viewing)
    assert (first["actor"], first["action"]) == ("tests", "createProfile")
    assert latest["actor"] == "watcher"
    assert latest["tokenId"] == await token_id(app, viewer)
    assert latest["outcome"] in {"ok", "denied"}


async def test_paging_is_newest_first_and_filters_narrow(gql: GraphQLClient) -> None:
    profiles = [await create_profile(gql, f"p{i}") for i in range(5)]
    await gql(UPDATE_PROFILE, input={"id": profiles[1], "notes": "x"})
    await gql(DELETE_PROFILE, id=profiles[1])

    data = await gql(EVENTS, first=3)
    page = data["auditEvents"]
    assert page["totalCount"] == 7
    assert page["pageInfo"]["hasNextPage"] is True
    assert [e["action"] for e in page["nodes"]] == [
        "deleteProfile",
        "updateProfile",
        "createProfile",
    ]
    assert page["nodes"][2]["objectId"] == profiles[4]
    data = await gql(EVENTS, first=3, after=page["pageInfo"]["endCursor"])
    rest = data["auditEvents"]
    assert [e["objectId"] for e in rest["nodes"]] == [profiles[3], profiles[2], profiles[1]]
    data = await gql(EVENTS, first=3, after=rest["pageInfo"]["endCursor"])
    assert [e["objectId"] for e in data["auditEvents"]["nodes"]] == [profiles[0]]
    assert data["auditEvents"]["pageInfo"]["hasNextPage"] is False

    about = await events(gql, objectId=profiles[1])
    assert [e["action"] for e in about] == ["deleteProfile", "updateProfile", "createProfile"]
    assert len(await events(gql, action="createProfile")) == 5
    assert len(await events(gql, action="createProfile", objectId=profiles[0])) == 1
    assert len(await events(gql, actor="tests")) == 7
    assert await events(gql, actor="nobody") == []
    an_hour = timedelta(hours=1)
    assert len(await events(gql, since=(datetime.now(UTC) - an_hour).isoformat())) == 7
    assert await events(gql, since=(datetime.now(UTC) + an_hour).isoformat()) == []
    # A time without a zone is UTC.
    naive = (datetime.now(UTC) + an_hour).replace(tzinfo=None).isoformat()
    assert await events(gql, since=naive) == []


async def test_an_event_is_a_node(gql: GraphQLClient) -> None:
    await create_profile(gql, "alice")
    (event,) = await events(gql)
    data = await gql(
        "query($id: ID!) { node(id: $id) { ... on AuditEvent { action outcome } } }",
        id=event["id"],
    )
    assert data["node"] == {"action": "createProfile", "outcome": "ok"}


async def test_a_mutation_whose_client_hung_up_is_on_record(
    gql: GraphQLClient, app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes away mid-mutation cancels the request: the mutation may have
    committed, so the event is written anyway (shielded), saying it was cancelled."""
    import server.profiles as profile_service

    entered = asyncio.Event()

    async def hanging(*_args: Any, **_kwargs: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(profile_service, "create_profile", hanging)
    request = asyncio.create_task(gql.raw(CREATE_PROFILE, input={"name": "gone"}))
    await asyncio.wait_for(entered.wait(), 10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    async with app.state.services.sessionmaker() as session:
        for _ in range(100):  # the shielded write finishes on its own
            rows = list(await session.scalars(select(AuditEvent)))
            if rows:
                break
            await asyncio.sleep(0.05)
    assert [(r.action, r.outcome, r.detail) for r in rows] == [
        ("createProfile", "error", {"fields": ["name"], "error": "CANCELLED"})
    ]
