"""The GraphQL API on profiles: paging, search, names, bad input.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    CREATE_CASES,
    UPDATE_CASES,
    assert_rejected,
    cases_for,
    check_bad_create,
    check_bad_update,
    make,
    mutate,
    snapshot,
)


async def test_pages_walk_every_profile_once_in_order(gql: GraphQLClient) -> None:
    names = [f"profile-{n}" for n in range(1, 8)]
    for name in names:
        await make(gql, "createProfile", name=name)
    query = """query($after: String) { profiles(first: 3, after: $after) { totalCount
        edges { cursor node { name } } pageInfo { hasNextPage hasPreviousPage endCursor } } }"""
    seen: list[str] = []
    page_sizes: list[int] = []
    after: str | None = None
    for _ in range(10):
        page = (await gql(query, after=after))["profiles"]
        assert page["totalCount"] == 7
        assert page["pageInfo"]["hasPreviousPage"] is (after is not None)
        seen += [edge["node"]["name"] for edge in page["edges"]]
        page_sizes.append(len(page["edges"]))
        assert page["pageInfo"]["endCursor"] == page["edges"][-1]["cursor"]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert seen == names
    assert page_sizes == [3, 3, 1]


SEARCH_NAMES = [
    "Alpha",
    "alphabet soup",
    "Beta",
    "100% real",
    "1000 real",
    "snake_case",
    "snakeXcase",
    "back\\slash",
    "Ärger",
]


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ("ALPH", ["Alpha", "alphabet soup"]),
        ("bEt", ["alphabet soup", "Beta"]),
        ("%", ["100% real"]),
        ("0%", ["100% real"]),
        ("_", ["snake_case"]),
        ("e_c", ["snake_case"]),
        ("\\", ["back\\slash"]),
        ("ärg", ["Ärger"]),
        ("zzz", []),
    ],
)
async def test_search_matches_name_substrings_literally(
    gql: GraphQLClient, search: str, expected: list[str]
) -> None:
    for name in SEARCH_NAMES:
        await make(gql, "createProfile", name=name)
    query = """query($search: String) { profiles(search: $search, first: 1) {
        totalCount pageInfo { hasNextPage } } all: profiles(search: $search) { nodes { name } } }"""
    data = await gql(query, search=search)
    assert [node["name"] for node in data["all"]["nodes"]] == expected
    assert data["profiles"]["totalCount"] == len(expected)
    assert data["profiles"]["pageInfo"]["hasNextPage"] is (len(expected) > 1)


async def test_search_with_a_nul_character_finds_nothing_and_leaks_nothing(
    gql: GraphQLClient,
) -> None:
    for name in SEARCH_NAMES:
        await make(gql, "createProfile", name=name)
    body = await gql.raw(
        "query($search: String) { profiles(search: $search) { nodes { name } } }", search="a\x00"
    )
    text = json.dumps(body)
    assert "SELECT" not in text  # never the database's internals
    assert "sqlalchemy" not in text.lower()
    assert body == {"data": {"profiles": {"nodes": []}}}  # no name can hold a NUL


@pytest.mark.parametrize(("first", "second"), [("Ärger", "ärger"), ("ÉCOLE", "école")])
async def test_duplicate_names_are_caught_beyond_ascii_case(
    gql: GraphQLClient, first: str, second: str
) -> None:
    await make(gql, "createProfile", name=first)
    before = await snapshot(gql)
    assert_rejected(await mutate(gql, "createProfile", name=second), ["name"], "TAKEN")
    assert await snapshot(gql) == before


async def test_name_of_200_characters_is_accepted(gql: GraphQLClient) -> None:
    name = "x" * 200
    assert (await make(gql, "createProfile", name=name))["name"] == name


@pytest.mark.parametrize(
    ("mutation", "input", "field", "code"), cases_for(CREATE_CASES, "createProfile")
)
async def test_bad_create_input_is_a_user_error(
    gql: GraphQLClient, mutation: str, input: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_create(gql, mutation, input, field, code)


@pytest.mark.parametrize(
    ("type_name", "changes", "field", "code"), cases_for(UPDATE_CASES, "Profile")
)
async def test_bad_update_input_is_a_user_error(
    gql: GraphQLClient, type_name: str, changes: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_update(gql, type_name, changes, field, code)
