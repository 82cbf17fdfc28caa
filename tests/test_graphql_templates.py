"""The GraphQL API on command templates: bad input.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    CREATE_CASES,
    UPDATE_CASES,
    cases_for,
    check_bad_create,
    check_bad_update,
)


@pytest.mark.parametrize(
    ("mutation", "input", "field", "code"), cases_for(CREATE_CASES, "createCommandTemplate")
)
async def test_bad_create_input_is_a_user_error(
    gql: GraphQLClient, mutation: str, input: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_create(gql, mutation, input, field, code)


@pytest.mark.parametrize(
    ("type_name", "changes", "field", "code"), cases_for(UPDATE_CASES, "CommandTemplate")
)
async def test_bad_update_input_is_a_user_error(
    gql: GraphQLClient, type_name: str, changes: dict[str, Any], field: list[str], code: str
) -> None:
    await check_bad_update(gql, type_name, changes, field, code)
