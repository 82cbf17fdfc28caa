"""The GraphQL API as a client sees it: the happy path, secrets, paging, user errors, deletes.

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
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from graphql_schema.relay import decode_id, encode_id
from server import models
from server.proxies import read_credentials
from server.settings import Settings
from tests.conftest import GraphQLClient

TOKEN = "ghp_" + "Zq7xW3kP" * 4 + "a1b2"  # a GitHub-shaped 40-character token
LINK_TOKEN = "ghp_" + "LnKt9vQe" * 4 + "c3d4"
PROXY_USER = "corral-user-7f3a"
PROXY_PASSWORD = "pw-Hx9!kQ2#secret"
VMESS_UUID = "5c4b2a1e-9d8f-4e7a-b6c5-3d2e1f0a9b8c"
SECRETS = (TOKEN, LINK_TOKEN, PROXY_USER, PROXY_PASSWORD, VMESS_UUID)

ERRORS = "userErrors { field message code }"
PROFILE_FIELDS = "id name"
SERVICE_FIELDS = "id name envVar kind baseUrl hasToken tokenPreview"
PROXY_FIELDS = "id name protocol host port hasCredentials via { name }"
TEMPLATE_FIELDS = "id name template timeoutSeconds maxAttempts parameters { name type default }"

# mutation -> (its input type, the payload field holding the object, what to select of it)
INPUT_MUTATIONS: dict[str, tuple[str, str, str]] = {
    "createProfile": ("CreateProfileInput", "profile", PROFILE_FIELDS),
    "updateProfile": ("UpdateProfileInput", "profile", PROFILE_FIELDS),
    "createService": ("CreateServiceInput", "service", SERVICE_FIELDS),
    "updateService": ("UpdateServiceInput", "service", SERVICE_FIELDS),
    "createProxy": ("CreateProxyInput", "proxy", PROXY_FIELDS),
    "updateProxy": ("UpdateProxyInput", "proxy", PROXY_FIELDS),
    "createCommandTemplate": ("CreateCommandTemplateInput", "commandTemplate", TEMPLATE_FIELDS),
    "updateCommandTemplate": ("UpdateCommandTemplateInput", "commandTemplate", TEMPLATE_FIELDS),
    "linkService": ("LinkServiceInput", "profile", "id name"),
    "attachProxy": ("AttachProxyInput", "profile", "id name"),
}
DELETE_MUTATIONS = {
    "Profile": "deleteProfile",
    "Service": "deleteService",
    "Proxy": "deleteProxy",
    "CommandTemplate": "deleteCommandTemplate",
}

SNAPSHOT = """{
  profiles { totalCount nodes { id name userDataDir viewportWidth updatedAt
    services { service { name } hasToken tokenPreview } proxies { name } defaultProxy { name } } }
  services { totalCount nodes { id name envVar kind baseUrl hasToken tokenPreview updatedAt } }
  proxies { totalCount nodes { id name protocol host port hasCredentials settings updatedAt
    via { name } } }
  commandTemplates { totalCount nodes { id name template timeoutSeconds maxAttempts updatedAt
    parameters { name type default } } }
}"""


# --- helpers -------------------------------------------------------------------------------


async def mutate(gql: GraphQLClient, mutation: str, **input: Any) -> dict[str, Any]:
    """Run an `input:` mutation; returns its payload as `{"object": ..., "userErrors": ...}`."""
    input_type, key, selection = INPUT_MUTATIONS[mutation]
    query = (
        f"mutation($input: {input_type}!) {{ {mutation}(input: $input) "
        f"{{ {key} {{ {selection} }} {ERRORS} }} }}"
    )
    payload = (await gql(query, input=input))[mutation]
    return {"object": payload[key], "userErrors": payload["userErrors"]}


async def make(gql: GraphQLClient, mutation: str, **input: Any) -> dict[str, Any]:
    """Run a mutation that must succeed; returns the object."""
    payload = await mutate(gql, mutation, **input)
    assert payload["userErrors"] == [], payload
    assert payload["object"] is not None
    return dict(payload["object"])


async def delete(gql: GraphQLClient, type_name: str, object_id: str) -> dict[str, Any]:
    """Delete by ID; returns the DeletePayload."""
    mutation = DELETE_MUTATIONS[type_name]
    query = f"mutation($id: ID!) {{ {mutation}(id: $id) {{ deletedId notices {ERRORS} }} }}"
    payload: dict[str, Any] = (await gql(query, id=object_id))[mutation]
    return payload


async def unlink_or_detach(
    gql: GraphQLClient, mutation: str, profile_id: str, other_id: str
) -> dict[str, Any]:
    """unlinkService / detachProxy (they take two ID arguments); returns the payload."""
    other = "serviceId" if mutation == "unlinkService" else "proxyId"
    query = (
        f"mutation($p: ID!, $o: ID!) {{ {mutation}(profileId: $p, {other}: $o) "
        f"{{ profile {{ id }} {ERRORS} }} }}"
    )
    payload: dict[str, Any] = (await gql(query, p=profile_id, o=other_id))[mutation]
    return payload


async def snapshot(gql: GraphQLClient) -> dict[str, Any]:
    """Everything a client can read, to compare before and after a rejected mutation."""
    return await gql(SNAPSHOT)


async def profile_view(gql: GraphQLClient, profile_id: str) -> dict[str, Any]:
    query = """query($id: ID!) { node(id: $id) { ... on Profile {
        name proxies { name } defaultProxy { name }
        services { service { name } hasToken tokenPreview } } } }"""
    node: dict[str, Any] = (await gql(query, id=profile_id))["node"]
    return node


def assert_rejected(payload: dict[str, Any], field: list[str], code: str) -> None:
    """A userError on `field` with `code`, and no object."""
    errors = payload["userErrors"]
    assert {"field": field, "code": code} in [
        {"field": e["field"], "code": e["code"]} for e in errors
    ], errors
    assert all(e["message"] for e in errors)
    assert payload.get("object") is None
    assert payload.get("profile") is None
    assert payload.get("deletedId") is None


def overflowing_id(type_name: str) -> str:
    """A well-formed global ID whose number fits no database integer."""
    return base64.b64encode(f"{type_name}:{'9' * 30}".encode()).decode()


async def world(gql: GraphQLClient) -> dict[str, str]:
    """One of each: profile Alpha linked to service GitHub and attached to proxy Edge, a template."""
    profile = await make(gql, "createProfile", name="Alpha")
    service = await make(gql, "createService", name="GitHub", envVar="GITHUB_TOKEN", token=TOKEN)
    proxy = await make(
        gql, "createProxy", name="Edge", protocol="socks5", host="10.0.0.1", port=1080
    )
    template = await make(gql, "createCommandTemplate", name="Hello", template="echo {{ who }}")
    await make(gql, "linkService", profileId=profile["id"], serviceId=service["id"])
    await make(gql, "attachProxy", profileId=profile["id"], proxyId=proxy["id"])
    return {
        "Profile": profile["id"],
        "Service": service["id"],
        "Proxy": proxy["id"],
        "CommandTemplate": template["id"],
    }


# --- 1. the happy path ---------------------------------------------------------------------


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


# --- 2. secrets are write-only -------------------------------------------------------------


async def store_secrets(gql: GraphQLClient) -> dict[str, str]:
    """world() plus every kind of secret: a link token, proxy credentials, a vmess UUID."""
    ids = await world(gql)
    await make(
        gql, "linkService", profileId=ids["Profile"], serviceId=ids["Service"], token=LINK_TOKEN
    )
    await make(
        gql,
        "createProxy",
        name="Authed",
        protocol="http",
        host="proxy.example.com",
        port=3128,
        username=PROXY_USER,
        password=PROXY_PASSWORD,
    )
    await make(
        gql,
        "createProxy",
        name="V",
        protocol="vmess",
        host="v.example.com",
        port=443,
        password=VMESS_UUID,
    )
    return ids


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


async def test_token_preview_shows_only_prefix_and_last_four(gql: GraphQLClient) -> None:
    assert len(TOKEN) == 40
    service = await make(gql, "createService", name="GitHub", envVar="GITHUB_TOKEN", token=TOKEN)
    assert service["tokenPreview"] == "ghp_…a1b2"
    assert service["hasToken"] is True


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


# --- 3. pagination and search --------------------------------------------------------------


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


# --- 4. bad input is a user error and writes nothing ---------------------------------------

LONG_NAME = "x" * 201
PROXY = {"protocol": "socks5", "host": "10.0.0.2", "port": 1080}
SERVICE = {"envVar": "OTHER_TOKEN"}
TEMPLATE = {"template": "echo hi"}
VALID_INPUT: dict[str, dict[str, Any]] = {
    "createProfile": {"name": "P"},
    "createService": {"name": "S", **SERVICE},
    "createProxy": {"name": "X", **PROXY},
    "createCommandTemplate": {"name": "T", **TEMPLATE},
}


def bad_create(case_id: str, mutation: str, field: str, code: str, **changes: Any) -> Any:
    """A create case: valid input with `changes`, rejected on `field` (dotted) with `code`."""
    values = {**VALID_INPUT[mutation], **changes}
    return pytest.param(mutation, values, field.split("."), code, id=case_id)


# world() has made profile Alpha, service GitHub, proxy Edge and template Hello.
CREATE_CASES = [
    bad_create("profile-duplicate", "createProfile", "name", "TAKEN", name="Alpha"),
    bad_create("profile-duplicate-case", "createProfile", "name", "TAKEN", name="aLPHA"),
    bad_create("profile-duplicate-padded", "createProfile", "name", "TAKEN", name="  alpha "),
    bad_create("profile-empty", "createProfile", "name", "BLANK", name=""),
    bad_create("profile-whitespace", "createProfile", "name", "BLANK", name=" \t "),
    bad_create("profile-too-long", "createProfile", "name", "TOO_LONG", name=LONG_NAME),
    bad_create("viewport-10", "createProfile", "viewportWidth", "OUT_OF_RANGE", viewportWidth=10),
    bad_create("dir-relative", "createProfile", "userDataDir", "INVALID", userDataDir="p/dir"),
    bad_create("service-duplicate", "createService", "name", "TAKEN", name="GitHub"),
    bad_create("service-duplicate-case", "createService", "name", "TAKEN", name="github"),
    bad_create("service-empty", "createService", "name", "BLANK", name=""),
    bad_create("service-whitespace", "createService", "name", "BLANK", name="   "),
    bad_create("service-too-long", "createService", "name", "TOO_LONG", name=LONG_NAME),
    bad_create("envvar-digit", "createService", "envVar", "INVALID", envVar="1ABC"),
    bad_create("envvar-dash", "createService", "envVar", "INVALID", envVar="A-B"),
    bad_create("envvar-corral", "createService", "envVar", "INVALID", envVar="CORRAL_X"),
    bad_create("envvar-path", "createService", "envVar", "INVALID", envVar="PATH"),
    bad_create("envvar-empty", "createService", "envVar", "BLANK", envVar=""),
    bad_create("token-empty", "createService", "token", "BLANK", token=""),
    bad_create("token-blank", "createService", "token", "BLANK", token="   "),
    bad_create("proxy-duplicate", "createProxy", "name", "TAKEN", name="Edge"),
    bad_create("proxy-duplicate-case", "createProxy", "name", "TAKEN", name="EDGE"),
    bad_create("proxy-empty", "createProxy", "name", "BLANK", name=""),
    bad_create("proxy-whitespace", "createProxy", "name", "BLANK", name="  "),
    bad_create("proxy-too-long", "createProxy", "name", "TOO_LONG", name=LONG_NAME),
    bad_create("port-0", "createProxy", "port", "OUT_OF_RANGE", port=0),
    bad_create("port-65536", "createProxy", "port", "OUT_OF_RANGE", port=65536),
    bad_create("port-negative", "createProxy", "port", "OUT_OF_RANGE", port=-1),
    bad_create("protocol-ftp", "createProxy", "protocol", "INVALID", protocol="ftp"),
    bad_create("host-url", "createProxy", "host", "INVALID", host="http://x"),
    bad_create("host-space", "createProxy", "host", "INVALID", host="a b"),
    bad_create("host-port", "createProxy", "host", "INVALID", host="example.com:8080"),
    bad_create(
        "shadowsocks-no-method",
        "createProxy",
        "settings.method",
        "INVALID",
        protocol="shadowsocks",
        password="pw",
    ),
    bad_create(
        "vmess-not-uuid", "createProxy", "password", "INVALID", protocol="vmess", password="nope"
    ),
    bad_create("template-duplicate", "createCommandTemplate", "name", "TAKEN", name="Hello"),
    bad_create("template-duplicate-case", "createCommandTemplate", "name", "TAKEN", name="hELLO"),
    bad_create("template-empty", "createCommandTemplate", "name", "BLANK", name=""),
    bad_create("template-whitespace", "createCommandTemplate", "name", "BLANK", name="  "),
    bad_create("template-too-long", "createCommandTemplate", "name", "TOO_LONG", name=LONG_NAME),
    bad_create("jinja-syntax", "createCommandTemplate", "template", "INVALID", template="{{ x "),
    bad_create(
        "parameter-type",
        "createCommandTemplate",
        "parameters",
        "INVALID",
        parameters=[{"name": "n", "type": "float"}],
    ),
    bad_create(
        "parameter-duplicate",
        "createCommandTemplate",
        "parameters",
        "INVALID",
        parameters=[{"name": "n"}, {"name": "n", "type": "int"}],
    ),
    bad_create(
        "parameter-default-type",
        "createCommandTemplate",
        "parameters",
        "INVALID",
        parameters=[{"name": "n", "type": "int", "default": "ten"}],
    ),
    bad_create(
        "parameter-default-bool-for-int",
        "createCommandTemplate",
        "parameters",
        "INVALID",
        parameters=[{"name": "n", "type": "int", "default": True}],
    ),
    bad_create(
        "max-attempts-0", "createCommandTemplate", "maxAttempts", "OUT_OF_RANGE", maxAttempts=0
    ),
    bad_create(
        "timeout-0", "createCommandTemplate", "timeoutSeconds", "OUT_OF_RANGE", timeoutSeconds=0
    ),
]


@pytest.mark.parametrize(("mutation", "input", "field", "code"), CREATE_CASES)
async def test_bad_create_input_is_a_user_error(
    gql: GraphQLClient, mutation: str, input: dict[str, Any], field: list[str], code: str
) -> None:
    await world(gql)
    before = await snapshot(gql)
    assert_rejected(await mutate(gql, mutation, **input), field, code)
    assert await snapshot(gql) == before


def bad_update(case_id: str, type_name: str, field: str, code: str, **changes: Any) -> Any:
    """An update case: `changes` to the world's object of `type_name`, rejected on `field`."""
    return pytest.param(type_name, changes, [field], code, id=case_id)


