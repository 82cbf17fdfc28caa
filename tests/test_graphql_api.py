"""The GraphQL API across objects: the happy path, secrets, paging, IDs, limits.

Each object's own rules are in tests/test_graphql_<object>.py; shared helpers in
tests/fixtures/graphql_api.py.

Every test runs on SQLite and on PostgreSQL (the `gql` fixture). A rejected mutation must
come back as a `userErrors` entry (field + code) with a null object, and write nothing:
`snapshot()` reads every object and relation before and after to show it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from graphql_schema.relay import encode_id
from server import models
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.graphql_api import (
    ERRORS,
    INPUT_MUTATIONS,
    LINK_TOKEN,
    PROXY_PASSWORD,
    PROXY_USER,
    SECRETS,
    TOKEN,
    VALID_INPUT,
    assert_rejected,
    delete,
    deleted_id,
    make,
    mutate,
    overflowing_id,
    run_with_target,
    snapshot,
    store_secrets,
    world,
)


async def test_client_builds_and_reads_back_a_profile_with_services_and_proxies(
    gql: GraphQLClient,
) -> None:
    service = await make(
        gql,
        "createService",
        name="GitHub",
        envVar="GITHUB_TOKEN",
        token=TOKEN,
        kind="github",
        baseUrl="https://api.github.com",
    )
    assert service == {
        "id": service["id"],
        "name": "GitHub",
        "envVar": "GITHUB_TOKEN",
        "kind": "github",
        "baseUrl": "https://api.github.com",
        "hasToken": True,
        "tokenPreview": "ghp_…a1b2",
    }
    entry = await make(
        gql,
        "createProxy",
        name="Entry",
        protocol="http",
        host="proxy.example.com",
        port=3128,
        username=PROXY_USER,
        password=PROXY_PASSWORD,
    )
    assert entry["hasCredentials"] is True
    assert entry["via"] is None
    exit_hop = await make(
        gql,
        "createProxy",
        name="Exit",
        protocol="socks5",
        host="10.1.2.3",
        port=1080,
        viaId=entry["id"],
    )
    assert exit_hop["via"] == {"name": "Entry"}
    assert exit_hop["hasCredentials"] is False
    profile = await make(gql, "createProfile", name="Alpha")

    linked = await gql(
        """mutation($input: LinkServiceInput!) { linkService(input: $input) {
            profile { name } service { name } userErrors { code } } }""",
        input={"profileId": profile["id"], "serviceId": service["id"], "token": LINK_TOKEN},
    )
    assert linked["linkService"] == {
        "profile": {"name": "Alpha"},
        "service": {"name": "GitHub"},
        "userErrors": [],
    }
    attached = await gql(
        """mutation($input: AttachProxyInput!) { attachProxy(input: $input) {
            profile { name defaultProxy { name } } proxy { name } userErrors { code } } }""",
        input={"profileId": profile["id"], "proxyId": exit_hop["id"]},
    )
    assert attached["attachProxy"] == {
        "profile": {"name": "Alpha", "defaultProxy": {"name": "Exit"}},
        "proxy": {"name": "Exit"},
        "userErrors": [],
    }

    data = await gql(
        """{ profiles { totalCount edges { cursor node { id name
              services { service { name hasToken tokenPreview } hasToken tokenPreview }
              proxies { name via { name } } defaultProxy { name } } } }
            services { totalCount nodes { name profiles { name } } }
            proxies { totalCount nodes { name via { name } profiles { name } } } }"""
    )
    assert data["profiles"]["totalCount"] == 1
    [edge] = data["profiles"]["edges"]
    assert edge["cursor"]
    assert edge["node"] == {
        "id": profile["id"],
        "name": "Alpha",
        "services": [
            {
                "service": {"name": "GitHub", "hasToken": True, "tokenPreview": "ghp_…a1b2"},
                "hasToken": True,
                "tokenPreview": "ghp_…c3d4",
            }
        ],
        "proxies": [{"name": "Exit", "via": {"name": "Entry"}}],
        "defaultProxy": {"name": "Exit"},
    }
    assert data["services"] == {
        "totalCount": 1,
        "nodes": [{"name": "GitHub", "profiles": [{"name": "Alpha"}]}],
    }
    assert data["proxies"] == {
        "totalCount": 2,
        "nodes": [
            {"name": "Entry", "via": None, "profiles": []},
            {"name": "Exit", "via": {"name": "Entry"}, "profiles": [{"name": "Alpha"}]},
        ],
    }


@pytest.mark.parametrize(
    ("type_name", "fragment", "expected"),
    [
        ("Profile", "... on Profile { name }", {"name": "Alpha"}),
        (
            "Service",
            "... on Service { name envVar hasToken }",
            {"name": "GitHub", "envVar": "GITHUB_TOKEN", "hasToken": True},
        ),
        (
            "Proxy",
            "... on Proxy { name protocol port }",
            {"name": "Edge", "protocol": "SOCKS5", "port": 1080},
        ),
        (
            "CommandTemplate",
            "... on CommandTemplate { name template }",
            {"name": "Hello", "template": "echo {{ who }}"},
        ),
    ],
)
async def test_node_finds_each_type_by_global_id(
    gql: GraphQLClient, type_name: str, fragment: str, expected: dict[str, Any]
) -> None:
    ids = await world(gql)
    query = f"query($id: ID!) {{ node(id: $id) {{ __typename id {fragment} }} }}"
    node = (await gql(query, id=ids[type_name]))["node"]
    assert node == {"__typename": type_name, "id": ids[type_name], **expected}

    assert (await delete(gql, type_name, ids[type_name]))["userErrors"] == []
    assert (await gql(query, id=ids[type_name]))["node"] is None
    assert (await gql(query, id=encode_id(type_name, 10_000)))["node"] is None
    assert (await gql(query, id="not-an-id"))["node"] is None


@pytest.fixture
def responses(client: httpx.AsyncClient) -> list[str]:
    """The raw text of every HTTP response the test's client receives."""
    seen: list[str] = []

    async def record(response: httpx.Response) -> None:
        await response.aread()
        seen.append(response.text)

    client.event_hooks["response"].append(record)
    return seen


