"""Issue 16's read path: a page of profiles with their links costs the same statements, a
token is decrypted only when its preview is asked for, and the links answer the same
whichever way a profile is reached (a page, a fragment, `nodes`, a node, a service)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import strawberry
from starlette.applications import Starlette

from graphql_schema.schema import ROOT_FIELD_HOOKS, build_schema
from server.app_services import AppServices
from server.ids import decode_global_id
from server.models import Profile, ProfileProxy, ProfileService, Proxy, Service
from server.settings import Settings
from tests.conftest import GraphQLClient, StatementCounter
from tests.fixtures.auth import bearer, issue_api_token
from tests.test_dataloaders import without_authentication
from tests.test_walls_query_cost import refusal, seed_mesh

SERVICES = PROXIES = 4

# The issue's query.
PAGE = """
query($first: Int) {
  profiles(first: $first) { edges { node {
    id name
    services { service { id name } hasToken tokenPreview }
    proxies { id name host port }
    defaultProxy { id }
  } } }
}
"""


async def seed(app: Starlette, profiles: int) -> None:
    """`profiles` profiles, each linked to 2 of 4 services (its own token on the first link
    only; every service has a shared token) and to 2 of 4 proxies (the first the default)."""
    services: AppServices = app.state.services
    box = services.secret_box
    async with services.sessionmaker() as session:
        svc = [
            Service(
                name=f"svc{i}", env_var=f"TOKEN_{i}", token_encrypted=box.encrypt(f"shared-{i}")
            )
            for i in range(SERVICES)
        ]
        px = [
            Proxy(name=f"px{i}", protocol="http", host=f"10.0.0.{i}", port=3000 + i)
            for i in range(PROXIES)
        ]
        rows = [Profile(name=f"profile-{n:03d}") for n in range(profiles)]
        session.add_all([*svc, *px, *rows])
        await session.flush()
        for n, row in enumerate(rows):
            for k in (0, 1):
                token = box.encrypt(f"own-token-{n:05d}-{k}") if k == 0 else None
                session.add(
                    ProfileService(
                        profile_id=row.id,
                        service_id=svc[(n + k) % SERVICES].id,
                        token_encrypted=token,
                    )
                )
                session.add(
                    ProfileProxy(
                        profile_id=row.id, proxy_id=px[(n + 2 * k) % PROXIES].id, is_default=k == 0
                    )
                )
        await session.commit()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"embedded_runner": False})  # count only the query's SQL


@pytest.fixture
def decryptions(app: Starlette, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The ciphertexts the app's SecretBox decrypts from now on."""
    box = app.state.services.secret_box
    seen: list[bytes] = []
    decrypt: Callable[[bytes], str] = box.decrypt

    def counted(ciphertext: bytes) -> str:
        seen.append(ciphertext)
        return decrypt(ciphertext)

    monkeypatch.setattr(box, "decrypt", counted)
    return seen


def node_of(data: dict[str, Any], n: int) -> dict[str, Any]:
    node: dict[str, Any] = data["profiles"]["edges"][n]["node"]
    return node


@pytest.mark.parametrize("profiles", [3, 60])
async def test_the_page_costs_three_selects_whatever_its_size(
    app: Starlette, gql: GraphQLClient, count_statements: StatementCounter, profiles: int
) -> None:
    await seed(app, profiles)
    count_statements.statements.clear()
    data = await gql(PAGE, first=profiles)
    assert len(data["profiles"]["edges"]) == profiles
    # page, the page's service links, the page's proxy links
    statements = without_authentication(count_statements.statements)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, selects
    assert len(statements) <= 6, statements


async def test_the_page_answers_every_field(app: Starlette, gql: GraphQLClient) -> None:
    await seed(app, 5)
    node = node_of(await gql(PAGE, first=5), 1)
    assert node["name"] == "profile-001"
    assert (decode_global_id(node["id"]) or ("", 0))[0] == "Profile"
    assert [link["service"]["name"] for link in node["services"]] == ["svc1", "svc2"]
    assert [link["hasToken"] for link in node["services"]] == [True, False]
    assert [link["tokenPreview"] for link in node["services"]] == ["own-…01-0", None]
    assert [(p["name"], p["host"], p["port"]) for p in node["proxies"]] == [
        ("px1", "10.0.0.1", 3001),
        ("px3", "10.0.0.3", 3003),
    ]
    px1 = node["proxies"][0]["id"]
    assert node["defaultProxy"] == {"id": px1}