# Besides world(), a profile, service, proxy and template named "Zed" exist.
UPDATE_CASES = [
    bad_update("profile-rename-taken", "Profile", "name", "TAKEN", name="Zed"),
    bad_update("profile-rename-taken-case", "Profile", "name", "TAKEN", name="zED"),
    bad_update("profile-blank", "Profile", "name", "BLANK", name="  "),
    bad_update("profile-too-long", "Profile", "name", "TOO_LONG", name=LONG_NAME),
    bad_update("viewport-10", "Profile", "viewportWidth", "OUT_OF_RANGE", viewportWidth=10),
    bad_update("dir-relative", "Profile", "userDataDir", "INVALID", userDataDir="./p"),
    bad_update("service-rename-taken", "Service", "name", "TAKEN", name="Zed"),
    bad_update("service-rename-taken-case", "Service", "name", "TAKEN", name="zed"),
    bad_update("envvar-corral", "Service", "envVar", "INVALID", envVar="CORRAL_TOKEN"),
    bad_update("token-blank", "Service", "token", "BLANK", token=" "),
    bad_update("proxy-rename-taken", "Proxy", "name", "TAKEN", name="Zed"),
    bad_update("proxy-rename-taken-case", "Proxy", "name", "TAKEN", name="ZED"),
    bad_update("port-65536", "Proxy", "port", "OUT_OF_RANGE", port=65536),
    bad_update("protocol-ftp", "Proxy", "protocol", "INVALID", protocol="ftp"),
    bad_update("host-url", "Proxy", "host", "INVALID", host="http://x"),
    bad_update("template-rename-taken", "CommandTemplate", "name", "TAKEN", name="Zed"),
    bad_update("template-rename-taken-case", "CommandTemplate", "name", "TAKEN", name="zed"),
    bad_update("jinja-syntax", "CommandTemplate", "template", "INVALID", template="{{ x "),
    bad_update("max-attempts-0", "CommandTemplate", "maxAttempts", "OUT_OF_RANGE", maxAttempts=0),
]


