"""The GraphQL API on services: tokens kept, previewed and removed, links, bad input.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    CREATE_CASES,
    ERRORS,
    LINK_TOKEN,
    PROXY,
    SERVICE,
    TOKEN,
    UPDATE_CASES,
    assert_rejected,
    cases_for,
    check_bad_create,
    check_bad_update,
    make,
    profile_view,
    snapshot,
    unlink_or_detach,
    world,
)


async def test_token_preview_shows_only_prefix_and_last_four(gql: GraphQLClient) -> None:
    assert len(TOKEN) == 40
    service = await make(gql, "createService", name="GitHub", envVar="GITHUB_TOKEN", token=TOKEN)
    assert service["tokenPreview"] == "ghp_…a1b2"
    assert service["hasToken"] is True


async def test_unlinking_what_is_not_linked_is_a_user_error(gql: GraphQLClient) -> None:
    ids = await world(gql)
    other = await make(gql, "createService", name="Other", **SERVICE)
    spare = await make(gql, "createProxy", name="Spare", **PROXY)
    before = await snapshot(gql)
    assert_rejected(
        await unlink_or_detach(gql, "unlinkService", ids["Profile"], other["id"]),
        ["serviceId"],
        "NOT_FOUND",
    )
    assert_rejected(
        await unlink_or_detach(gql, "detachProxy", ids["Profile"], spare["id"]),
        ["proxyId"],
        "NOT_FOUND",
    )
    assert await snapshot(gql) == before


async def test_service_token_kept_when_omitted_and_removed_by_null(gql: GraphQLClient) -> None:
    service = await make(gql, "createService", name="GitHub", envVar="GITHUB_TOKEN", token=TOKEN)

    renamed = await make(gql, "updateService", id=service["id"], name="GitHub.com")
    assert (renamed["name"], renamed["hasToken"], renamed["tokenPreview"]) == (
        "GitHub.com",
        True,
        "ghp_…a1b2",
    )

    cleared = await gql(
        f'mutation {{ updateService(input: {{id: "{service["id"]}", token: null}}) '
        f"{{ service {{ hasToken tokenPreview }} {ERRORS} }} }}"
    )
    assert cleared["updateService"] == {
        "service": {"hasToken": False, "tokenPreview": None},
        "userErrors": [],
    }
    read = await gql(
        "query($id: ID!) { node(id: $id) { ... on Service { hasToken tokenPreview } } }",
        id=service["id"],
    )
    assert read["node"] == {"hasToken": False, "tokenPreview": None}

    replaced = await make(gql, "updateService", id=service["id"], token=LINK_TOKEN)
    assert (replaced["hasToken"], replaced["tokenPreview"]) == (True, "ghp_…c3d4")


async def test_link_token_kept_when_omitted_and_removed_by_null(gql: GraphQLClient) -> None:
    ids = await world(gql)
    link = {"profileId": ids["Profile"], "serviceId": ids["Service"]}
    await make(gql, "linkService", **link, token=LINK_TOKEN)
    await make(gql, "linkService", **link)
    [service] = (await profile_view(gql, ids["Profile"]))["services"]
    assert (service["hasToken"], service["tokenPreview"]) == (True, "ghp_…c3d4")
    await make(gql, "linkService", **link, token=None)
    [service] = (await profile_view(gql, ids["Profile"]))["services"]
    assert (service["hasToken"], service["tokenPreview"]) == (False, None)


@pytest.mark.parametrize(
    ("mutation", "input", "field", "code"), cases_for(CREATE_CASES, "createService")
)
async def test_bad_create_input_is_a_user_error(
    gql: GraphQLClient, mutation: str, input: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_create(gql, mutation, input, field, code)


@pytest.mark.parametrize(
    ("type_name", "changes", "field", "code"), cases_for(UPDATE_CASES, "Service")
)
async def test_bad_update_input_is_a_user_error(
    gql: GraphQLClient, type_name: str, changes: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_update(gql, type_name, changes, field, code)