async def test_a_token_is_decrypted_only_when_its_preview_is_asked_for(
    app: Starlette, gql: GraphQLClient, decryptions: list[bytes]
) -> None:
    await seed(app, 10)
    decryptions.clear()
    await gql(PAGE, first=10)
    # the 10 profiles' own tokens; not the services' shared ones, which no field asked for
    assert len(decryptions) == 10
    decryptions.clear()
    await gql("{ profiles(first: 10) { nodes { services { hasToken service { name } } } } }")
    assert decryptions == []
    decryptions.clear()
    # the shared tokens, asked of every link: each service's decrypted once a request
    data = await gql("{ profiles(first: 10) { nodes { services { service { tokenPreview } } } } }")
    assert len(decryptions) == SERVICES
    previews = {
        link["service"]["tokenPreview"] for p in data["profiles"]["nodes"] for link in p["services"]
    }
    assert previews == {f"…-{i}" for i in range(SERVICES)}
    decryptions.clear()
    await gql("{ services { nodes { name hasToken } } }")
    assert decryptions == []


async def test_links_answer_the_same_however_a_profile_is_reached(
    app: Starlette, gql: GraphQLClient
) -> None:
    await seed(app, 4)
    links = "services { tokenPreview service { name } } proxies { name } defaultProxy { name }"
    page = await gql(f"{{ profiles {{ edges {{ node {{ id {links} }} }} }} }}")
    expected = {edge["node"]["id"]: edge["node"] for edge in page["profiles"]["edges"]}
    # through a fragment, through `nodes`, skipped by a directive (still prefetched: fine)
    fragment = await gql(
        f"{{ profiles {{ edges {{ node {{ ...F }} }} }} }} fragment F on Profile {{ id {links} }}"
    )
    assert {e["node"]["id"]: e["node"] for e in fragment["profiles"]["edges"]} == expected
    nodes = await gql(f"{{ profiles {{ nodes {{ id {links} }} }} }}")
    assert {node["id"]: node for node in nodes["profiles"]["nodes"]} == expected
    skipped = await gql(
        f"{{ profiles {{ nodes {{ id services @skip(if: true) {{ hasToken }} {links} }} }} }}"
    )
    assert {node["id"]: node for node in skipped["profiles"]["nodes"]} == expected
    # one by one: a node, and the profiles of a service (the loaders, per profile)
    for pk, want in expected.items():
        node = await gql(f'{{ node(id: "{pk}") {{ ... on Profile {{ id {links} }} }} }}')
        assert node["node"] == want
    services = await gql(f"{{ services {{ nodes {{ profiles {{ id {links} }} }} }} }}")
    reached = [p for s in services["services"]["nodes"] for p in s["profiles"]]
    assert len(reached) == 8
    assert all(profile == expected[profile["id"]] for profile in reached)


async def test_a_viewer_gets_the_page_but_not_the_previews(
    app: Starlette, client: httpx.AsyncClient
) -> None:
    await seed(app, 2)
    viewer = bearer(await issue_api_token(app, role="viewer"))
    response = await client.post("/graphql", json={"query": PAGE}, headers=viewer)
    body = response.json()
    assert [edge["node"]["name"] for edge in body["data"]["profiles"]["edges"]] == [
        "profile-000",
        "profile-001",
    ]
    assert {e["extensions"]["code"] for e in body["errors"]} == {"FORBIDDEN"}
    assert all(e["path"][-1] == "tokenPreview" for e in body["errors"])