INTROSPECTION = """{ __schema { types { name fields(includeDeprecated: true) { name args { name }
    type { kind ofType { kind ofType { kind ofType { kind } } } } } } } }"""


SECRET_HOLDERS = ("Service", "Proxy", "ProfileServiceLink")


ALLOWED_SECRET_WORDS = {"hasToken", "tokenPreview", "hasCredentials"}


def leaf_fields(fields: list[dict[str, Any]]) -> str:
    """The names of the fields that are scalars or enums and take no arguments."""

    def kind(of: dict[str, Any]) -> str:
        return kind(of["ofType"]) if of["kind"] in ("NON_NULL", "LIST") else str(of["kind"])

    return " ".join(
        f["name"] for f in fields if not f["args"] and kind(f["type"]) in ("SCALAR", "ENUM")
    )


async def test_secrets_appear_in_no_response(gql: GraphQLClient, responses: list[str]) -> None:
    ids = await store_secrets(gql)
    # Rejected writes carrying secrets must not echo them either.
    await mutate(gql, "createService", name="github", envVar="GH", token=TOKEN)
    await mutate(gql, "createService", name="Other", envVar="1BAD", token=TOKEN)
    await mutate(
        gql, "linkService", profileId="not-an-id", serviceId=ids["Service"], token=LINK_TOKEN
    )
    await mutate(
        gql, "createProxy", name="edge", protocol="http", host="h", port=1, password=PROXY_PASSWORD
    )
    await mutate(
        gql, "createProxy", name="W", protocol="vless", host="h", port=1, password=PROXY_PASSWORD
    )
    types = {t["name"]: t["fields"] for t in (await gql(INTROSPECTION))["__schema"]["types"]}
    for type_name in SECRET_HOLDERS:
        names = {field["name"] for field in types[type_name]}
        suspicious = {
            name
            for name in names
            if any(word in name.lower() for word in ("token", "password", "user", "credential"))
        }
        assert suspicious <= ALLOWED_SECRET_WORDS, (type_name, suspicious)
    # Read every scalar a client can read of the objects holding secrets.
    service, proxy, link = (leaf_fields(types[name]) for name in SECRET_HOLDERS)
    everything = await gql(
        f"{{ services {{ nodes {{ {service} }} }} proxies {{ nodes {{ {proxy} }} }} "
        f"profiles {{ nodes {{ services {{ {link} service {{ {service} }} }} }} }} }}"
    )
    assert len(everything["proxies"]["nodes"]) == 3
    assert everything["services"]["nodes"][0]["tokenPreview"] == "ghp_…a1b2"
    await snapshot(gql)

    assert len(responses) >= 14
    for text in responses:
        for secret in SECRETS:
            assert secret not in text


