"""The GraphQL API on proxies: protocols, chains, attach/detach and defaults, credentials, bad input.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    CREATE_CASES,
    PROXY,
    PROXY_PASSWORD,
    PROXY_USER,
    UPDATE_CASES,
    assert_rejected,
    cases_for,
    check_bad_create,
    check_bad_update,
    default_count,
    delete,
    make,
    mutate,
    profile_view,
    snapshot,
    stored_credentials,
    world,
)


@pytest.mark.parametrize("protocol", ["SOCKS5", "Socks5", " socks5 "])
async def test_protocol_is_case_insensitive(gql: GraphQLClient, protocol: str) -> None:
    proxy = await make(gql, "createProxy", name="S", protocol=protocol, host="10.0.0.3", port=1080)
    assert proxy["protocol"] == "SOCKS5"


async def test_chain_loop_is_refused(gql: GraphQLClient) -> None:
    a = await make(gql, "createProxy", name="A", **PROXY)
    b = await make(gql, "createProxy", name="B", **PROXY)
    assert (await make(gql, "updateProxy", id=a["id"], viaId=b["id"]))["via"] == {"name": "B"}
    before = await snapshot(gql)
    payload = await mutate(gql, "updateProxy", id=b["id"], viaId=a["id"])
    assert_rejected(payload, ["viaId"], "CHAIN_LOOP")
    assert "loops" in payload["userErrors"][0]["message"]
    assert await snapshot(gql) == before


async def test_proxy_via_itself_is_refused(gql: GraphQLClient) -> None:
    a = await make(gql, "createProxy", name="A", **PROXY)
    before = await snapshot(gql)
    assert_rejected(
        await mutate(gql, "updateProxy", id=a["id"], viaId=a["id"]), ["viaId"], "CHAIN_LOOP"
    )
    assert await snapshot(gql) == before


async def test_deleting_an_attached_proxy_detaches_it_and_names_the_profiles(
    gql: GraphQLClient,
) -> None:
    ids = await world(gql)  # Alpha uses Edge (its default)
    beta = await make(gql, "createProfile", name="Beta")
    await make(gql, "createProfile", name="Gamma")
    await make(gql, "attachProxy", profileId=beta["id"], proxyId=ids["Proxy"])

    payload = await delete(gql, "Proxy", ids["Proxy"])
    assert payload["userErrors"] == []
    assert payload["deletedId"] == ids["Proxy"]
    detached = [notice for notice in payload["notices"] if "Alpha" in notice]
    assert detached
    assert "Beta" in detached[0]
    assert not any("Gamma" in notice for notice in payload["notices"])

    for profile_id in (ids["Profile"], beta["id"]):
        view = await profile_view(gql, profile_id)
        assert view["proxies"] == []
        assert view["defaultProxy"] is None
    assert (await gql("{ proxies { totalCount } }"))["proxies"]["totalCount"] == 0


async def test_deleting_a_via_hop_is_refused(gql: GraphQLClient) -> None:
    entry = await make(gql, "createProxy", name="Entry", **PROXY)
    exit_hop = await make(gql, "createProxy", name="Exit", **PROXY, viaId=entry["id"])
    before = await snapshot(gql)

    payload = await delete(gql, "Proxy", entry["id"])
    assert_rejected(payload, ["id"], "IN_USE")
    assert "Exit" in payload["userErrors"][0]["message"]
    assert payload["notices"] == []
    assert await snapshot(gql) == before

    assert (await delete(gql, "Proxy", exit_hop["id"]))["userErrors"] == []
    assert (await delete(gql, "Proxy", entry["id"]))["userErrors"] == []


async def test_first_attached_proxy_is_default_and_is_default_moves_it(
    gql: GraphQLClient, app: Starlette
) -> None:
    profile = await make(gql, "createProfile", name="Alpha")
    first = await make(gql, "createProxy", name="First", **PROXY)
    second = await make(gql, "createProxy", name="Second", **PROXY)

    async def attach(proxy_id: str, **extra: Any) -> dict[str, Any]:
        await make(gql, "attachProxy", profileId=profile["id"], proxyId=proxy_id, **extra)
        assert await default_count(app, profile["id"]) == 1
        return await profile_view(gql, profile["id"])

    view = await attach(first["id"])
    assert view["defaultProxy"] == {"name": "First"}
    view = await attach(second["id"])
    assert view["defaultProxy"] == {"name": "First"}
    assert view["proxies"] == [{"name": "First"}, {"name": "Second"}]
    view = await attach(second["id"], isDefault=True)
    assert view["defaultProxy"] == {"name": "Second"}
    view = await attach(first["id"])  # re-attaching keeps the default where it is
    assert view["defaultProxy"] == {"name": "Second"}
    view = await attach(first["id"], isDefault=True)
    assert view["defaultProxy"] == {"name": "First"}
    assert view["proxies"] == [{"name": "First"}, {"name": "Second"}]


async def test_proxy_password_null_clears_it(gql: GraphQLClient, app: Starlette) -> None:
    proxy = await make(
        gql, "createProxy", name="P", **PROXY, username=PROXY_USER, password=PROXY_PASSWORD
    )
    assert await stored_credentials(app, proxy["id"]) == {
        "username": PROXY_USER,
        "password": PROXY_PASSWORD,
    }

    kept = await make(gql, "updateProxy", id=proxy["id"], port=1081)
    assert kept["hasCredentials"] is True
    assert await stored_credentials(app, proxy["id"]) == {
        "username": PROXY_USER,
        "password": PROXY_PASSWORD,
    }

    cleared = await make(gql, "updateProxy", id=proxy["id"], password=None)
    assert cleared["hasCredentials"] is True  # the username is still set
    assert await stored_credentials(app, proxy["id"]) == {"username": PROXY_USER}

    cleared = await make(gql, "updateProxy", id=proxy["id"], username=None)
    assert cleared["hasCredentials"] is False
    assert await stored_credentials(app, proxy["id"]) == {}


@pytest.mark.parametrize(
    ("mutation", "input", "field", "code"), cases_for(CREATE_CASES, "createProxy")
)
async def test_bad_create_input_is_a_user_error(
    gql: GraphQLClient, mutation: str, input: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_create(gql, mutation, input, field, code)


@pytest.mark.parametrize(
    ("type_name", "changes", "field", "code"), cases_for(UPDATE_CASES, "Proxy")
)
async def test_bad_update_input_is_a_user_error(
    gql: GraphQLClient, type_name: str, changes: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_update(gql, type_name, changes, field, code)