async def test_lists_loaded_per_profile_are_still_counted(settings: Settings) -> None:
    # Profile.proxies reached through Proxy.profiles is loaded per profile (an awaitable
    # from a plain resolver): 30 proxies x 30 profiles x 30 proxies is past the budget.
    from server.app import create_app
    from tests.fixtures.auth import admin_client
    from tests.test_walls_query_cost import _post

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await seed_mesh(app)
        async with admin_client(app) as http:
            body = await _post(
                http, "{ proxies(first: 30) { nodes { profiles { proxies { id } } } } }"
            )
    error = refusal(body, "QUERY_TOO_COSTLY")
    assert error["extensions"]["cost"] > error["extensions"]["budget"]


def test_schema_extension_resolve_hooks_are_root_field_hooks() -> None:
    # CorralExecutionContext runs the hooks on root fields only: a hook that needs to see
    # other fields must not be added without changing that.
    schema = build_schema()
    hooks = {type(ext) for ext in schema.get_extensions() if ext._implements_resolve()}
    assert hooks
    assert hooks <= set(ROOT_FIELD_HOOKS)


def test_a_field_answered_at_once_keeps_its_checks_or_the_schema_refuses_it() -> None:
    from strawberry.extensions import FieldExtension

    from graphql_schema.direct import answer_at_once, install_direct_resolvers

    class Unknown(FieldExtension):
        def resolve(self, next_: Any, source: Any, info: Any, **kwargs: Any) -> Any:
            return next_(source, info, **kwargs)

    @strawberry.type
    class Query:
        @strawberry.field(extensions=[Unknown()], metadata=answer_at_once(lambda _s, _i: 1))
        def value(self) -> int:
            return 1

    with pytest.raises(TypeError, match="answer_at_once"):
        install_direct_resolvers(strawberry.Schema(query=Query))


@strawberry.enum
class LeafColor(enum.Enum):
    RED = "red"


@strawberry.type
class LeafItem:
    id: strawberry.ID
    count: int
    color: LeafColor
    label: str | None
    must: str


class BrokenLeafItem:
    """Not a LeafItem's values: graphql-core must word each error, as without DirectLeaves."""

    id = "b"
    count = "many"  # not an Int
    color = LeafColor.RED
    label = None

    @property
    def must(self) -> str:
        raise RuntimeError("no must here")


@strawberry.type
class LeafQuery:
    @strawberry.field
    def items(self) -> list[LeafItem | None]:
        good = LeafItem(id=strawberry.ID("a"), count=2, color=LeafColor.RED, label=None, must="m")
        nulled = LeafItem(id=strawberry.ID("n"), count=3, color=LeafColor.RED, label="x", must="")
        nulled.must = None  # type: ignore[assignment]
        return [good, nulled, BrokenLeafItem()]  # type: ignore[list-item]


@pytest.mark.parametrize("fields", ["id count color label", "id must", "label"])
def test_plain_leaves_answered_in_place_keep_graphql_cores_answers_and_errors(fields: str) -> None:
    # DirectLeaves answers plain scalar and enum fields itself: the same values, and a value
    # it cannot answer (a null for a non-null field, one its type cannot represent, an
    # attribute that raises) gets graphql-core's own error at the same path.
    from graphql_schema.direct import install_direct_resolvers
    from graphql_schema.schema import CorralExecutionContext

    ours = strawberry.Schema(query=LeafQuery, execution_context_class=CorralExecutionContext)
    install_direct_resolvers(ours)
    query = f"{{ items {{ {fields} }} }}"
    mine, theirs = ours.execute_sync(query), strawberry.Schema(query=LeafQuery).execute_sync(query)
    assert mine.data == theirs.data
    assert [(e.message, e.path) for e in mine.errors or []] == [
        (e.message, e.path) for e in theirs.errors or []
    ]
    assert mine.data is not None
    items = mine.data["items"]
    if fields == "label":
        assert items == [{"label": None}, {"label": "x"}, {"label": None}]
    elif fields == "id must":
        assert items == [{"id": "a", "must": "m"}, None, None]
        assert [e.path for e in mine.errors or []] == [["items", 1, "must"], ["items", 2, "must"]]
    else:
        assert items == [
            {"id": "a", "count": 2, "color": "RED", "label": None},
            {"id": "n", "count": 3, "color": "RED", "label": "x"},
            None,
        ]
        assert [e.path for e in mine.errors or []] == [["items", 2, "count"]]