async def test_database_stores_no_plaintext_secret(
    gql: GraphQLClient, settings: Settings, backend: str
) -> None:
    await store_secrets(gql)

    engine = create_async_engine(settings.resolved_database_url)
    try:
        async with engine.connect() as connection:
            stored: list[Any] = []
            for table in models.Base.metadata.sorted_tables:
                for row in await connection.execute(select(table)):
                    stored.extend(row)
            encrypted = await connection.scalar(select(models.Service.token_encrypted))
    finally:
        await engine.dispose()
    dumped = "\n".join(v.decode("latin-1") if isinstance(v, bytes) else repr(v) for v in stored)
    assert "GitHub" in dumped  # the dump did read the rows
    assert encrypted
    for secret in SECRETS:
        assert secret not in dumped

    if backend == "sqlite":
        files = sorted(settings.data_dir.glob("corral.db*"))
        assert any(f.name == "corral.db" for f in files)
        raw = b"".join(f.read_bytes() for f in files)
        assert b"GitHub" in raw
        for secret in SECRETS:
            assert secret.encode() not in raw


@pytest.mark.parametrize(
    "arguments",
    [
        "first: -1",
        "first: 1000000",
        'after: "garbage"',
        'after: "Y3Vyc29yOmFiYw=="',  # base64 of "cursor:abc"
        'after: "UHJvZmlsZTox"',  # a node ID, not a cursor
        f'after: "{base64.b64encode(b"cursor:" + b"9" * 30).decode()}"',  # fits no integer
    ],
)
async def test_bad_page_arguments_are_graphql_errors(gql: GraphQLClient, arguments: str) -> None:
    await make(gql, "createProfile", name="Alpha")
    body = await gql.raw(f"{{ profiles({arguments}) {{ edges {{ node {{ name }} }} }} }}")
    assert body["data"] is None
    [error] = body["errors"]
    assert error["path"] == ["profiles"]
    assert error["message"]
    # An explanation for the client, not the database's internals.
    assert "SELECT" not in error["message"]
    assert "sqlalchemy" not in error["message"].lower()


# Operations that name an existing object, and the argument (field) a bad ID goes into.
MISSING_TARGET_CASES = [
    ("linkService", "profileId", "Profile"),
    ("linkService", "serviceId", "Service"),
    ("unlinkService", "profileId", "Profile"),
    ("unlinkService", "serviceId", "Service"),
    ("attachProxy", "profileId", "Profile"),
    ("attachProxy", "proxyId", "Proxy"),
    ("detachProxy", "profileId", "Profile"),
    ("detachProxy", "proxyId", "Proxy"),
    ("createProxy", "viaId", "Proxy"),
    ("updateProfile", "id", "Profile"),
    ("updateService", "id", "Service"),
    ("updateProxy", "id", "Proxy"),
    ("updateCommandTemplate", "id", "CommandTemplate"),
    ("deleteProfile", "id", "Profile"),
    ("deleteService", "id", "Service"),
    ("deleteProxy", "id", "Proxy"),
    ("deleteCommandTemplate", "id", "CommandTemplate"),
]


@pytest.mark.parametrize("kind", ["deleted", "wrong-type", "garbage"])
@pytest.mark.parametrize(
    ("mutation", "field", "type_name"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}") for case in MISSING_TARGET_CASES],
)
async def test_missing_target_is_a_not_found_user_error(
    gql: GraphQLClient, mutation: str, field: str, type_name: str, kind: str
) -> None:
    ids = await world(gql)
    if kind == "deleted":
        target = await deleted_id(gql, type_name)
    elif kind == "wrong-type":
        target = ids["Service" if type_name == "Profile" else "Profile"]
    else:
        target = "not-an-id"
    before = await snapshot(gql)
    assert_rejected(await run_with_target(gql, mutation, field, target, ids), [field], "NOT_FOUND")
    assert await snapshot(gql) == before


@pytest.mark.parametrize(
    ("mutation", "field", "type_name"),
    [
        ("updateProfile", "id", "Profile"),
        ("linkService", "serviceId", "Service"),
        ("detachProxy", "proxyId", "Proxy"),
        ("deleteCommandTemplate", "id", "CommandTemplate"),
        ("createProxy", "viaId", "Proxy"),
    ],
)
async def test_id_with_out_of_range_number_is_a_not_found_user_error(
    gql: GraphQLClient, mutation: str, field: str, type_name: str
) -> None:
    ids = await world(gql)
    before = await snapshot(gql)
    target = overflowing_id(type_name)
    assert_rejected(await run_with_target(gql, mutation, field, target, ids), [field], "NOT_FOUND")
    assert await snapshot(gql) == before


