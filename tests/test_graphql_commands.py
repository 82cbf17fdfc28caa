"""The GraphQL API on commands: their history outlives the profile.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture)."""

from __future__ import annotations

from starlette.applications import Starlette

from graphql_schema.relay import decode_id
from server import models
from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    delete,
    world,
)


async def test_deleting_a_profile_keeps_its_command_history(
    gql: GraphQLClient, app: Starlette
) -> None:
    ids = await world(gql)
    decoded = decode_id(ids["Profile"])
    assert decoded is not None
    # A finished command, written directly: its history is what must outlive the profile
    # (finished, so the embedded runner leaves it alone).
    async with app.state.services.sessionmaker() as session:
        session.add(
            models.Command(
                profile_id=decoded[1],
                profile_name="Alpha",
                source="echo hi",
                argv=["echo", "hi"],
                status="SUCCEEDED",
                exit_code=0,
            )
        )
        await session.commit()

    payload = await delete(gql, "Profile", ids["Profile"])
    assert payload["userErrors"] == []
    assert payload["deletedId"] == ids["Profile"]

    data = await gql(
        """{ commands { totalCount nodes { argv status profileName profile { name } } }
            profiles { totalCount }
            services { nodes { profiles { name } } } proxies { nodes { profiles { name } } } }"""
    )
    assert data["commands"] == {
        "totalCount": 1,
        "nodes": [
            {"argv": ["echo", "hi"], "status": "SUCCEEDED", "profileName": "Alpha", "profile": None}
        ],
    }
    assert data["profiles"]["totalCount"] == 0
    assert data["services"]["nodes"] == [{"profiles": []}]
    assert data["proxies"]["nodes"] == [{"profiles": []}]