@strawberry.interface
class LeafNode:
    id: strawberry.ID


@strawberry.type
class LeafRow(LeafNode):
    when: datetime
    color: LeafColor
    note: str | None


def leaf_rows(count: int) -> list[LeafRow]:
    stamp = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    return [
        LeafRow(id=strawberry.ID(str(i)), when=stamp, color=LeafColor.RED, note=str(i))
        for i in range(count)
    ]


@strawberry.type
class RowQuery:
    @strawberry.field
    def rows(self) -> list[LeafRow]:
        return leaf_rows(3)

    @strawberry.field
    def streamed(self) -> list[LeafRow]:  # any iterable: a generator here
        return (row for row in leaf_rows(2))  # type: ignore[return-value]

    @strawberry.field
    def holes(self) -> list[LeafRow | None]:
        rows: list[LeafRow | None] = [*leaf_rows(2), None]
        return rows

    @strawberry.field
    def strict(self) -> list[LeafRow]:  # a null where the list says non-null
        return [*leaf_rows(1), None]  # type: ignore[list-item]

    @strawberry.field
    def impostor(self) -> list[LeafRow]:  # not a LeafRow: its is_type_of says no
        other: Any = LeafItem(
            id=strawberry.ID("x"), count=1, color=LeafColor.RED, label=None, must="m"
        )
        return [*leaf_rows(1), other]

    @strawberry.field
    def nodes(self) -> list[LeafNode]:
        return leaf_rows(2)  # type: ignore[return-value]


@pytest.mark.parametrize(
    "query",
    [
        "{ rows { id when color note } }",
        "{ rows { a: id b: id when } }",
        "{ rows { __typename id } }",
        "{ rows { ... on LeafRow { id color } } }",
        "{ rows { id @skip(if: true) note } }",
        "{ streamed { id when } }",
        "{ holes { id } }",
        "{ strict { id } }",
        "{ impostor { id } }",
        "{ nodes { id ... on LeafRow { when } } }",
    ],
)
def test_lists_of_plain_rows_keep_graphql_cores_answers_and_errors(query: str) -> None:
    # DirectLeaves makes a list of objects whose selected fields are all plain leaves row
    # by row; anything it cannot answer so takes graphql-core's path: the very same
    # answers and errors as graphql-core alone, whatever the selection.
    from graphql_schema.direct import install_direct_resolvers
    from graphql_schema.schema import CorralExecutionContext

    ours = strawberry.Schema(
        query=RowQuery, types=[LeafRow], execution_context_class=CorralExecutionContext
    )
    install_direct_resolvers(ours)
    theirs = strawberry.Schema(query=RowQuery, types=[LeafRow])
    mine, plain = ours.execute_sync(query), theirs.execute_sync(query)
    assert mine.data == plain.data
    assert [(e.message, e.path) for e in mine.errors or []] == [
        (e.message, e.path) for e in plain.errors or []
    ]
    assert mine.data is not None or mine.errors


def test_a_list_of_plain_rows_is_made_without_completing_each_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: graphql-core completed every row (a call chain per item and per field): a
    # third of what executing a 100-line log batch cost.
    from graphql.execution.executor import Executor

    from graphql_schema.direct import install_direct_resolvers
    from graphql_schema.schema import CorralExecutionContext

    completed: list[object] = []
    complete = Executor.complete_list_item_value

    def counted(self: Any, item: Any, *args: Any) -> Any:
        completed.append(item)
        return complete(self, item, *args)

    monkeypatch.setattr(Executor, "complete_list_item_value", counted)
    ours = strawberry.Schema(query=RowQuery, execution_context_class=CorralExecutionContext)
    install_direct_resolvers(ours)
    result = ours.execute_sync("{ rows { id when color note } }")
    assert not result.errors
    assert result.data == {
        "rows": [
            {"id": str(i), "when": "2026-12-03T12:00:00+00:00", "color": "RED", "note": str(i)}
            for i in range(3)
        ]
    }
    assert completed == []
    assert ours.execute_sync("{ rows { __typename id } }").data is not None
    assert len(completed) == 3  # a field it does not answer in place: graphql-core's path