async def test_node_with_out_of_range_number_is_null(gql: GraphQLClient) -> None:
    body = await gql.raw("query($id: ID!) { node(id: $id) { id } }", id=overflowing_id("Profile"))
    assert body == {"data": {"node": None}}


async def test_every_bad_field_is_reported_at_once(gql: GraphQLClient) -> None:
    """Several bad fields at once: each is reported, nothing is created."""
    await world(gql)
    before = await snapshot(gql)
    payload = await mutate(gql, "createProxy", name=" ", protocol="ftp", host="a b", port=0)
    reported = {(tuple(e["field"]), e["code"]) for e in payload["userErrors"]}
    assert reported == {
        (("name",), "BLANK"),
        (("protocol",), "INVALID"),
        (("host",), "INVALID"),
        (("port",), "OUT_OF_RANGE"),
    }
    assert payload["object"] is None
    assert await snapshot(gql) == before


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        ("createService", "settings"),
        ("createService", "rateLimitPolicy"),
        ("createProxy", "settings"),
    ],
)
@pytest.mark.parametrize("number", [float("inf"), float("nan")], ids=["infinity", "nan"])
async def test_non_finite_number_in_json_is_a_user_error(
    gql: GraphQLClient, client: httpx.AsyncClient, mutation: str, field: str, number: float
) -> None:
    """Python's json (and so many clients) sends Infinity/NaN; no database stores them as JSON."""
    await world(gql)
    before = await snapshot(gql)
    input_type, key, selection = INPUT_MUTATIONS[mutation]
    query = (
        f"mutation($input: {input_type}!) {{ {mutation}(input: $input) "
        f"{{ {key} {{ {selection} }} {ERRORS} }} }}"
    )
    variables = {"input": {**VALID_INPUT[mutation], field: {"limit": number}}}
    response = await client.post(
        "/graphql",
        content=json.dumps({"query": query, "variables": variables}),  # allows NaN/Infinity
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert "INSERT" not in response.text  # never the database's internals
    assert "sqlalchemy" not in response.text.lower()
    payload = response.json()["data"][mutation]
    assert_rejected(
        {"object": payload[key], "userErrors": payload["userErrors"]}, [field], "INVALID"
    )
    assert await snapshot(gql) == before


def deep_proxy_query(hops: int) -> str:
    return "{ proxies { nodes { " + "via { " * hops + "name" + " }" * hops + " } } }"


async def test_a_query_deeper_than_the_limit_is_refused(gql: GraphQLClient) -> None:
    # proxies > nodes > via x hops > name: hops + 3 levels; the default limit is 12.
    assert (await gql.raw(deep_proxy_query(8)))["data"] == {"proxies": {"nodes": []}}
    body = await gql.raw(deep_proxy_query(20))
    assert body.get("data") is None
    assert any("exceeds maximum operation depth" in e["message"] for e in body["errors"])


async def test_a_query_with_more_aliases_than_the_limit_is_refused(gql: GraphQLClient) -> None:
    def aliased(count: int) -> str:
        return "{ " + " ".join(f"a{i}: profiles {{ totalCount }}" for i in range(count)) + " }"

    assert len((await gql.raw(aliased(30)))["data"]) == 30
    body = await gql.raw(aliased(31))
    assert body.get("data") is None
    assert any("aliases found" in e["message"] for e in body["errors"])


async def test_the_same_operation_is_validated_once(
    gql: GraphQLClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limits' rules must be the same objects from request to request, or the
    # validation cache (keyed by them) never serves a second request.
    import strawberry.schema.schema as strawberry_schema

    validated: list[Any] = []
    validate = strawberry_schema.validate  # type: ignore[attr-defined]

    def counting(*args: Any, **kwargs: Any) -> Any:
        validated.append(args)
        return validate(*args, **kwargs)

    monkeypatch.setattr(strawberry_schema, "validate", counting)
    query = "query OnlyHere { profiles { totalCount } }"
    for _ in range(3):
        assert await gql(query) == {"profiles": {"totalCount": 0}}
    assert len(validated) == 1
    body = await gql.raw(deep_proxy_query(20))  # the limits still apply
    assert body.get("data") is None
    assert len(validated) == 2
