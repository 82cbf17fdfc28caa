"""Nested lists cost a constant number of SQL statements, whatever the number of profiles."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from server.app_services import AppServices
from server.models import Profile, ProfileProxy, ProfileService, Proxy, Service
from server.settings import Settings
from tests.conftest import GraphQLClient, StatementCounter

NESTED = """
query($first: Int) {
  profiles(first: $first) {
    totalCount
    edges { node {
      name userDataDir
      services { hasToken tokenPreview service { name envVar hasToken usage { remaining } } }
      proxies { name protocol via { name health { ok } } }
      defaultProxy { name }
    } }
  }
}
"""


async def seed(app: Starlette, profiles: int) -> None:
    services: AppServices = app.state.services
    box = services.secret_box
    async with services.sessionmaker() as session:
        svc = [
            Service(name=f"svc{i}", env_var=f"TOKEN_{i}", token_encrypted=box.encrypt(f"tok-{i}"))
            for i in range(3)
        ]
        hop = Proxy(name="hop", protocol="socks5", host="127.0.0.1", port=1080)
        session.add_all([*svc, hop])
        await session.flush()
        proxies = [
            Proxy(name=f"px{i}", protocol="http", host="127.0.0.1", port=3000 + i, via_id=hop.id)
            for i in range(2)
        ]
        rows = [Profile(name=f"profile-{n:04d}") for n in range(profiles)]
        session.add_all([*proxies, *rows])
        await session.flush()
        for n, row in enumerate(rows):
            session.add_all(
                [
                    ProfileService(
                        profile_id=row.id,
                        service_id=svc[n % 3].id,
                        token_encrypted=box.encrypt(f"own-token-{n:06d}"),
                    ),
                    ProfileProxy(profile_id=row.id, proxy_id=proxies[0].id, is_default=True),
                    ProfileProxy(profile_id=row.id, proxy_id=proxies[1].id, is_default=False),
                ]
            )
        await session.commit()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"embedded_runner": False})  # count only the query's SQL


def without_authentication(statements: list[str]) -> list[str]:
    """The statements less the request's authentication (its API token looked up, in a
    transaction of its own, and its last-used time in another), not the query's work."""
    kept: list[str] = []
    skip_commit = False
    for statement in statements:
        if "api_tokens" in statement:
            if kept and kept[-1].upper().startswith("BEGIN"):
                kept.pop()
            skip_commit = True
            continue
        if skip_commit and statement.upper() in ("COMMIT", "ROLLBACK"):
            skip_commit = False
            continue
        kept.append(statement)
    return kept


@pytest.mark.parametrize("profiles", [5, 500])
async def test_nested_query_statement_count_is_constant(
    app: Starlette, gql: GraphQLClient, count_statements: StatementCounter, profiles: int
) -> None:
    await seed(app, profiles)
    count_statements.statements.clear()
    data = await gql(NESTED, first=profiles)
    edges = data["profiles"]["edges"]
    assert len(edges) == profiles == data["profiles"]["totalCount"]
    assert edges[0]["node"]["defaultProxy"] == {"name": "px0"}
    assert edges[0]["node"]["proxies"][0]["via"] == {"name": "hop", "health": None}
    assert edges[0]["node"]["services"][0]["tokenPreview"] == "own-…0000"
    # page, count, profile services, profile proxies, service usage, via: the same SELECTs
    # for 5 and 500 profiles (each read also ends its transaction: BEGIN on SQLite).
    statements = without_authentication(count_statements.statements)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 6, selects
    assert len(statements) <= 12, statements