@pytest.mark.parametrize(("type_name", "changes", "field", "code"), UPDATE_CASES)
async def test_bad_update_input_is_a_user_error(
    gql: GraphQLClient, type_name: str, changes: dict[str, Any], field: list[str], code: str
) -> None:
    ids = await world(gql)
    await make(gql, "createProfile", name="Zed")
    await make(gql, "createService", name="Zed", envVar="ZED_TOKEN")
    await make(gql, "createProxy", name="Zed", **PROXY)
    await make(gql, "createCommandTemplate", name="Zed", **TEMPLATE)
    before = await snapshot(gql)
    payload = await mutate(gql, f"update{type_name}", id=ids[type_name], **changes)
    assert_rejected(payload, field, code)
    assert await snapshot(gql) == before


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


async def deleted_id(gql: GraphQLClient, type_name: str) -> str:
    """The well-formed ID of an object of `type_name` that no longer exists."""
    mutation = f"create{type_name}"
    gone = await make(gql, mutation, **{**VALID_INPUT[mutation], "name": "Gone"})
    assert (await delete(gql, type_name, gone["id"]))["deletedId"] == gone["id"]
    return str(gone["id"])


async def run_with_target(
    gql: GraphQLClient, mutation: str, field: str, target: str, ids: dict[str, str]
) -> dict[str, Any]:
    """Run `mutation` on the world's objects, with `target` as its `field` argument."""
    if mutation.startswith("delete"):
        return await delete(gql, deleted_type(mutation), target)
    if mutation in ("unlinkService", "detachProxy"):
        other_type = "Service" if mutation == "unlinkService" else "Proxy"
        profile_id = target if field == "profileId" else ids["Profile"]
        other_id = ids[other_type] if field == "profileId" else target
        return await unlink_or_detach(gql, mutation, profile_id, other_id)
    inputs: dict[str, dict[str, Any]] = {
        "linkService": {
            "profileId": ids["Profile"],
            "serviceId": ids["Service"],
            "token": LINK_TOKEN,
        },
        "attachProxy": {"profileId": ids["Profile"], "proxyId": ids["Proxy"], "isDefault": True},
        "createProxy": {"name": "Hop", **PROXY},
        "updateProfile": {"name": "Renamed"},
        "updateService": {"name": "Renamed", "token": None},
        "updateProxy": {"name": "Renamed", "port": 9},
        "updateCommandTemplate": {"name": "Renamed"},
    }
    return await mutate(gql, mutation, **{**inputs[mutation], field: target})


def deleted_type(mutation: str) -> str:
    """The type a delete mutation deletes."""
    return next(t for t, m in DELETE_MUTATIONS.items() if m == mutation)


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


# --- 5. delete rules -----------------------------------------------------------------------


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


async def default_count(app: Starlette, profile_id: str) -> int:
    decoded = decode_id(profile_id)
    assert decoded is not None
    async with app.state.services.sessionmaker() as session:
        stmt = select(func.count()).where(
            models.ProfileProxy.profile_id == decoded[1], models.ProfileProxy.is_default.is_(True)
        )
        return int(await session.scalar(stmt) or 0)


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


# --- 6. update semantics -------------------------------------------------------------------


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


async def stored_credentials(app: Starlette, proxy_id: str) -> dict[str, str]:
    decoded = decode_id(proxy_id)
    assert decoded is not None
    async with app.state.services.sessionmaker() as session:
        row = await session.get_one(models.Proxy, decoded[1])
        return read_credentials(row, app.state.services.secret_box)


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


# -- limits ------------------------------------------------------------------------------


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
    validate = strawberry_schema.validate

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
